"""torch.library ops around the Triton kernels in kernels/ (installed as courier_fast.kernels).

contrastive_lse: same contract as the compiled op courier_fast::contrastive_lse (LSEs float32).
attention_core: the reconstruction-attention core, see kernels/reconstruction_attention.py.
Imported only when triton is installed.
"""
from typing import Optional

import torch
from torch import Tensor

from courier_fast.ops.backends import arg_checks as _op_checks
from courier_fast.ops.backends.compiled import register_attention_autograd, register_lse_autograd
from courier_fast.ops.attention_layout import Segments
from courier_fast.kernels import contrastive_lse as _k
from courier_fast.kernels import reconstruction_attention as _attn

INTERPRET = _k.INTERPRET
contrastive_supports = _k.supports  # (anchors) -> bool: fp32 only up to d = FP32_MAX_D on a GPU
attention_supports = _attn.supports  # (targets, num_heads) -> bool: the dtype / head-dim limits


@torch.library.custom_op("courier_fast::contrastive_lse_triton", mutates_args=())
def contrastive_lse(x: Tensor, y: Tensor, x_mask: Optional[Tensor], y_mask: Optional[Tensor],
                    y_logq: Optional[Tensor], x_ids: Optional[Tensor], y_ids: Optional[Tensor], id_offset: int,
                    scale: Tensor, normalize: bool, with_columns: bool) -> tuple[Tensor, Tensor]:
    _op_checks.contrastive_lse_args(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, scale)
    return _k.lse_forward(x, y, x_mask, y_mask, scale, normalize, with_columns, y_logq=y_logq, x_ids=x_ids,
                          y_ids=y_ids, id_offset=id_offset)


@contrastive_lse.register_fake
def _(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize, with_columns):
    return (x.new_empty(x.shape[0], dtype=torch.float32),
            x.new_empty(y.shape[0] if with_columns else 0, dtype=torch.float32))


@torch.library.custom_op("courier_fast::contrastive_lse_triton_backward", mutates_args=())
def contrastive_lse_backward(grad_row: Tensor, grad_col: Tensor, x: Tensor, y: Tensor,
                             x_mask: Optional[Tensor], y_mask: Optional[Tensor], y_logq: Optional[Tensor],
                             x_ids: Optional[Tensor], y_ids: Optional[Tensor], id_offset: int,
                             row_lse: Tensor, col_lse: Tensor, scale: Tensor, normalize: bool,
                             with_columns: bool) -> tuple[Tensor, Tensor, Tensor]:
    _op_checks.contrastive_lse_args(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, scale)
    _op_checks.contrastive_lse_backward_args(grad_row, grad_col, row_lse, col_lse, x, y.shape[0], with_columns)
    gx, gy, gs = _k.lse_backward(grad_row, grad_col, x, y, x_mask, y_mask, row_lse, col_lse, scale, normalize,
                                 with_columns, y_logq=y_logq, x_ids=x_ids, y_ids=y_ids, id_offset=id_offset)
    return gx, gy, gs.to(scale.dtype).reshape(scale.shape)


@contrastive_lse_backward.register_fake
def _(grad_row, grad_col, x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, row_lse, col_lse, scale,
      normalize, with_columns):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)


register_lse_autograd(contrastive_lse, contrastive_lse_backward)


def _segments(target_rows, key_rows, target_offsets, key_offsets, order, key_padding_mask,
              max_targets, max_keys):
    return Segments(target_rows, key_rows, target_offsets, key_offsets, order, key_padding_mask,
                    max_targets, max_keys)


@torch.library.custom_op("courier_fast::attention_core_triton", mutates_args=())
def attention_core(q: Tensor, k: Tensor, v: Tensor, target_rows: Tensor, key_rows: Tensor,
                   target_offsets: Tensor, key_offsets: Tensor, order: Tensor,
                   key_padding_mask: Optional[Tensor], causal: int, sm_scale: float,
                   max_targets: int, max_keys: int) -> tuple[Tensor, Tensor]:
    """q (T, h, dh), k/v (S, h, dh) views over the segments (courier_fast.ops.attention_layout) ->
    O (T, h*dh), LSE (T, h), both float32 (O unrounded: the backward's delta needs it; the caller
    casts it for the out-projection). causal: 0 none, 1 strict (s < t), 2 inclusive (s <= t)."""
    _op_checks.attention_core_args(q, k, v, target_rows, key_rows, target_offsets, key_offsets, order,
                                   key_padding_mask, causal, max_targets, max_keys)
    seg = _segments(target_rows, key_rows, target_offsets, key_offsets, order, key_padding_mask,
                    max_targets, max_keys)
    return _attn.attention_forward(q, k, v, seg, causal, sm_scale)


@attention_core.register_fake
def _(q, k, v, target_rows, key_rows, target_offsets, key_offsets, order, key_padding_mask, causal,
      sm_scale, max_targets, max_keys):
    t, h, dh = q.shape
    return q.new_empty(t, h * dh, dtype=torch.float32), q.new_empty(t, h, dtype=torch.float32)


@torch.library.custom_op("courier_fast::attention_core_triton_backward", mutates_args=())
def attention_core_backward(grad_o: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                            target_rows: Tensor, key_rows: Tensor, target_offsets: Tensor,
                            key_offsets: Tensor, order: Tensor, key_padding_mask: Optional[Tensor],
                            causal: int, sm_scale: float, max_targets: int,
                            max_keys: int) -> tuple[Tensor, Tensor, Tensor]:
    _op_checks.attention_core_args(q, k, v, target_rows, key_rows, target_offsets, key_offsets, order,
                                   key_padding_mask, causal, max_targets, max_keys)
    _op_checks.attention_core_backward_args(grad_o, q, o, lse, torch.float32)
    seg = _segments(target_rows, key_rows, target_offsets, key_offsets, order, key_padding_mask,
                    max_targets, max_keys)
    return _attn.attention_backward(grad_o.contiguous(), q, k, v, o, lse, seg, causal, sm_scale)


@attention_core_backward.register_fake
def _(grad_o, q, k, v, o, lse, target_rows, key_rows, target_offsets, key_offsets, order,
      key_padding_mask, causal, sm_scale, max_targets, max_keys):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape))


register_attention_autograd(attention_core, attention_core_backward)
