"""The CPU driver of courier_fast::contrastive_lse (csrc/contrastive_lse_cpu_driver.cpp): 2-D tiles
run by one worker thread per share of column blocks, row states and anchor gradients merged per
panel of rows, and the one-exp epilogues (float32, columns, no y_bias) with their fallback.
Everything against the float64 dense reference, forward and backward (x, y and the scale)."""
import pytest
import torch

import courier_fast as cf
from courier_fast.ops.backends import compiled as _ops

from conftest import rand_mask, randn
from test_contrastive_lse_op import _assert_close, dense_lse, extras, lse
from test_contrastive_lse_op import ieee_fp32_matmul  # noqa: F401  (the fixture, used by name below)

pytestmark = [pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built"),
              pytest.mark.usefixtures("ieee_fp32_matmul")]


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """The driver's partition depends on the thread count: one worker, or two with their own row
    states and anchor gradients merged after each panel."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _check(x, y, xm, ym, scale, normalize, with_columns, rest, gen, dtype, scale_grad_of_terms=None):
    """Forward and backward of the op against the float64 dense reference.

    scale_grad_of_terms: where a test's inputs make the scale gradient sum(g * d row/d scale) a sum
    of large terms of either sign that can cancel to almost nothing, its tolerance relative to
    the uncancelled size sum(|g| * |d row/d scale|) (+ the same over columns) instead of the
    shared one relative to the result (which a cancelled float32 sum cannot hold)."""
    n, m = x.shape[0], y.shape[0]
    g = randn(gen, n, dtype=torch.float64)
    h = randn(gen, m, dtype=torch.float64)
    row, col = lse(_ops.contrastive_lse, x, y, xm, ym, scale, normalize, with_columns, *rest)
    outs, grads = ((row, col), (g.to(row.dtype), h.to(col.dtype))) if with_columns else ((row,), (g.to(row.dtype),))
    gx, gy, gs = torch.autograd.grad(outs, (x, y, scale), grads)
    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    s64 = scale.detach().double().requires_grad_()
    want_row, want_col = dense_lse(x64, y64, xm, ym, s64, normalize, *rest)
    want_outs = (want_row, want_col) if with_columns else (want_row,)
    want = torch.autograd.grad(want_outs, (x64, y64, s64), (g, h)[:len(want_outs)])
    _assert_close(row, want_row, dtype)
    if with_columns:
        _assert_close(col, want_col, dtype)
    for got, exp in zip((gx, gy), want[:2]):
        _assert_close(got, exp, dtype)
    if scale_grad_of_terms is None:
        _assert_close(gs, want[2], dtype)
    else:
        size = _uncancelled_scale_grad(x64, y64, xm, ym, s64, normalize, rest, g, h, with_columns)
        torch.testing.assert_close(gs.double(), want[2], rtol=0.0, atol=scale_grad_of_terms * size)


def _uncancelled_scale_grad(x64, y64, xm, ym, s64, normalize, rest, g, h, with_columns):
    """sum_i |g_i| |d row_i / d scale| (+ sum_j |h_j| |d col_j / d scale|), float64: the size of
    the terms the scale gradient adds up, from the Jacobian of the dense LSEs."""
    def lses(s):
        return dense_lse(x64.detach(), y64.detach(), xm, ym, s, normalize, *rest)
    d_row, d_col = torch.autograd.functional.jacobian(lses, s64.detach())
    size = (g.abs() * d_row.abs()).sum()
    return size + (h.abs() * d_col.abs()).sum() if with_columns else size


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masks"])
@pytest.mark.parametrize("with_columns", [True, False], ids=["columns", "rows"])
@pytest.mark.parametrize("more", [False, True], ids=["plain", "ids+logq"])
def test_panels_and_workers_match_dense(gen, threads, dtype, masks, with_columns, more):
    """Forced 5 x 5 tiles on 203 x 150: 3 panels of 80 anchor rows (the last one partial), 30
    column blocks shared by the workers, partial tiles at both edges; accidental hits and the
    positive (row j at column j + 7) across tile and panel edges."""
    n, m = 203, 150
    x = randn(gen, n, 7, dtype=dtype, requires_grad=True)
    y = randn(gen, m, 7, dtype=dtype, requires_grad=True)
    scale = torch.tensor(20.0, dtype=dtype, requires_grad=True)
    xm, ym = (rand_mask(gen, n, p=0.7), rand_mask(gen, m, p=0.7)) if masks else (None, None)
    rest = extras(gen, n, m, "cpu", 7) if more else ()
    with _ops.forced_lse_tile_rows(5):
        _check(x, y, xm, ym, scale, True, with_columns, rest, gen, dtype)


@pytest.mark.parametrize("n,m", [(1000, 1300), (517, 33), (3, 2100)])
def test_automatic_tiles_match_dense(gen, threads, n, m):
    """The automatic tiles (256 rows, column blocks sized so that every worker gets one), odd
    edges, float32 both directions: the one-exp epilogues on every tile."""
    x = randn(gen, n, 9, requires_grad=True)
    y = randn(gen, m, 9, requires_grad=True)
    scale = torch.tensor(14.0, requires_grad=True)
    _check(x, y, None, None, scale, True, True, (), gen, torch.float32)


@pytest.mark.parametrize("with_columns", [True, False], ids=["columns", "rows"])
def test_one_exp_falls_back_where_a_tile_spans_too_wide_a_range(gen, threads, with_columns):
    """Raw (unnormalised) rows of very different norms: in some tiles one row's or column's
    largest logit lies ~100 below the tile's largest, and so do the LSEs of the backward. A
    single shift would underflow there (exp(-100) is 0 in float32); those tiles must shift
    each direction by its own maxima, the others may share one exp."""
    n, m = 64, 48
    x = randn(gen, n, 6, dtype=torch.float64)
    y = randn(gen, m, 6, dtype=torch.float64)
    x[::3] *= 30.0  # every third anchor and every fourth candidate: logits ~100x the others
    y[::4] *= 30.0
    x = x.float().requires_grad_()
    y = y.float().requires_grad_()
    scale = torch.tensor(0.3, requires_grad=True)
    # the scale gradient sums expected logits of up to thousands weighted by random-sign upstream
    # gradients, and may cancel to ~1e-4 of its terms: relative to the result, its float32 error
    # reached 1e-2 in 4000 draws (2.5e-3 failed CI at 1e-3), relative to the terms 1.5e-5 at most
    with _ops.forced_lse_tile_rows(8):
        _check(x, y, None, None, scale, False, with_columns, (), gen, torch.float32, scale_grad_of_terms=2e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("scale", [0.0, float("nan"), float("inf")])
def test_degenerate_scales_give_what_the_scaled_logits_give(gen, dtype, scale):
    """The scale is the logits GEMM's alpha only where it is finite and nonzero (BLAS may skip
    the product for other alphas): a NaN scale makes every LSE NaN, a zero one keeps the NaN of a
    NaN anchor in its row and in every column, as scale * x_hat @ y_hat.T does."""
    x, y = randn(gen, 6, 3, dtype=dtype), randn(gen, 5, 3, dtype=dtype)
    x[2, 1] = float("nan")
    row, col = lse(_ops.contrastive_lse, x, y, None, None, scale, False, True)
    s = torch.tensor(scale, dtype=torch.float64) * x.double() @ y.double().T
    torch.testing.assert_close(row.double(), torch.logsumexp(s, 1), equal_nan=True)
    torch.testing.assert_close(col.double(), torch.logsumexp(s, 0), equal_nan=True)
