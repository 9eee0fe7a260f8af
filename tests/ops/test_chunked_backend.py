"""The `chunked` contrastive backend (ATen row tiles, recomputing autograd): many tiles,
float64 gradcheck, O(N d + tile) memory, and the distributed modes (all-gather and ring).
Masks, weights, reductions, symmetric and odd shapes vs the float64 reference run in
test_contrastive_loss.py, which parametrises over every backend including this one."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import courier_fast as cf
from courier_fast.ops.backends import chunked
from courier_fast.ops.reference import contrastive_loss_reference

from conftest import BENCH, rand_mask, randn


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 16 rows whatever M is, so that N = 257 spans 17 tiles."""
    monkeypatch.setitem(chunked.TILE_ELEMS, "cpu", 1)
    monkeypatch.setitem(chunked.MIN_ROWS, "cpu", 16)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_many_tiles_match_reference(gen, small_tiles, symmetric, normalize):
    n, d = 257, 5
    assert chunked.tile_rows(n, n, "cpu") == 16
    a = randn(gen, n, d, dtype=torch.float64, requires_grad=True)
    c = randn(gen, n, d, dtype=torch.float64, requires_grad=True)
    w, m = torch.rand(n, generator=gen, dtype=torch.float64), rand_mask(gen, n, p=0.8)
    kw = dict(temperature=0.1, anchor_weight=w, candidate_mask=m, symmetric=symmetric, normalize=normalize)
    got = cf.contrastive_loss(a, c, backend="chunked", **kw)
    want = contrastive_loss_reference(a, c, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for g, e in zip(torch.autograd.grad(got, (a, c)), torch.autograd.grad(want, (a, c))):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_many_tiles_with_scale_bias_ids_logq_match_reference(gen, small_tiles, symmetric):
    """17 tiles: accidental hits (ids repeating across tiles), logQ, a learned scale and bias:
    the loss and every gradient (anchors, candidates, scale; bias exactly 0) equal the dense
    float64 reference."""
    n, d = 257, 5
    a = randn(gen, n, d, dtype=torch.float64, requires_grad=True)
    c = randn(gen, n, d, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    kw = dict(logit_scale=s, logit_bias=b, anchor_weight=torch.rand(n, generator=gen, dtype=torch.float64),
              candidate_mask=rand_mask(gen, n, p=0.8), candidate_ids=torch.randint(0, 40, (n,), generator=gen),
              candidate_logq=randn(gen, n, dtype=torch.float64), symmetric=symmetric)
    got = cf.contrastive_loss(a, c, backend="chunked", **kw)
    want = contrastive_loss_reference(a, c, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad(got, (a, c, s, b))
    for g, e in zip(grads[:3], torch.autograd.grad(want, (a, c, s))):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    assert grads[3] == 0


def test_lse_op_rows_and_columns_with_empty_sets(gen, small_tiles):
    x, y = randn(gen, 40, 3, dtype=torch.float64), randn(gen, 33, 3, dtype=torch.float64)
    xm, ym = rand_mask(gen, 40), torch.zeros(33, dtype=torch.bool)
    row, col = chunked.contrastive_lse(x, y, xm, ym, None, None, None, 0, torch.tensor(2.0, dtype=torch.float64),
                                       True, True)
    s = 2.0 * torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(y, dim=-1).T
    assert torch.isinf(row).all() and (row < 0).all()  # no candidate kept: -inf
    torch.testing.assert_close(col, torch.logsumexp(s.masked_fill(~xm[:, None], float("-inf")), 0))


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_float64(gen, small_tiles, symmetric):
    a = randn(gen, 20, 4, dtype=torch.float64, requires_grad=True)
    c = randn(gen, 20, 4, dtype=torch.float64, requires_grad=True)
    m = rand_mask(gen, 20, p=0.8)
    w = torch.rand(20, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, y: cf.contrastive_loss(x, y, temperature=0.5, anchor_weight=w, candidate_mask=m,
                                         symmetric=symmetric, backend="chunked"), (a, c))


def test_tiles_keep_at_least_the_minimum_rows_on_cuda():
    assert chunked.tile_rows(2**20, 2**20, "cuda") == chunked.MIN_ROWS["cuda"]
    assert chunked.tile_rows(10, 2**20, "cuda") == 10
    assert chunked.tile_rows(2**20, 2**10, "cpu") * 2**10 <= chunked.TILE_ELEMS["cpu"]


_PEAK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, sys.argv[4])  # bench/: the harness's peak-RSS reading
    import harness
    import courier_fast as cf
    n, d, backend = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    a, c = torch.randn(n, d, requires_grad=True), torch.randn(n, d, requires_grad=True)
    cf.contrastive_loss(a[:64], c[:64], backend=backend).backward()  # warm up allocator and imports
    a.grad = c.grad = None
    harness.reset_peak_rss()  # this process's peak from here on, whatever its parent's was
    base = harness.rss_mb()
    cf.contrastive_loss(a, c, backend=backend, symmetric=True).backward()
    print(json.dumps({"extra_mb": harness.peak_rss_mb() - base}))
""")


def _extra_peak_mb(n, d, backend):
    """Peak RSS (MB) above the inputs of one symmetric fwd + bwd, measured in a fresh process
    from VmHWM reset after warm-up (ru_maxrss is inherited across fork + exec and cannot be
    reset, so a child would report this process's peak)."""
    out = subprocess.run([sys.executable, "-c", _PEAK, str(n), str(d), backend, BENCH], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mb"]


def test_memory_is_o_n_d_plus_tile():
    """N = 12288, fwd + bwd, symmetric: peak RSS above the inputs stays under 15 % of the
    dense N x N fp32 logits (576 MB), i.e. nothing N x N is ever allocated. The same
    measurement of the dense reference must see its N x N buffers (over the whole logits), so
    the reading is shown to be able to fail."""
    n, d = 12288, 16
    dense_mb = n * n * 4 / 2**20
    extra = _extra_peak_mb(n, d, "chunked")
    assert extra < 0.15 * dense_mb, (extra, dense_mb)
    assert _extra_peak_mb(n, d, "reference") > dense_mb


# ----------------------------------------------------------------------------- distributed
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, sizes, gather, symmetric, data, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(sizes))
    try:
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        a, c = data["a"][sl].clone().requires_grad_(), data["c"][sl].clone().requires_grad_()
        loss = cf.nn.InBatchContrastiveLoss(temperature=0.1, symmetric=symmetric, backend="chunked",
                                            gather=gather)(a, c, anchor_weight=data["w"][sl],
                                                           candidate_mask=data["m"][sl])
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)
        results[rank] = ((total / len(sizes)).item(), a.grad.clone(), c.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("gather,sizes", [(True, (5, 8)), ("ring", (4, 7, 5))])
def test_distributed_gradients_equal_single_process(gather, sizes):
    n = sum(sizes)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    data = {"a": torch.randn(n, 5, generator=g, dtype=torch.float64),
            "c": torch.randn(n, 5, generator=g, dtype=torch.float64),
            "w": torch.rand(n, generator=g, dtype=torch.float64), "m": torch.rand(n, generator=g) < 0.8}
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), sizes, gather, True, data, results), nprocs=len(sizes))
    a, c = data["a"].clone().requires_grad_(), data["c"].clone().requires_grad_()
    ref = contrastive_loss_reference(a, c, temperature=0.1, anchor_weight=data["w"],
                                     candidate_mask=data["m"], symmetric=True)
    ga, gc = torch.autograd.grad(ref, (a, c))
    start = 0
    for rank, size in enumerate(sizes):
        loss, a_grad, c_grad = results[rank]
        assert abs(loss - ref.item()) < 1e-10
        sl = slice(start, start + size)
        torch.testing.assert_close(a_grad / len(sizes), ga[sl])
        torch.testing.assert_close(c_grad / len(sizes), gc[sl])
        start += size
