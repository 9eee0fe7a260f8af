"""bench/demo_abba.py: the run order and the summary arithmetic (the demo runs themselves are the
bench's job, minutes each)."""
import pytest
from conftest import import_bench

demo_abba = import_bench("demo_abba")


def test_abba_order_puts_each_side_first_and_last_equally():
    order = demo_abba.abba(2)
    assert order == ["before", "after", "after", "before"] * 2
    assert sum(i for i, s in enumerate(order) if s == "before") == sum(i for i, s in enumerate(order) if s == "after")


def test_summary_means_and_ratio():
    runs = [{"side": "before", "seconds": 300.0, "auc": {"courier": 0.70, "no_image": 0.60}},
            {"side": "after", "seconds": 240.0, "auc": {"courier": 0.71, "no_image": 0.60}},
            {"side": "after", "seconds": 260.0, "auc": {"courier": 0.69, "no_image": 0.60}},
            {"side": "before", "seconds": 340.0, "auc": {"courier": 0.70, "no_image": 0.62}}]
    s = demo_abba.summarize(runs)
    assert s["before"]["seconds_mean"] == 320.0 and s["after"]["seconds_mean"] == 250.0
    assert s["after_over_before"] == pytest.approx(250 / 320, abs=1e-3)
    assert s["after"]["auc_mean"]["courier"] == pytest.approx(0.70)
    assert s["before"]["auc_mean"]["no_image"] == pytest.approx(0.61)
