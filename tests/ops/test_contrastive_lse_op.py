"""The compiled op courier_fast::contrastive_lse (CPU and CUDA) and its Triton twin: the contract
against a float64 dense reference (forced multi-tile runs included), opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import courier_fast as cf
from courier_fast import _extension
from courier_fast.ops.backends import compiled as _ops

from courier_fast.ops.selfcheck import tolerances
from conftest import TOL, rand_mask, randn, requires_cuda

pytestmark = pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built")

# The compiled op on a CUDA device: needs a GPU and a _C built with the CUDA sources.
CUDA_OP = [requires_cuda, pytest.mark.cuda,
           pytest.mark.skipif(not _extension.cuda_compiled(), reason="courier_fast._C built without CUDA")]
COMPILED_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=CUDA_OP)]


def _lse_over(s, keep, dim):
    """logsumexp of s over the entries where keep (bool, s's shape) is True, along dim; a constant
    -inf with no gradient where nothing is kept (the op's contract for an empty set)."""
    some = keep.any(dim, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~some, 0.0)
    return torch.logsumexp(s, dim).masked_fill(~some.squeeze(dim), float("-inf"))


def dense_lse(x, y, x_mask, y_mask, scale, normalize, y_logq=None, x_ids=None, y_ids=None, id_offset=0):
    """float64 (row_lse (N,), col_lse (M,)) of S = scale * x_hat @ y_hat.T from the whole N x M
    matrix, differentiable w.r.t. x (N, d), y (M, d) and a tensor scale; masks (N,) / (M,) bool
    or None; y_logq (M,) subtracted in the row direction only; (j, i) with x_ids[j] == y_ids[i]
    and i != j + id_offset left out of both directions."""
    x, y = x.double(), y.double()
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    s = scale * x @ y.T
    everything = torch.ones_like(s, dtype=torch.bool)
    keep_cols = everything if y_mask is None else y_mask[None, :].expand_as(s)
    keep_rows = everything if x_mask is None else x_mask[:, None].expand_as(s)
    if x_ids is not None:
        n, m = s.shape
        own = torch.arange(m)[None, :] == torch.arange(n)[:, None] + id_offset
        kept = (x_ids.cpu()[:, None] != y_ids.cpu()[None, :]) | own
        keep_cols, keep_rows = keep_cols & kept.to(s.device), keep_rows & kept.to(s.device)
    row_s = s if y_logq is None else s - y_logq.double()[None, :]
    return _lse_over(row_s, keep_cols, 1), _lse_over(s, keep_rows, 0)


def lse(op, x, y, x_mask, y_mask, scale, normalize, with_columns, y_logq=None, x_ids=None, y_ids=None,
        id_offset=0):
    """op (courier_fast::contrastive_lse or its Triton twin) with a number scale as a 0-d tensor."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                             device=x.device)
    return op(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize, with_columns)


def extras(gen, n, m, device, offset):
    """(y_logq (M,), x_ids (N,), y_ids (M,), id_offset) with many repeated ids (4 values)."""
    return (randn(gen, m, dtype=torch.float64, device=device), torch.randint(0, 4, (n,), generator=gen).to(device),
            torch.randint(0, 4, (m,), generator=gen).to(device), offset)


@pytest.mark.parametrize("n,m", [(1, 1), (5, 300), (300, 5), (1500, 70)])  # automatic tiles: one each
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("offset", [None, 0, 3, -2, "none"])  # None: no ids or logq; "none": no positive here
def test_rows_and_columns_match_dense(gen, n, m, normalize, offset):
    x, y = randn(gen, n, 6, dtype=torch.float64), randn(gen, m, 6, dtype=torch.float64)
    xm, ym = rand_mask(gen, n, p=0.6), rand_mask(gen, m, p=0.6)
    more = () if offset is None else extras(gen, n, m, "cpu", m if offset == "none" else offset)
    row, col = lse(_ops.contrastive_lse, x, y, xm, ym, 3.0, normalize, True, *more)
    want_row, want_col = dense_lse(x, y, xm, ym, 3.0, normalize, *more)
    torch.testing.assert_close(row, want_row)  # -inf where a mask is all false
    torch.testing.assert_close(col, want_col)


N_TILED, M_TILED = 23, 11  # 23 anchor rows: forced tiles of 1, 3, 7 rows give 23, 8, 4 tiles


def _tiled_masks(gen, kind, tile, device):
    """(x_mask, y_mask) for N_TILED x M_TILED. random: the first tile's anchors all masked out (the
    running column max is -inf after it, finite after the next) and every LSE finite; empty:
    nothing kept, every LSE -inf."""
    if kind == "none":
        return None, None
    xm, ym = rand_mask(gen, N_TILED, p=0.6), rand_mask(gen, M_TILED, p=0.6)
    if kind == "random":
        xm[:tile], xm[tile], ym[0] = False, True, True
    else:
        xm[:], ym[:] = False, False
    return xm.to(device), ym.to(device)


def _assert_close(got, want, dtype):
    """Against the float64 reference at the dtype's tolerance (conftest.TOL), atol relative to the
    tensor's largest magnitude (gradients reach ~scale)."""
    rtol, atol = TOL[dtype]
    finite = want[torch.isfinite(want)]
    size = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * size)


@pytest.fixture
def ieee_fp32_matmul():
    """fp32 GEMMs in IEEE fp32 (PyTorch's default; TF32 would be ~1e-3 off), restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.usefixtures("ieee_fp32_matmul")
@pytest.mark.parametrize("device", COMPILED_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("tile", [1, 3, 7])
@pytest.mark.parametrize("masks", ["none", "random", "empty"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("with_columns", [True, False], ids=["columns", "rows"])
@pytest.mark.parametrize("more", [False, True], ids=["plain", "ids+logq"])
def test_forced_tiles_match_dense(gen, device, dtype, tile, masks, normalize, with_columns, more):
    """Several row tiles per call (forced_lse_tile_rows): the online column LSE carried across
    tiles and the gradients summed over tiles equal the float64 dense reference, forward and
    backward, for x, y and the scale (a tensor); ids+logq: accidental hits across tiles (repeated
    ids, the positive of row j at column j + 2) and logQ in the row direction."""
    n, m = N_TILED, M_TILED
    x = randn(gen, n, 5, dtype=dtype, device=device, requires_grad=True)
    y = randn(gen, m, 5, dtype=dtype, device=device, requires_grad=True)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(20.0 if normalize else 0.5, dtype=cdt, device=device, requires_grad=True)
    xm, ym = _tiled_masks(gen, masks, tile, device)
    rest = extras(gen, n, m, device, 2) if more else ()
    g = randn(gen, n, dtype=torch.float64, device=device)  # upstream gradients of the LSEs
    h = randn(gen, m, dtype=torch.float64, device=device)
    tile_rows = torch.ops.courier_fast.lse_tile_rows
    assert tile_rows(n, m, device == "cuda") == n  # automatically this problem is one tile
    with _ops.forced_lse_tile_rows(tile):
        assert tile_rows(n, m, device == "cuda") == tile  # ceil(23 / tile) >= 4 tiles
        row, col = lse(_ops.contrastive_lse, x, y, xm, ym, scale, normalize, with_columns, *rest)
        outs, grads = ((row, col), (g.to(row.dtype), h.to(col.dtype))) if with_columns else ((row,), (g.to(row.dtype),))
        gx, gy, gs = torch.autograd.grad(outs, (x, y, scale), grads)
    assert tile_rows(n, m, device == "cuda") == n  # the previous setting is back

    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    s64 = scale.detach().double().requires_grad_()
    want_row, want_col = dense_lse(x64, y64, xm, ym, s64, normalize, *rest)
    want_outs = (want_row, want_col) if with_columns else (want_row,)
    want_gx, want_gy, want_gs = torch.autograd.grad(want_outs, (x64, y64, s64), (g, h)[:len(want_outs)],
                                                    allow_unused=True)
    assert gx.dtype == gy.dtype == dtype and gs.dtype == cdt and gs.shape == ()
    assert row.dtype == cdt
    _assert_close(row, want_row, dtype)
    if with_columns:
        _assert_close(col, want_col, dtype)
    else:
        assert col.numel() == 0
    _assert_close(gx, want_gx, dtype)
    _assert_close(gy, want_gy, dtype)
    if masks == "empty":  # every LSE is the constant -inf: no gradient at all
        assert torch.isneginf(row).all() and (gx == 0).all() and (gy == 0).all() and gs == 0
    else:
        _assert_close(gs, want_gs, dtype)


def test_forced_tile_rows_rejects_bad_values_and_restores_after_errors():
    tile_rows = torch.ops.courier_fast.lse_tile_rows
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="rows must be an int >= 1"):
            with _ops.forced_lse_tile_rows(bad):
                pass
    with pytest.raises(RuntimeError, match="rows must be >= 0"):
        torch.ops.courier_fast.set_lse_tile_rows(-1)
    with pytest.raises(KeyError):
        with _ops.forced_lse_tile_rows(2):
            assert tile_rows(10, 10, False) == 2
            raise KeyError("inside")
    assert tile_rows(10, 10, False) == 10


def test_without_columns_returns_empty(gen):
    row, col = lse(_ops.contrastive_lse, randn(gen, 4, 3), randn(gen, 9, 3), None, None, 1.0, True, False)
    assert row.shape == (4,) and row.dtype == torch.float32 and col.numel() == 0


def test_zero_vector_is_normalised_like_F_normalize(gen):
    x = randn(gen, 4, 3, dtype=torch.float64)
    x[2] = 0
    y = randn(gen, 5, 3, dtype=torch.float64)
    row, _ = lse(_ops.contrastive_lse, x, y, None, None, 2.0, True, False)
    torch.testing.assert_close(row, dense_lse(x, y, None, None, 2.0, True)[0])


def _opcheck_samples(gen, device="cpu"):
    x = randn(gen, 13, 5, device=device, requires_grad=True)
    y = randn(gen, 11, 5, device=device, requires_grad=True)
    xm, ym = rand_mask(gen, 13, device=device), rand_mask(gen, 11, device=device)
    scale = lambda v: torch.tensor(v, device=device, requires_grad=True)
    logq, x_ids, y_ids, _ = extras(gen, 13, 11, device, 0)
    return [(x, y, None, None, None, None, None, 0, scale(20.0), True, False),
            (x, y, xm, ym, None, None, None, 0, scale(20.0), True, True),
            (x, y, None, ym, logq.float(), x_ids, y_ids, 1, scale(0.5), False, True),
            (x, y, xm, None, None, x_ids, y_ids, 11, scale(3.0), True, True)]


def test_opcheck_cpu(gen):
    for args in _opcheck_samples(gen):
        torch.library.opcheck(torch.ops.courier_fast.contrastive_lse.default, args)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_OP)])
def test_opcheck_cuda(gen, device):
    for args in _opcheck_samples(gen, device):
        torch.library.opcheck(torch.ops.courier_fast.contrastive_lse.default, args)


def test_torch_compile_traces_the_loss(gen):
    """aot_eager runs the fake kernels and the registered autograd through the compiler stack."""
    torch._dynamo.reset()
    a = randn(gen, 20, 8, requires_grad=True)
    c = randn(gen, 20, 8, requires_grad=True)
    w = rand_mask(gen, 20)
    fn = lambda a, c: cf.contrastive_loss(a, c, anchor_weight=w, symmetric=True, backend="cpu")
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    got, want = compiled(a, c), fn(a, c)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (a, c)), torch.autograd.grad(want, (a, c)))


def test_op_rejects_mismatched_dims(gen):
    with pytest.raises(RuntimeError, match="same feature dim"):
        lse(_ops.contrastive_lse, randn(gen, 4, 3), randn(gen, 4, 5), None, None, 1.0, True, False)
    x, y = randn(gen, 4, 3), randn(gen, 5, 3)
    ids = torch.arange(4)
    for args, message, exc in (((None, ids, None), "both x_ids and y_ids", RuntimeError),
                               ((None, ids.int(), torch.arange(5).int()), "x_ids and y_ids must be int64",
                                TypeError),  # a wrong dtype is a TypeError (issue 30)
                               ((torch.zeros(4), None, None), "y_logq must be", RuntimeError),
                               ((None, ids, torch.arange(4)), "y_ids must be", RuntimeError)):
        with pytest.raises(exc, match=message):
            lse(_ops.contrastive_lse, x, y, None, None, 1.0, True, False, *args)
    with pytest.raises(RuntimeError, match="scale must be"):
        _ops.contrastive_lse(x, y, None, None, None, None, None, 0, torch.ones(2), True, False)


def _triton_device():
    """Where the Triton backend runs here: cuda on a GPU, cpu under TRITON_INTERPRET=1 (what
    conftest sets without a GPU); None when it cannot run."""
    from courier_fast.ops import dispatch
    if not dispatch.op_backends("contrastive_loss")["triton"][0]:
        return None
    from courier_fast.ops.backends import triton as _triton_ops
    return "cpu" if _triton_ops.INTERPRET else "cuda"


TRITON_DEVICE = _triton_device()
# On a GPU the Triton tests run on CUDA tensors and are marked cuda (the GPU session's -m cuda).
TRITON_MARKS = [pytest.mark.skipif(TRITON_DEVICE is None, reason="triton backend not usable here")] + (
    [pytest.mark.cuda] if TRITON_DEVICE == "cuda" else [])


def _triton_cases(shapes, dtypes):
    """(n, m, d, dtype) params for the cases the Triton backend launches on TRITON_DEVICE: its
    supports() declines fp32 wider than FP32_MAX_D on a GPU (those widths run in bf16 only)."""
    if TRITON_DEVICE is None:
        supports = lambda x: True  # every case, each skipped by TRITON_MARKS
    else:
        from courier_fast.ops.backends import triton as _triton_ops
        supports = _triton_ops.contrastive_supports
    return [pytest.param(n, m, d, dtype, id=f"{n}x{m}x{d}-{str(dtype).removeprefix('torch.')}", marks=TRITON_MARKS)
            for n, m, d in shapes for dtype in dtypes if supports(torch.empty(0, d, dtype=dtype))]


@pytest.mark.parametrize("device", [pytest.param(TRITON_DEVICE, marks=TRITON_MARKS)])
def test_opcheck_triton(gen, device):
    from courier_fast.ops.backends import triton as _triton_ops
    for args in _opcheck_samples(gen, device):  # fp32, d = 5: launched on every device
        torch.library.opcheck(_triton_ops.contrastive_lse, args)


# The reference takes the inputs as the kernels see them (bf16 values are exact in float64), so
# the error is the kernels' fp32 arithmetic (3xTF32 dots for fp32 on a GPU, ~1e-6 relative per
# product; fp32-accumulated MMA for bf16) on logits up to 20: fp32 gets conftest's fp32
# tolerance, bf16 5x that for the accumulation over d = 300. A wrong tile, mask or LSE is off by
# O(1).
TRITON_FWD_TOL = {torch.float32: TOL[torch.float32][0], torch.bfloat16: 1e-4}


@pytest.mark.parametrize("n,m,d,dtype", _triton_cases([(1, 1, 3), (33, 17, 300), (5, 70, 16)],
                                                      [torch.float32, torch.bfloat16]))
@pytest.mark.parametrize("offset", [None, 0, -3, "none"])  # None: no ids or logq; "none": no positive here
def test_triton_rows_and_columns_match_dense(gen, n, m, d, dtype, offset):  # d = 300: feature loop
    from courier_fast.ops.backends import triton as _triton_ops
    x, y = randn(gen, n, d, dtype=dtype, device=TRITON_DEVICE), randn(gen, m, d, dtype=dtype, device=TRITON_DEVICE)
    xm, ym = rand_mask(gen, n, p=0.6, device=TRITON_DEVICE), rand_mask(gen, m, p=0.6, device=TRITON_DEVICE)
    more = () if offset is None else extras(gen, n, m, TRITON_DEVICE, m if offset == "none" else offset)
    row, col = lse(_triton_ops.contrastive_lse, x, y, xm, ym, 20.0, True, True, *more)
    want_row, want_col = dense_lse(x, y, xm, ym, 20.0, True, *more)
    assert row.dtype == col.dtype == torch.float32
    tol = TRITON_FWD_TOL[dtype]
    torch.testing.assert_close(row.double(), want_row, rtol=tol, atol=tol)
    torch.testing.assert_close(col.double(), want_col, rtol=tol, atol=tol)


# Backward of the Triton op: fp32 (IEEE in the interpreter, 3xTF32 on a GPU) to fp32 accuracy;
# bf16's gradient GEMM takes dS rounded to bf16 (about 2^-9 relative), so its bar only catches a
# wrong mask, hit, chunk or scale (those are off by O(1)).
TRITON_BWD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("n,m,d,dtype", _triton_cases([(7, 5, 16), (20, 23, 100), (9, 13, 200), (19, 9, 384),
                                                       (8, 7, 500), (6, 11, 1100)], [torch.float32, torch.bfloat16]))
@pytest.mark.parametrize("with_columns", [True, False], ids=["columns", "rows"])
def test_triton_backward_matches_dense(gen, n, m, d, dtype, with_columns):
    """Gradients of x, y and the scale with masks, accidental hits (repeated ids, positives at
    column j + 1) and logQ, for every gradient-kernel layout: one block (d = 16, 100, 200 in the
    256 block, 500 in the 512 block), feature chunks (384 = 3 x 128) and feature groups (1100 >
    1024: grid axis 1)."""
    from courier_fast.ops.backends import triton as _triton_ops
    x = randn(gen, n, d, dtype=dtype, device=TRITON_DEVICE, requires_grad=True)
    y = randn(gen, m, d, dtype=dtype, device=TRITON_DEVICE, requires_grad=True)
    scale = torch.tensor(15.0, device=TRITON_DEVICE, requires_grad=True)
    xm, ym = rand_mask(gen, n, p=0.7, device=TRITON_DEVICE), rand_mask(gen, m, p=0.7, device=TRITON_DEVICE)
    more = extras(gen, n, m, TRITON_DEVICE, 1)
    g, h = randn(gen, n, dtype=torch.float64), randn(gen, m, dtype=torch.float64)
    row, col = lse(_triton_ops.contrastive_lse, x, y, xm, ym, scale, True, with_columns, *more)
    outs, ups = ((row, col), (g, h)) if with_columns else ((row,), (g,))
    keep = [torch.isfinite(o) for o in outs]  # an empty set's -inf has no gradient
    got = torch.autograd.grad(outs, (x, y, scale), [u.to(o.device, o.dtype) * k for u, o, k in zip(ups, outs, keep)])
    x64, y64, s64 = (t.detach().double().cpu().requires_grad_() for t in (x, y, scale))
    want_outs = dense_lse(x64, y64, xm.cpu(), ym.cpu(), s64, True, *(t.cpu() if isinstance(t, torch.Tensor) else t
                                                                     for t in more))[:len(outs)]
    want = torch.autograd.grad(want_outs, (x64, y64, s64), [u * k.cpu() for u, k in zip(ups, keep)])
    # d lse_j / d scale = E_p[cos] (|.| <= 1): the scale's gradient is a sum of n (+ m) terms of
    # size |g_j| that cancel under random g, so float32 rounding is relative to their size
    terms = sum((u.abs() * k.cpu()).sum().item() for u, k in zip(ups, keep))
    for what, a, b in zip(("x", "y", "scale"), got, want):
        assert a.dtype == (dtype if what != "scale" else torch.float32)
        err = tolerances.rel_error(a, b) if what != "scale" else \
            abs(a.item() - b.item()) / max(abs(b.item()), terms)
        assert err <= TRITON_BWD_TOL[dtype], f"{what}: {err:.3g}"
