"""torch.library ops around the Triton kernels in kernels/ (installed as courier_fast.kernels).

Same contract as the compiled op courier_fast::contrastive_lse; LSEs are always float32.
Imported only when triton is installed.
"""
from typing import Optional

import torch
from torch import Tensor

from courier_fast._ops import register_lse_autograd
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


register_lse_autograd(contrastive_lse, contrastive_lse_backward)
