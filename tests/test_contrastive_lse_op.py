"""The compiled op courier_fast::contrastive_lse (CPU and CUDA) and its Triton twin: the contract
against a float64 dense reference (forced multi-tile runs included), opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import courier_fast as cf
from courier_fast import _extension, _ops

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


def dense_lse(x, y, x_mask, y_mask, scale, normalize):
    """float64 (row_lse (N,), col_lse (M,)) of S = scale * x_hat @ y_hat.T from the whole N x M
    matrix, differentiable w.r.t. x (N, d) and y (M, d); masks (N,) / (M,) bool or None."""
    x, y = x.double(), y.double()
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    s = scale * x @ y.T
    everything = torch.ones_like(s, dtype=torch.bool)
    keep_cols = everything if y_mask is None else y_mask[None, :].expand_as(s)
    keep_rows = everything if x_mask is None else x_mask[:, None].expand_as(s)
    return _lse_over(s, keep_cols, 1), _lse_over(s, keep_rows, 0)


@pytest.mark.parametrize("n,m", [(1, 1), (5, 300), (300, 5), (1500, 70)])  # automatic tiles: one each
@pytest.mark.parametrize("normalize", [True, False])
def test_rows_and_columns_match_dense(gen, n, m, normalize):
    x, y = randn(gen, n, 6, dtype=torch.float64), randn(gen, m, 6, dtype=torch.float64)
    xm, ym = rand_mask(gen, n, p=0.6), rand_mask(gen, m, p=0.6)
    row, col = _ops.contrastive_lse(x, y, xm, ym, 3.0, normalize, True)
    want_row, want_col = dense_lse(x, y, xm, ym, 3.0, normalize)
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
def test_forced_tiles_match_dense(gen, device, dtype, tile, masks, normalize, with_columns):
    """Several row tiles per call (forced_lse_tile_rows): the online column LSE carried across
    tiles and the gradients summed over tiles equal the float64 dense reference, forward and
    backward, for x and y."""
    n, m, scale = N_TILED, M_TILED, (20.0 if normalize else 0.5)
    x = randn(gen, n, 5, dtype=dtype, device=device, requires_grad=True)
    y = randn(gen, m, 5, dtype=dtype, device=device, requires_grad=True)
    xm, ym = _tiled_masks(gen, masks, tile, device)
    g = randn(gen, n, dtype=torch.float64, device=device)  # upstream gradients of the LSEs
    h = randn(gen, m, dtype=torch.float64, device=device)
    tile_rows = torch.ops.courier_fast.lse_tile_rows
    assert tile_rows(n, m, device == "cuda") == n  # automatically this problem is one tile
    with _ops.forced_lse_tile_rows(tile):
        assert tile_rows(n, m, device == "cuda") == tile  # ceil(23 / tile) >= 4 tiles
        row, col = _ops.contrastive_lse(x, y, xm, ym, scale, normalize, with_columns)
        outs, grads = ((row, col), (g.to(row.dtype), h.to(col.dtype))) if with_columns else ((row,), (g.to(row.dtype),))
        gx, gy = torch.autograd.grad(outs, (x, y), grads)
    assert tile_rows(n, m, device == "cuda") == n  # the previous setting is back

    x64, y64 = (t.detach().double().requires_grad_() for t in (x, y))
    want_row, want_col = dense_lse(x64, y64, xm, ym, scale, normalize)
    want_outs = (want_row, want_col) if with_columns else (want_row,)
    want_gx, want_gy = torch.autograd.grad(want_outs, (x64, y64), (g, h)[:len(want_outs)])
    assert gx.dtype == gy.dtype == dtype
    assert row.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _assert_close(row, want_row, dtype)
    if with_columns:
        _assert_close(col, want_col, dtype)
    else:
        assert col.numel() == 0
    _assert_close(gx, want_gx, dtype)
    _assert_close(gy, want_gy, dtype)
    if masks == "empty":  # every LSE is the constant -inf: no gradient at all
        assert torch.isneginf(row).all() and (gx == 0).all() and (gy == 0).all()


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
    row, col = _ops.contrastive_lse(randn(gen, 4, 3), randn(gen, 9, 3), None, None, 1.0, True, False)
    assert row.shape == (4,) and row.dtype == torch.float32 and col.numel() == 0


def test_zero_vector_is_normalised_like_F_normalize(gen):
    x = randn(gen, 4, 3, dtype=torch.float64)
    x[2] = 0
    y = randn(gen, 5, 3, dtype=torch.float64)
    row, _ = _ops.contrastive_lse(x, y, None, None, 2.0, True, False)
    torch.testing.assert_close(row, dense_lse(x, y, None, None, 2.0, True)[0])


def _opcheck_samples(gen, device="cpu"):
    x = randn(gen, 13, 5, device=device, requires_grad=True)
    y = randn(gen, 11, 5, device=device, requires_grad=True)
    xm, ym = rand_mask(gen, 13, device=device), rand_mask(gen, 11, device=device)
    return [(x, y, None, None, 20.0, True, False), (x, y, xm, ym, 20.0, True, True),
            (x, y, None, ym, 0.5, False, True)]


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
        _ops.contrastive_lse(randn(gen, 4, 3), randn(gen, 4, 5), None, None, 1.0, True, False)


def _triton_device():
    """Where the Triton backend runs here: cuda on a GPU, cpu under TRITON_INTERPRET=1 (what
    conftest sets without a GPU); None when it cannot run."""
    from courier_fast import dispatch
    if not dispatch.op_backends("contrastive_loss")["triton"][0]:
        return None
    from courier_fast import _triton_ops
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
        from courier_fast import _triton_ops
        supports = _triton_ops.contrastive_supports
    return [pytest.param(n, m, d, dtype, id=f"{n}x{m}x{d}-{str(dtype).removeprefix('torch.')}", marks=TRITON_MARKS)
            for n, m, d in shapes for dtype in dtypes if supports(torch.empty(0, d, dtype=dtype))]


@pytest.mark.parametrize("device", [pytest.param(TRITON_DEVICE, marks=TRITON_MARKS)])
def test_opcheck_triton(gen, device):
    from courier_fast import _triton_ops
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
def test_triton_rows_and_columns_match_dense(gen, n, m, d, dtype):  # d = 300: feature loop
    from courier_fast import _triton_ops
    x, y = randn(gen, n, d, dtype=dtype, device=TRITON_DEVICE), randn(gen, m, d, dtype=dtype, device=TRITON_DEVICE)
    xm, ym = rand_mask(gen, n, p=0.6, device=TRITON_DEVICE), rand_mask(gen, m, p=0.6, device=TRITON_DEVICE)
    row, col = _triton_ops.contrastive_lse(x, y, xm, ym, 20.0, True, True)
    want_row, want_col = dense_lse(x, y, xm, ym, 20.0, True)
    assert row.dtype == col.dtype == torch.float32
    tol = TRITON_FWD_TOL[dtype]
    torch.testing.assert_close(row.double(), want_row, rtol=tol, atol=tol)
    torch.testing.assert_close(col.double(), want_col, rtol=tol, atol=tol)
