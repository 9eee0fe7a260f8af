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
