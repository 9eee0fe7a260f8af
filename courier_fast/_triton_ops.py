"""torch.library ops around the Triton kernels in kernels/ (installed as courier_fast.kernels).

Same contract as the compiled op courier_fast::contrastive_lse; LSEs are always float32.
Imported only when triton is installed.
"""
from typing import Optional

import torch
from torch import Tensor

from courier_fast.kernels import contrastive_lse as _k

INTERPRET = _k.INTERPRET


@torch.library.custom_op("courier_fast::contrastive_lse_triton", mutates_args=())
def contrastive_lse(x: Tensor, y: Tensor, x_mask: Optional[Tensor], y_mask: Optional[Tensor],
                    scale: float, normalize: bool, with_columns: bool) -> tuple[Tensor, Tensor]:
    return _k.lse_forward(x, y, x_mask, y_mask, scale, normalize, with_columns)


@contrastive_lse.register_fake
def _(x, y, x_mask, y_mask, scale, normalize, with_columns):
    return (x.new_empty(x.shape[0], dtype=torch.float32),
            x.new_empty(y.shape[0] if with_columns else 0, dtype=torch.float32))


@torch.library.custom_op("courier_fast::contrastive_lse_triton_backward", mutates_args=())
def contrastive_lse_backward(grad_row: Tensor, grad_col: Tensor, x: Tensor, y: Tensor,
                             x_mask: Optional[Tensor], y_mask: Optional[Tensor], row_lse: Tensor,
                             col_lse: Tensor, scale: float, normalize: bool,
                             with_columns: bool) -> tuple[Tensor, Tensor]:
    return _k.lse_backward(grad_row, grad_col, x, y, x_mask, y_mask, row_lse, col_lse, scale,
                           normalize, with_columns)


@contrastive_lse_backward.register_fake
def _(grad_row, grad_col, x, y, x_mask, y_mask, row_lse, col_lse, scale, normalize, with_columns):
    return torch.empty_like(x), torch.empty_like(y)


def _setup_context(ctx, inputs, output):
    x, y, x_mask, y_mask, scale, normalize, with_columns = inputs
    ctx.save_for_backward(x, y, x_mask, y_mask, *output)
    ctx.scale, ctx.normalize, ctx.with_columns = scale, normalize, with_columns


def _backward(ctx, grad_row, grad_col):
    x, y, x_mask, y_mask, row_lse, col_lse = ctx.saved_tensors
    grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row
    grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col
    gx, gy = contrastive_lse_backward(grad_row, grad_col, x, y, x_mask, y_mask, row_lse, col_lse,
                                      ctx.scale, ctx.normalize, ctx.with_columns)
    return gx, gy, None, None, None, None, None


contrastive_lse.register_autograd(_backward, setup_context=_setup_context)
