"""torch.library glue for the compiled ops: fake (meta) kernels and autograd.

Schemas live in csrc/courier_fast.cpp, device kernels in csrc/*.cpp (CPU) and csrc/cuda/*.cu
(CUDA). Registering fake kernels and autograd here lets torch.compile trace the ops and
torch.library.opcheck verify them.
"""
import contextlib

import torch

from courier_fast import _extension
from courier_fast.ops.reference import compute_dtype

LSE = "courier_fast::contrastive_lse"


def contrastive_lse(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize, with_columns):
    """Row (and optionally column) masked LSE of scale * x_hat @ y_hat.T (scale a 0-d tensor),
    minus y_logq in the row direction, without accidental hits; see the C++ schema."""
    return torch.ops.courier_fast.contrastive_lse(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale,
                                                  normalize, with_columns)


@contextlib.contextmanager
def forced_lse_tile_rows(rows):
    """Inside the block, every courier_fast::contrastive_lse call (forward and backward, CPU and
    CUDA, any thread of this process) works on logits tiles of `rows` anchor rows instead of the
    automatic size, so small problems take the multi-tile path; the previous setting comes back
    on exit. A backward takes the setting current when it runs: run it inside the block too.
    For tests and the self-check (see csrc/contrastive_lse.h); rows: int >= 1."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"forced_lse_tile_rows: rows must be an int >= 1, got {rows!r}")
    previous = torch.ops.courier_fast.set_lse_tile_rows(rows)
    try:
        yield
    finally:
        torch.ops.courier_fast.set_lse_tile_rows(previous)


def register_lse_autograd(op, backward_op):
    """Autograd for a masked-LSE op (compiled or Triton): save inputs and LSEs, then call the
    backend's backward op, which recomputes the tiles; gradients flow to x, y and scale."""

    def setup_context(ctx, inputs, output):
        x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize, with_columns = inputs
        ctx.save_for_backward(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, scale, *output)
        ctx.id_offset, ctx.normalize, ctx.with_columns = id_offset, normalize, with_columns

    def backward(ctx, grad_row, grad_col):
        x, y, x_mask, y_mask, y_logq, x_ids, y_ids, scale, row_lse, col_lse = ctx.saved_tensors
        grad_row = torch.zeros_like(row_lse) if grad_row is None else grad_row
        grad_col = torch.zeros_like(col_lse) if grad_col is None else grad_col
        grad_x, grad_y, grad_scale = backward_op(grad_row, grad_col, x, y, x_mask, y_mask, y_logq, x_ids, y_ids,
                                                 ctx.id_offset, row_lse, col_lse, scale, ctx.normalize,
                                                 ctx.with_columns)
        return grad_x, grad_y, None, None, None, None, None, None, grad_scale, None, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def register_attention_autograd(op, backward_op):
    """Autograd for an attention-core op (compiled or Triton): gradients to q, k and v; the
    segment table, mask and scalars pass through to the backward op."""

    def setup_context(ctx, inputs, output):
        q, k, v, *index, key_padding_mask, causal, sm_scale, max_targets, max_keys = inputs
        ctx.save_for_backward(q, k, v, *output, *index, key_padding_mask)
        ctx.scalars = (causal, sm_scale, max_targets, max_keys)

    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, *index, key_padding_mask = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, *index, key_padding_mask, *ctx.scalars)
        return dq, dk, dv, *([None] * 10)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def attention_core(q, k, v, target_rows, key_rows, target_offsets, key_offsets, order,
                   key_padding_mask, causal, sm_scale, max_targets, max_keys):
    """Compiled (CUDA) attention core; see the schema in csrc/courier_fast.cpp."""
    return torch.ops.courier_fast.attention_core(q, k, v, target_rows, key_rows, target_offsets,
                                                 key_offsets, order, key_padding_mask, causal,
                                                 sm_scale, max_targets, max_keys)


if _extension.loaded():

    @torch.library.register_fake(LSE)
    def _lse_fake(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize, with_columns):
        dt = compute_dtype(x.dtype)
        return x.new_empty(x.shape[0], dtype=dt), x.new_empty(y.shape[0] if with_columns else 0, dtype=dt)

    @torch.library.register_fake("courier_fast::contrastive_lse_backward")
    def _lse_backward_fake(grad_row, grad_col, x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, row_lse,
                           col_lse, scale, normalize, with_columns):
        return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)

    register_lse_autograd(LSE, torch.ops.courier_fast.contrastive_lse_backward)

    @torch.library.register_fake("courier_fast::attention_core")
    def _attention_fake(q, k, v, target_rows, key_rows, target_offsets, key_offsets, order,
                        key_padding_mask, causal, sm_scale, max_targets, max_keys):
        t, h, dh = q.shape
        dt = compute_dtype(q.dtype)  # O and LSE in the accumulation type (O unrounded for the backward)
        return q.new_empty(t, h * dh, dtype=dt), q.new_empty(t, h, dtype=dt)

    @torch.library.register_fake("courier_fast::attention_core_backward")
    def _attention_backward_fake(grad_out, q, k, v, out, lse, target_rows, key_rows, target_offsets,
                                 key_offsets, order, key_padding_mask, causal, sm_scale, max_targets,
                                 max_keys):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    register_attention_autograd("courier_fast::attention_core",
                                torch.ops.courier_fast.attention_core_backward)
