"""torch.library glue for the compiled ops: fake (meta) kernels and autograd.

Schemas live in csrc/courier_fast.cpp, device kernels in csrc/*.cpp (CPU) and csrc/cuda/*.cu
(CUDA). Registering fake kernels and autograd here lets torch.compile trace the ops and
torch.library.opcheck verify them.
"""
import contextlib
import math

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


def contrastive_row_lse_with_grad(x, y, y_mask, y_logq, ids, scale, normalize, row_grad):
    """contrastive_lse's row LSE (no columns, no x_mask, ids on both sides, offset 0), (N,), from
    the CPU op that computes its gradient in the same pass (csrc/contrastive_lse_cpu_fused.cpp):
    3 GEMMs over the logits instead of the op's and its backward's 4. For a loss whose upstream
    gradient will be c * row_grad, c a scalar the backward learns (a mean or sum over the anchor
    weights row_grad, (N,) float). The backward scales the saved gradients by c where grad_row
    equals c * row_grad (each entry to 4 ulps; every LSE finite or -inf) and otherwise runs
    contrastive_lse_backward, which recomputes: the gradients are the op's either way.

    None where this path does not apply, for the caller to use contrastive_lse: no gradient is
    needed, not a CPU tensor, tracing under torch.compile, or the blocks would not fit
    (courier_fast::lse_fused_rows). Not twice differentiable (neither is the op's backward)."""
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, scale))):
        return None
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if torch.ops.courier_fast.lse_fused_rows(y.shape[0], y.shape[1], compute_dtype(x.dtype) == torch.float64) <= 0:
        return None
    return _RowLseWithGrad.apply(x, y, y_mask, y_logq, ids, scale, normalize, row_grad)


class _RowLseWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, y_mask, y_logq, ids, scale, normalize, row_grad):
        row_grad = row_grad.detach().to(compute_dtype(x.dtype))
        lse, gx, gy, gs = torch.ops.courier_fast.contrastive_lse_and_grad(x, y, None, y_mask, y_logq, ids, ids, 0,
                                                                          scale, normalize, row_grad)
        ctx.save_for_backward(x, y, y_mask, y_logq, ids, scale, lse, row_grad, gx, gy, gs)
        ctx.normalize = normalize
        return lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_row):
        x, y, y_mask, y_logq, ids, scale, lse, row_grad, gx, gy, gs = ctx.saved_tensors
        if grad_row is None:
            return (None,) * 8
        # a number computed in C++ from the CPU tensors (no host read through a tensor)
        c = torch.ops.courier_fast.lse_grad_proportion(grad_row.to(lse.dtype), row_grad, lse)
        if not math.isnan(c):
            return gx * c, gy * c, None, None, None, gs * c, None, None
        none = lse.new_zeros(0)
        gx, gy, gs = torch.ops.courier_fast.contrastive_lse_backward(grad_row, none, x, y, None, y_mask, y_logq, ids,
                                                                     ids, 0, lse, none, scale, ctx.normalize, False)
        return gx, gy, None, None, None, gs, None, None


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
