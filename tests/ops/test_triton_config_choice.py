"""The contrastive Triton kernels' configs are chosen deterministically (issue 27 item 2).

Triton's autotuner benchmarks every config at each new value of its key and picks by timing,
so keyed on the exact row count it re-benchmarks (device syncs) for every new size, and two
ranks can pick different tiles. Here, under TRITON_INTERPRET=1, each kernel is given two configs
(the interpreter's table has one, which the autotuner would never time) and the autotuner's
benchmark is stubbed: it counts its calls and returns timing noise.
"""
import json
import random

import pytest
import torch
import torch.multiprocessing as mp
import triton
import triton.runtime.autotuner as autotuner

from courier_fast.kernels import _tune_cache
from courier_fast.kernels import contrastive_lse as lse_kernels

pytestmark = pytest.mark.skipif(not lse_kernels.INTERPRET, reason="runs the kernels in Triton's interpreter")

TWO = [(16, 16, 4, 1), (32, 16, 4, 1)]


def _stub(monkeypatch, benched, seed=0):
    """Two configs per kernel; Autotuner._bench records the kernel it times, returns noise."""
    noise = random.Random(seed)
    monkeypatch.setattr(lse_kernels, "_configs", lambda kernel, cls, fp32: [lse_kernels._cfg(*c) for c in TWO])

    def bench(self, *args, config, **meta):
        benched.append(self.fn.__name__)
        t = noise.random()
        return [t, t, t]

    monkeypatch.setattr(autotuner.Autotuner, "_bench", bench)


def _run(n, ran=None, monkeypatch=None):
    """Forward and backward of the row LSE for n rows and n candidates (d = 16, fp32); records
    the (kernel, BLOCK_N, BLOCK_M) each launch ran in `ran`."""
    g = torch.Generator().manual_seed(n)
    x, y = torch.randn(n, 16, generator=g), torch.randn(n, 16, generator=g)
    row, _ = lse_kernels.lse_forward(x, y, None, None, 10.0, True, False)
    lse_kernels.lse_backward(torch.ones(n), None, x, y, None, None, row, None, 10.0, True, False)
    return row


def _recording(monkeypatch, ran):
    """Records the block sizes of every interpreted launch."""
    cls = type(lse_kernels._row_lse_kernel)
    real = cls.run

    def run(self, *args, **kwargs):
        ran.append((self.fn.__name__ if hasattr(self, "fn") else str(self), kwargs["BLOCK_N"], kwargs["BLOCK_M"]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, "run", run)


def _fresh_process(monkeypatch, cache):
    """What a new process starts with: no tuner and no cached choice in memory; the disk cache in
    `cache`."""
    monkeypatch.setenv("COURIER_FAST_CACHE_DIR", str(cache))
    monkeypatch.setattr(lse_kernels, "_TUNED", {})
    monkeypatch.setattr(_tune_cache, "_MEMORY", {})


@pytest.mark.parametrize("opt_in", [False, True])
def test_sizes_100_to_108_benchmark_at_most_once_per_kernel(monkeypatch, tmp_path, opt_in):
    """Default: nothing is benchmarked. Opted in to timing: 100..108 share one bucket, so each
    kernel is timed once (one benchmark per config), not once per size."""
    benched = []
    _stub(monkeypatch, benched)
    monkeypatch.setenv("COURIER_FAST_TRITON_AUTOTUNE", "1" if opt_in else "0")
    _fresh_process(monkeypatch, tmp_path)
    for n in range(100, 109):
        row = _run(n)
        assert torch.isfinite(row).all()
    per_kernel = {k: benched.count(k) / len(TWO) for k in set(benched)}
    assert all(v <= 1 for v in per_kernel.values()), per_kernel
    if opt_in:
        assert set(per_kernel) == {"_row_lse_kernel", "_grad_x_kernel", "_grad_y_kernel"}, per_kernel
    else:
        assert benched == []


def test_opt_in_autotune_times_once_per_device_and_version(monkeypatch, tmp_path):
    """Opted in, the timed choice is cached on disk per device and software version (like the
    self-check verdicts): a second process with the same cache times nothing and launches the
    same configs; another Triton version (a new environment) times again."""
    benched, ran = [], []
    _stub(monkeypatch, benched)
    _recording(monkeypatch, ran)
    monkeypatch.setenv("COURIER_FAST_TRITON_AUTOTUNE", "1")
    _fresh_process(monkeypatch, tmp_path)
    _run(100)
    assert sorted(set(benched)) == ["_grad_x_kernel", "_grad_y_kernel", "_row_lse_kernel"]
    assert len(benched) == 3 * len(TWO)
    first, ran[:] = list(ran), []
    (path,) = list(tmp_path.iterdir())
    assert len(json.loads(path.read_text())["configs"]) == 3
    _fresh_process(monkeypatch, tmp_path)  # a new process on the same device and versions
    _run(100)
    assert len(benched) == 3 * len(TWO) and ran == first
    real = _tune_cache.environment
    monkeypatch.setattr(_tune_cache, "environment", lambda *a: {**real(*a), "triton": "another"})
    _fresh_process(monkeypatch, tmp_path)
    _run(100)
    assert len(benched) == 2 * 3 * len(TWO) and len(list(tmp_path.iterdir())) == 2


def _process(rank, results):
    mp_ = pytest.MonkeyPatch()
    try:
        benched, ran = [], []
        _stub(mp_, benched, seed=rank)  # each process its own timing noise
        _recording(mp_, ran)
        for n in (20, 40, 70):
            _run(n)
        results[rank] = ran
    finally:
        mp_.undo()


def test_two_processes_pick_the_same_configs():
    """Two processes (with different timing noise) launch every kernel with the same blocks."""
    results = mp.Manager().dict()
    mp.spawn(_process, args=(results,), nprocs=2)
    assert results[0] == results[1], (results[0], results[1])
    assert len(results[0]) == 9


def test_choice_is_a_function_of_the_bucket_and_in_the_table():
    """For every kernel, d class and input kind of the GPU tables: the chosen config is one of
    the table's, the same for every size of a power-of-two bucket, the table's first once the
    size gives MIN_PROGRAMS programs, and the one with the most programs below that."""
    for kernel in ("row_lse", "grad_x", "grad_y"):
        for fp32 in (False, True):
            for cls in lse_kernels.D_CLASSES:
                if fp32 and cls not in lse_kernels._FP32[kernel]:
                    continue
                table = lse_kernels.config_table(kernel, cls, fp32)
                axis = 1 if kernel == "grad_y" else 0
                for size in (1, 3, 100, 1000, 5000, 2 ** 20 - 3):
                    got = lse_kernels.choose_config(kernel, cls, fp32, size, table=table)
                    assert got in table
                    bucket = triton.next_power_of_2(size)
                    assert got == lse_kernels.choose_config(kernel, cls, fp32, bucket, table=table)
                    assert got == lse_kernels.choose_config(kernel, cls, fp32, bucket // 2 + 1, table=table)
                    if triton.cdiv(bucket, table[0][axis]) >= lse_kernels.MIN_PROGRAMS:
                        assert got == table[0]
                    else:
                        assert triton.cdiv(bucket, got[axis]) == max(triton.cdiv(bucket, c[axis]) for c in table) \
                            or triton.cdiv(bucket, got[axis]) >= lse_kernels.MIN_PROGRAMS


class _TooBig:
    """Stands in for a kernel: a launch with BLOCK_N == `big` raises OutOfResources (as on a
    99 KB sm_86 part), any other records its blocks."""

    def __init__(self, big, ran):
        self.big, self.ran = big, ran

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if kwargs["BLOCK_N"] == self.big:
                raise lse_kernels.OutOfResources(120000, 101376, "shared memory")
            self.ran.append((kwargs["BLOCK_N"], kwargs["BLOCK_M"]))
        return run


def test_a_config_out_of_shared_memory_gives_way_to_the_next(monkeypatch):
    """The chosen config does not fit the device: the table's next runs, and later launches on
    that device go straight to it (the set of failed configs is remembered per process)."""
    ran = []
    monkeypatch.setattr(lse_kernels, "_configs", lambda kernel, cls, fp32: [lse_kernels._cfg(*c) for c in TWO])
    monkeypatch.setattr(lse_kernels, "_OUT_OF_RESOURCES", set())
    monkeypatch.setattr(lse_kernels, "_row_lse_kernel", _TooBig(16, ran))
    x = torch.zeros(3, 16)
    for _ in range(2):
        lse_kernels.launch("row_lse", 16, True, 3, 1, lambda meta: (1,), x)
    assert ran == [(32, 16), (32, 16)]
    assert len(lse_kernels._OUT_OF_RESOURCES) == 1
    monkeypatch.setattr(lse_kernels, "_row_lse_kernel", _TooBig(32, ran))
    with pytest.raises(lse_kernels.OutOfResources):  # nothing fits: the error, not a silent skip
        lse_kernels.launch("row_lse", 16, True, 3, 1, lambda meta: (1,), x)
