"""bench/bench_train_step.py's timing helper: rates are divided by the steps it actually timed."""
import pytest
import torch
from conftest import import_bench


@pytest.fixture(scope="module")
def bench():
    return import_bench("bench_train_step")


@pytest.mark.parametrize("sizes", [[5, 7, 9, 11], [3, 4, 6, 8, 10, 12, 14]])  # fewer / more batches than asked
def test_images_per_step_counts_the_steps_that_ran(bench, sizes):
    t = bench.timed_steps(lambda n: n, iter(sizes), torch.device("cpu"), warmup=2)
    assert t["steps"] == len(sizes) - 2 and t["images"] == sum(sizes[2:])
    assert t["images_per_step"] == sum(sizes[2:]) / (len(sizes) - 2)
    assert t["images_per_s"] == t["images"] / t["seconds"] and 0 <= t["data_wait_fraction"] <= 1


def test_nothing_timed_is_an_error(bench):
    with pytest.raises(ValueError, match="warmup"):
        bench.timed_steps(lambda n: n, iter([1, 2]), torch.device("cpu"), warmup=2)
