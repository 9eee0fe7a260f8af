"""pytest-benchmark microbenchmarks of the CPU contrastive loss (forward + backward).

    python -m pytest bench/test_bench_contrastive_cpu.py --benchmark-only

Not part of the test suite (testpaths = tests): timings are never assertions.
"""
import pytest
import torch

from bench_contrastive import courier, naive, official

SHAPES = [(2048, 64), (4096, 64), (4096, 256)]
IMPLS = {"naive": naive, "official": official, "courier_fast:cpu": courier("cpu"),
         "courier_fast:cpu:symmetric": courier("cpu", symmetric=True)}


@pytest.mark.parametrize("n,d", SHAPES, ids=[f"N{n}-d{d}" for n, d in SHAPES])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_fwd_bwd(benchmark, impl, n, d):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g, requires_grad=True)
    c = torch.randn(n, d, generator=g, requires_grad=True)
    fn = IMPLS[impl]

    def step():
        a.grad = c.grad = None
        fn(a, c).backward()

    benchmark.group = f"contrastive fwd+bwd N={n} d={d}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
