"""The compiled op courier_fast::contrastive_lse: its contract, opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import courier_fast as cf
from courier_fast import _ops

from conftest import rand_mask, randn, requires_cuda

pytestmark = pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built")


def dense_lse(x, y, x_mask, y_mask, scale, normalize):
    x, y = x.double(), y.double()
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    s = scale * x @ y.T
    row = s.masked_fill(~y_mask[None, :], float("-inf")) if y_mask is not None else s
    col = s.masked_fill(~x_mask[:, None], float("-inf")) if x_mask is not None else s
    return torch.logsumexp(row, 1), torch.logsumexp(col, 0)


@pytest.mark.parametrize("n,m", [(1, 1), (5, 300), (300, 5), (1500, 70)])  # 1500 rows: several tiles
@pytest.mark.parametrize("normalize", [True, False])
def test_rows_and_columns_match_dense(gen, n, m, normalize):
    x, y = randn(gen, n, 6, dtype=torch.float64), randn(gen, m, 6, dtype=torch.float64)
    xm, ym = rand_mask(gen, n, p=0.6), rand_mask(gen, m, p=0.6)
    row, col = _ops.contrastive_lse(x, y, xm, ym, 3.0, normalize, True)
    want_row, want_col = dense_lse(x, y, xm, ym, 3.0, normalize)
    torch.testing.assert_close(row, want_row)  # -inf where a mask is all false
    torch.testing.assert_close(col, want_col)


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


@requires_cuda
@pytest.mark.cuda
def test_opcheck_cuda(gen):
    for args in _opcheck_samples(gen, "cuda"):
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


def _triton_usable():
    from courier_fast import dispatch
    return dispatch.op_backends("contrastive_loss")["triton"][0]


@pytest.mark.skipif(not _triton_usable(), reason="triton backend not usable here")
def test_opcheck_triton(gen):
    from courier_fast import _triton_ops
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for args in _opcheck_samples(gen, device):
        torch.library.opcheck(_triton_ops.contrastive_lse, args)


@pytest.mark.skipif(not _triton_usable(), reason="triton backend not usable here")
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (33, 17, 300), (5, 70, 16)])  # d=300: feature loop
def test_triton_rows_and_columns_match_dense(gen, n, m, d):
    from courier_fast import _triton_ops
    x, y = randn(gen, n, d), randn(gen, m, d)
    xm, ym = rand_mask(gen, n, p=0.6), rand_mask(gen, m, p=0.6)
    row, col = _triton_ops.contrastive_lse(x, y, xm, ym, 20.0, True, True)
    want_row, want_col = dense_lse(x, y, xm, ym, 20.0, True)
    torch.testing.assert_close(row.double(), want_row, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(col.double(), want_col, rtol=1e-5, atol=1e-5)
