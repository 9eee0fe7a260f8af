"""bench/bench_micro_batch.py's parts: the world holds every row count's batches, one row runs
train_step in both modes and reports what the README's table reads, and the activation count
used for the Swin-T arithmetic grows with the images."""
import pytest
import torch
from conftest import import_bench

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bench():
    return import_bench("bench_micro_batch")


@pytest.mark.parametrize("row_counts", [[64, 512, 4096], [8, 100], [3000]])
def test_world_holds_every_batch(bench, row_counts):
    cfg = bench.world_config(row_counts, steps=2, warmup=1)
    pretrain_rows = cfg.users * cfg.requests_per_user // 2  # the generator's split: half pretrain
    for r in row_counts:
        steps = bench.steps_for(r, 2)
        assert 2 <= steps <= 20 and r * (steps + 1) <= pretrain_rows
    assert cfg.items >= 25 * max(row_counts)


@pytest.mark.parametrize("mode", ["plain", "micro"])
def test_one_row(bench, world, mode):
    row = bench.one(world, rows=4, mode=mode, micro_batch=8, steps=2, warmup=1)
    assert row["steps"] == 2 and row["mode"] == mode and row["micro_batch"] == (8 if mode == "micro" else None)
    assert row["images_per_step"] > 8  # more than one chunk: the micro row ran two passes
    assert 0 < row["candidates_per_step"] <= 4 * 10
    assert row["ms_per_image"] == pytest.approx(1e3 * row["seconds_per_step"] / row["images_per_step"], rel=1e-2)
    assert row["peak_rss_mb"] > row["step_peak_mb"] >= 0


def test_saved_activations_grow_with_images(bench):
    """Twice the images save about twice the activations (the bf16 weight copies, saved once
    per forward, are what keeps it from exactly twice)."""
    two, params, features = bench.saved_bytes(2, encoder="test_efficientnet", size=32)
    four, _, _ = bench.saved_bytes(4, encoder="test_efficientnet", size=32)
    assert params > 0 and features > 0 and two > 0
    assert 1.5 * two < four <= 2 * two


def test_modes_alternate_abba(bench):
    assert bench.mode_order(2) == [(0, "plain"), (0, "micro"), (1, "micro"), (1, "plain")]
    assert [m for _, m in bench.mode_order(3)].count("micro") == 3


def test_table_averages_time_and_keeps_the_largest_peak(bench, monkeypatch):
    """The README's table: ms/image the mean over a (rows, mode)'s repeats, peak RSS the largest;
    the summary's ratios and per-image slope read that table; a failed process is left out."""
    def run(rows, mode, ms, peak, images, repeat):
        return {"rows": rows, "mode": mode, "ms_per_image": ms, "seconds_per_step": ms * images / 1e3,
                "peak_rss_mb": peak, "step_peak_mb": peak - 1000, "images_per_step": images, "repeat": repeat}

    runs = [run(64, "plain", 0.3, 1800, 900, 0), run(64, "micro", 0.5, 1250, 900, 0),
            run(64, "micro", 0.4, 1270, 900, 1), run(64, "plain", 0.5, 1790, 900, 1),
            run(4096, "plain", 1.2, 11600, 36900, 0), {"rows": 4096, "mode": "micro", "error": "x", "repeat": 0},
            run(4096, "micro", 1.1, 1800, 36900, 1), run(4096, "plain", 1.4, 11500, 36900, 1)]
    rows = {(r["rows"], r["mode"]): r for r in bench.table(runs)}
    assert rows[64, "plain"]["ms_per_image"] == pytest.approx(0.4) and rows[64, "plain"]["peak_rss_mb"] == 1800
    assert rows[64, "micro"]["ms_per_image_each"] == [0.5, 0.4] and rows[64, "micro"]["repeats"] == 2
    assert rows[4096, "micro"]["repeats"] == 1 and "repeat" not in rows[4096, "micro"]
    monkeypatch.setattr(bench, "swin_estimate", lambda other, micro_batch: {"other": other})
    s = bench.summarize(list(rows.values()), [64, 4096], 256)
    assert s["micro_peak_ratio_largest_over_smallest"] == pytest.approx(1800 / 1270)
    assert s["micro_over_plain_ms_per_image"] == {"64": pytest.approx(0.45 / 0.4), "4096": pytest.approx(1.1 / 1.3)}
    assert s["micro_kb_per_extra_image"] == pytest.approx(1024 * (800 - 270) / 36000)
    assert s["swin_t_224_80gb"]["other"] == pytest.approx(1024 * s["micro_kb_per_extra_image"] - 3 * 32 * 32)
