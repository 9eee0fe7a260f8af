"""bench/bench_train_step.py's timing helper: rates are divided by the steps it actually timed."""
import importlib.util
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    try:
        spec = importlib.util.spec_from_file_location("bench_train_step", os.path.join(BENCH, "bench_train_step.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:  # the module adds bench/ itself: left there, spawned test workers import bench/conftest.py
        sys.path[:] = [p for p in sys.path if os.path.abspath(p) != BENCH]


@pytest.mark.parametrize("sizes", [[5, 7, 9, 11], [3, 4, 6, 8, 10, 12, 14]])  # fewer / more batches than asked
def test_images_per_step_counts_the_steps_that_ran(bench, sizes):
    t = bench.timed_steps(lambda n: n, iter(sizes), torch.device("cpu"), warmup=2)
    assert t["steps"] == len(sizes) - 2 and t["images"] == sum(sizes[2:])
    assert t["images_per_step"] == sum(sizes[2:]) / (len(sizes) - 2)
    assert t["images_per_s"] == t["images"] / t["seconds"] and 0 <= t["data_wait_fraction"] <= 1


def test_nothing_timed_is_an_error(bench):
    with pytest.raises(ValueError, match="warmup"):
        bench.timed_steps(lambda n: n, iter([1, 2]), torch.device("cpu"), warmup=2)
