"""torch.library glue for the compiled ops: fake (meta) kernels and autograd.

Schemas live in csrc/courier_fast.cpp, device kernels in csrc/*.cpp (CPU) and csrc/cuda/*.cu
(CUDA). Registering fake kernels and autograd here lets torch.compile trace the ops and
torch.library.opcheck verify them.
"""
import torch

from courier_fast import _extension
from courier_fast.reference import compute_dtype

LSE = "courier_fast::contrastive_lse"


def contrastive_lse(x, y, x_mask, y_mask, scale, normalize, with_columns):
    """Row (and optionally column) masked LSE of scale * x_hat @ y_hat.T; see the C++ schema."""
    return torch.ops.courier_fast.contrastive_lse(x, y, x_mask, y_mask, scale, normalize, with_columns)


def register_lse_autograd(op, backward_op):
    """Autograd for a masked-LSE op (compiled or Triton): save inputs and LSEs, then call the
    backend's backward op, which recomputes the tiles; gradients flow to x and y only."""

    def setup_context(ctx, inputs, output):
        x, y, x_mask, y_mask, scale, normalize, with_columns = inputs
        ctx.save_for_backward(x, y, x_mask, y_mask, *output)
        ctx.scale, ctx.normalize, ctx.with_columns = scale, normalize, with_columns

    def backward(ctx, grad_row, grad_col):
        x, y, x_mask, y_mask, row_lse, col_lse = ctx.saved_tensors
        grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row
        grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col
        grad_x, grad_y = backward_op(grad_row, grad_col, x, y, x_mask, y_mask, row_lse, col_lse,
                                     ctx.scale, ctx.normalize, ctx.with_columns)
        return grad_x, grad_y, None, None, None, None, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


if _extension.loaded():

    @torch.library.register_fake(LSE)
    def _lse_fake(x, y, x_mask, y_mask, scale, normalize, with_columns):
        dt = compute_dtype(x.dtype)
        return x.new_empty(x.shape[0], dtype=dt), x.new_empty(y.shape[0] if with_columns else 0, dtype=dt)

    @torch.library.register_fake("courier_fast::contrastive_lse_backward")
    def _lse_backward_fake(grad_row, grad_col, x, y, x_mask, y_mask, row_lse, col_lse, scale,
                           normalize, with_columns):
        return torch.empty_like(x), torch.empty_like(y)

    register_lse_autograd(LSE, torch.ops.courier_fast.contrastive_lse_backward)
