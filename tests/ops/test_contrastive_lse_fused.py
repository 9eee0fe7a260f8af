"""courier_fast::contrastive_lse_and_grad (CPU): the row LSE with its gradient in the same pass,
against the float64 dense reference (odd shapes, masks, ids, logQ, several row blocks), and the
loss's use of it: taken for a mean or sum on one process in one direction, its backward scaling
the saved gradients when the upstream gradient is proportional to the weights and recomputing
them otherwise."""
import math

import pytest
import torch

import courier_fast as cf
from courier_fast.ops.backends import compiled as _ops
from courier_fast.ops.reference import contrastive_loss_reference

from conftest import TOL, rand_mask, randn
from test_contrastive_lse_op import _assert_close, dense_lse, extras

pytestmark = pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built")
OP = torch.ops.courier_fast.contrastive_lse_and_grad


def _dense_grads(x, y, y_mask, scale, normalize, row_grad, more, x_mask=None):
    """float64 (row_lse, grad_x, grad_y, grad_scale) of sum(row_grad * row_lse) (-inf rows: none)."""
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    s64 = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    row, _ = dense_lse(x64, y64, x_mask, y_mask, s64, normalize, *more)
    loss = (row_grad.double() * torch.where(torch.isinf(row), 0, row)).sum()
    grads = torch.autograd.grad(loss, (x64, y64, s64), allow_unused=True)
    return [row.detach()] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, (x64, y64, s64))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (5, 300, 3), (300, 5, 7), (37, 130, 65)])
@pytest.mark.parametrize("rows", [None, 1, 7])  # None: the automatic block; 1 and 7: many blocks
@pytest.mark.parametrize("masks", ["none", "random", "empty"])
@pytest.mark.parametrize("more", [False, True], ids=["plain", "ids+logq"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_row_lse_and_gradients_match_dense(gen, dtype, n, m, d, rows, masks, more, normalize):
    x, y = randn(gen, n, d, dtype=dtype), randn(gen, m, d, dtype=dtype)
    x_mask = rand_mask(gen, n, p=0.5) if masks == "random" else None  # never changes the rows
    y_mask = {"none": None, "random": rand_mask(gen, m, p=0.6), "empty": torch.zeros(m, dtype=torch.bool)}[masks]
    extra = extras(gen, n, m, "cpu", 2) if more else ()
    logq, x_ids, y_ids, offset = extra if more else (None, None, None, 0)
    row_grad = torch.rand(n, generator=gen, dtype=torch.float64) * (torch.rand(n, generator=gen) > 0.2)
    scale = torch.tensor(2.5, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    with _ops.forced_lse_tile_rows(rows) if rows else _nothing():
        got = OP(x, y, x_mask, y_mask, None if logq is None else logq.to(dtype), x_ids, y_ids, offset, scale,
                 normalize, row_grad.to(dtype))
    want = _dense_grads(x, y, y_mask, 2.5, normalize, row_grad, extra, x_mask)
    assert got[0].dtype == got[3].dtype == scale.dtype and got[1].dtype == got[2].dtype == dtype
    torch.testing.assert_close(got[0].double(), want[0], rtol=TOL[dtype][0], atol=TOL[dtype][1])  # -inf: empty
    for g, w in zip(got[1:], want[1:]):
        _assert_close(g.reshape(w.shape), w, dtype)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_block_rows_follow_the_memory_bounds():
    assert torch.ops.courier_fast.lse_fused_rows(8192, 64, False) == 256
    assert torch.ops.courier_fast.lse_fused_rows(16384, 64, False) == 128
    assert torch.ops.courier_fast.lse_fused_rows(16384, 64, True) == 128
    assert torch.ops.courier_fast.lse_fused_rows(1 << 17, 64, False) == 0  # fewer than 32 rows a block
    assert torch.ops.courier_fast.lse_fused_rows(8192, 1 << 16, False) == 0  # the (M, d) gradients per thread
    with _ops.forced_lse_tile_rows(3):
        assert torch.ops.courier_fast.lse_fused_rows(1 << 17, 64, False) == 3
    with pytest.raises(RuntimeError, match="fused blocks"):
        OP(torch.randn(2, 1), torch.randn(1 << 17, 1), None, None, None, None, None, 0, torch.ones(()), True,
           torch.ones(2))


@pytest.mark.parametrize("bad,error", [(torch.ones(4), RuntimeError), (torch.ones(3, 1), RuntimeError),
                                       (torch.ones(3, dtype=torch.int64), TypeError)])
def test_malformed_row_grad_raises_naming_it(bad, error):
    """A wrong shape is a RuntimeError, a wrong dtype a TypeError (docs/design.md §3.4), naming it."""
    x, y = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(error, match="row_grad"):
        OP(x, y, None, None, None, None, None, 0, torch.ones(()), True, bad)


def _calls(monkeypatch):
    """Counts the fused op's calls through the loss."""
    seen = []
    forward = _ops._RowLseWithGrad.forward

    def counting(ctx, *args):
        seen.append(1)
        return forward(ctx, *args)
    monkeypatch.setattr(_ops._RowLseWithGrad, "forward", staticmethod(counting))
    return seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weights", ["none", "bool", "float", "all_zero"])
@pytest.mark.parametrize("rows", [None, 5])
def test_loss_takes_the_fused_path_and_matches_the_reference(monkeypatch, gen, dtype, reduction, weights, rows):
    seen = _calls(monkeypatch)
    n, d = 61, 9
    a, c = randn(gen, n, d, dtype=dtype), randn(gen, n, d, dtype=dtype)
    weight = {"none": None, "bool": rand_mask(gen, n, p=0.7), "float": torch.rand(n, generator=gen).to(dtype),
              "all_zero": torch.zeros(n, dtype=dtype)}[weights]
    kw = dict(anchor_weight=weight, candidate_mask=rand_mask(gen, n, p=0.8),
              candidate_ids=torch.randint(0, 20, (n,), generator=gen),
              candidate_logq=randn(gen, n, dtype=dtype), reduction=reduction)
    scale = torch.tensor([11.0], dtype=dtype)
    results = []
    for fn, backend in ((cf.contrastive_loss, "cpu"), (contrastive_loss_reference, None)):
        a_, c_, s_ = (t.detach().double().requires_grad_() for t in (a, c, scale))
        if backend:
            a_, c_, s_ = (t.detach().requires_grad_() for t in (a, c, scale))
        with _ops.forced_lse_tile_rows(rows) if rows else _nothing():
            loss = fn(a_, c_, logit_scale=s_, **kw, **({"backend": backend} if backend else {}))
            (3.0 * loss).backward()  # a scalar factor: still proportional
        results.append([loss.detach(), a_.grad, c_.grad, s_.grad])
    assert seen == [1]
    for g, w in zip(*results):
        _assert_close(g.reshape(w.shape), w.double(), dtype)


def test_no_fused_pass_without_gradients_or_with_per_anchor_terms(monkeypatch, gen):
    seen = _calls(monkeypatch)
    a, c = randn(gen, 40, 8), randn(gen, 40, 8)
    cf.contrastive_loss(a, c, backend="cpu")  # nothing requires grad
    with torch.no_grad():
        cf.contrastive_loss(a.requires_grad_(), c, backend="cpu")
    cf.contrastive_loss(a, c, backend="cpu", reduction="none").sum().backward()
    cf.contrastive_loss(a, c, backend="cpu", symmetric=True).backward()
    assert seen == []
    cf.contrastive_loss(a, c, backend="cpu").backward()
    assert seen == [1]


@pytest.mark.parametrize("upstream", ["random", "proportional", "nan_lse"])
def test_backward_recomputes_unless_the_upstream_is_proportional(monkeypatch, gen, upstream):
    """Called directly with an upstream gradient that is not c * row_grad, the backward runs
    contrastive_lse_backward; with c * row_grad it only scales (the recompute is never called)."""
    x, y = randn(gen, 29, 6, dtype=torch.float64), randn(gen, 17, 6, dtype=torch.float64)
    if upstream == "nan_lse":
        x[3, 0] = float("nan")
    y_mask = rand_mask(gen, 17, p=0.7)
    row_grad = torch.rand(29, generator=gen, dtype=torch.float64)
    recomputed = []
    backward = torch.ops.courier_fast.contrastive_lse_backward
    monkeypatch.setattr(_ops.torch.ops.courier_fast, "contrastive_lse_backward",
                        lambda *a: recomputed.append(1) or backward(*a), raising=False)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    row = _ops.contrastive_row_lse_with_grad(xg, yg, y_mask, None, None, scale, True, row_grad)
    g = randn(gen, 29, dtype=torch.float64) if upstream == "random" else -2.5 * row_grad
    got = torch.autograd.grad(row, (xg, yg, scale), g)
    assert recomputed == ([] if upstream == "proportional" else [1])
    rl, _ = torch.ops.courier_fast.contrastive_lse(x, y, None, y_mask, None, None, None, 0, scale.detach(), True, False)
    none = rl.new_zeros(0)
    want = backward(g, none, x, y, None, y_mask, None, None, None, 0, rl, none, scale.detach(), True, False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.reshape(b.shape), b, equal_nan=True)


def test_proportion_of_the_upstream_gradient():
    """lse_grad_proportion: c where grad_row == c * row_grad to 4 ulps and every LSE is finite or
    -inf, NaN otherwise; its arguments checked and named."""
    prop = torch.ops.courier_fast.lse_grad_proportion
    w = torch.tensor([0.5, 0.0, 2.0, 1.0])
    lse = torch.tensor([1.0, float("-inf"), 3.0, 2.0])
    assert prop(-3.0 * w, w, lse) == pytest.approx(-3.0)
    assert prop(torch.zeros(4), torch.zeros(4), lse) == 0.0
    off = -3.0 * w
    off[3] *= 1 + 1e-5  # far beyond 4 ulps
    assert math.isnan(prop(off, w, lse))
    assert math.isnan(prop(torch.ones(4), torch.zeros(4), lse))  # upstream where every weight is 0
    for bad in (float("nan"), float("inf")):
        assert math.isnan(prop(-3.0 * w, w, torch.tensor([1.0, bad, 3.0, 2.0])))
    assert prop(w.double() * 2, w.double(), lse.double()) == 2.0
    with pytest.raises(RuntimeError, match="grad_row"):
        prop(torch.ones(3), w, lse)
    with pytest.raises(TypeError, match="row_grad"):
        prop(w, w.double(), lse)
    with pytest.raises(RuntimeError, match="row_lse"):
        prop(w, w, lse[None])
