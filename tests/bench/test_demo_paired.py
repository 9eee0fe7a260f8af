"""bench/demo_paired.py: the paired interval and the decision rule of docs/design.md §5 (no training)."""
import math

import pytest
from conftest import import_bench

demo_paired = import_bench("demo_paired")
T975_DF9 = 2.2621571627982  # Student's t, 97.5 % quantile, 9 degrees of freedom
T975_DF2 = 4.3026527297495


def test_interval_is_the_paired_t_interval():
    base = [0.70 + 0.01 * i for i in range(10)]
    diff = [0.004, 0.006, -0.001, 0.010, 0.003, 0.007, 0.002, 0.005, 0.008, 0.001]
    p = demo_paired.paired(base, [b + d for b, d in zip(base, diff)])
    mean = sum(diff) / 10
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / 9)
    half = T975_DF9 * sd / math.sqrt(10)
    assert p["n"] == 10 and p["diff"] == pytest.approx(diff)
    assert p["mean"] == pytest.approx(mean) and p["std"] == pytest.approx(sd)
    assert p["ci95"] == pytest.approx([mean - half, mean + half])
    assert p["ci95"][0] > 0 and p["decision"] == "change"


def test_issue_28s_three_seed_gain_is_not_a_change():
    """candidate_ids' evidence (+0.010, +0.001, +0.013 on three seeds): the interval straddles zero,
    and three seeds are too few even when it would not."""
    p = demo_paired.paired([0.0, 0.0, 0.0], [0.010, 0.001, 0.013])
    half = T975_DF2 * 0.0062450 / math.sqrt(3)
    assert p["ci95"] == pytest.approx([0.008 - half, 0.008 + half], abs=1e-6)
    assert p["ci95"][0] < 0 < p["ci95"][1] and p["decision"].startswith("keep (no difference")
    few = demo_paired.paired([0.0] * 3, [0.010, 0.011, 0.012])
    assert few["ci95"][0] > 0 and few["decision"].startswith("keep (challenger better, but only 3")


def test_decisions_keep_the_base_unless_the_interval_is_above_zero():
    base = [0.7] * 10
    worse = demo_paired.paired(base, [0.69, 0.695, 0.692, 0.69, 0.691, 0.693, 0.694, 0.69, 0.696, 0.69])
    assert worse["ci95"][1] < 0 and worse["decision"] == "keep (base better)"
    mixed = demo_paired.paired(base, [0.71, 0.69] * 5)
    assert mixed["ci95"][0] < 0 < mixed["ci95"][1] and mixed["decision"] == "keep (no difference shown)"
    one = demo_paired.paired([0.7], [0.8])
    assert one["ci95"] == [-math.inf, math.inf] and one["decision"].startswith("keep")
    with pytest.raises(ValueError):
        demo_paired.paired([0.7, 0.7], [0.8])


def test_summary_uses_finished_seeds_and_the_gap_share():
    r = lambda auc: {"auc": auc, "gauc": auc, "seconds": 1.0}  # noqa: E731
    per_seed = {0: {"no_image": r(0.60), "oracle_attributes": r(0.80), "a": r(0.70), "b": r(0.74)},
                1: {"no_image": r(0.50), "oracle_attributes": r(0.90), "a": r(0.80), "b": r(0.78)},
                2: {"no_image": r(0.50), "oracle_attributes": r(0.90), "a": r(0.80)}}  # b unfinished
    s = demo_paired.summarise(per_seed, "a", ["b", "no_image", "oracle_attributes"])
    assert s["seeds"] == [0, 1] and s["auc"]["b"] == [0.74, 0.78]
    assert set(s["paired"]) == {"b"} and s["paired"]["b"]["diff"] == pytest.approx([0.04, -0.02])
    assert s["gap_recovered"]["a"]["per_seed"] == pytest.approx([0.5, 0.75])
    assert s["gap_recovered"]["b"]["mean"] == pytest.approx((0.7 + 0.7) / 2)
    table = demo_paired.format_tables({"quick": True, "base": "a", **s})
    assert "b (B) vs a (A)" in table and "+0.0400" in table and "75" in table
