"""courier_fast.reconstruction_attention: the public op, its validation and its backends."""
import importlib.util
import math

import torch
import torch.nn.functional as F

from courier_fast import _extension, _validate
from courier_fast.ops.backends import compiled as _ops
from courier_fast.ops import attention_layout
from courier_fast.ops import dispatch
from courier_fast.ops import jagged  # noqa: F401  (cf.jagged: padded + lengths <-> values + offsets)
from courier_fast.ops.reference import reconstruction_attention_reference

OP = "reconstruction_attention"


def reconstruction_attention(targets, history, in_proj_weight, in_proj_bias, out_proj_weight,
                             out_proj_bias, num_heads, *, key_padding_mask=None, lengths=None,
                             causal=False, history_index=None, history_offsets=None,
                             target_offsets=None, max_history_len=None, backend="auto"):
    """Multi-head attention of each target over its row's history (docs/design.md §3.2).

    Layouts (courier_fast.ops.attention_layout; every backend takes every one, K/V are projected
    once per history item and never copied per target):
        padded:   targets (B, P, d), history (B, L, d) -> (B, P, d).
        history_index: targets (T, d) flat, history_index (T,) int64/int32 in [0, B): target t
                  attends over history row history_index[t] (the official COURIER call
                  `mha(q, hist[idx], hist[idx])` without the copy) -> (T, d).
        jagged:   history (S, d) values + history_offsets (B+1,) int32/int64 (row b is
                  history[history_offsets[b]:history_offsets[b+1]]); targets either (T, d) +
                  target_offsets (B+1,), or (T, d) + history_index, or padded (B, P, d) ->
                  the targets' shape. max_history_len: an int >= the longest history row (else
                  it is read from the offsets, one host read). See courier_fast.ops.jagged for
                  padded <-> jagged helpers.
        Host reads of the triton backend: with history_index or target_offsets and a history
        longer than 16 items (its flash kernels, whose grid spans the most targets in a row),
        the most targets in a row is read from the device once in the forward and once in the
        backward; padded targets and histories of at most 16 items read nothing.

    Args:
        targets, history: float16/bfloat16/32/64, same dtype and device, layouts above.
        in_proj_weight (3d, d), in_proj_bias (3d,) or None, out_proj_weight (d, d),
        out_proj_bias (d,) or None: nn.MultiheadAttention's parameters, in its layout.
        num_heads: divides d.
        key_padding_mask: None or bool, True = padding (nn.MultiheadAttention's rule): (B, L)
            for a padded history, (S,) for a jagged one.
        lengths: None or (B,) integer, 0 <= lengths <= L, for a right-padded history: items at
            positions >= lengths[b] are padding (combined with key_padding_mask if both given).
        causal: False; True or "strict": self-reconstruction, target t attends only to valid
            history positions s < t (history ordered oldest -> newest); "inclusive": t attends
            to valid s <= t (nn.MultiheadAttention's causal mask,
            torch.nn.Transformer.generate_square_subsequent_mask). Positions count within a row;
            needs as many targets as history items per row (P == L) and no history_index.
        backend: "auto" or a name from courier_fast.backends().

    Returns the targets' shape in the inputs' dtype. Equals nn.MultiheadAttention
    (batch_first=True) where a target has at least one valid key; a target with none gets
    out_proj_bias (or 0).
    """
    _check_args(targets, history, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                num_heads, key_padding_mask, causal, backend, history_index, history_offsets,
                target_offsets, max_history_len, lengths)
    if lengths is not None:
        key_padding_mask = _lengths_to_mask(lengths, history, key_padding_mask)
    fn = dispatch.select(OP, backend, targets.device,
                         probe={"targets": targets, "num_heads": num_heads})
    return fn(targets, history, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
              num_heads, key_padding_mask=key_padding_mask, causal=causal, history_index=history_index,
              history_offsets=history_offsets, target_offsets=target_offsets, max_history_len=max_history_len)


def _lengths_to_mask(lengths, history, key_padding_mask):
    b, length = history.shape[:2]
    _validate.tensor("lengths", lengths, ndim=1, dtypes=(torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8),
                     allow_empty=True)
    _validate.shape("lengths", lengths, (b,), "one length per history row")
    _validate.same_device("lengths", lengths, "history", history)
    if _validate._data_checks_on() and b and (int(lengths.min()) < 0 or int(lengths.max()) > length):
        raise ValueError(f"lengths must lie in [0, L={length}], got [{int(lengths.min())}, {int(lengths.max())}]")
    mask = torch.arange(length, device=history.device)[None, :] >= lengths[:, None]
    return mask if key_padding_mask is None else mask | key_padding_mask


def _check_args(targets, history, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                num_heads, key_padding_mask, causal, backend, history_index, history_offsets,
                target_offsets, max_history_len, lengths):
    v = _validate
    v.tensor("targets", targets, allow_empty=True)
    v.tensor("history", history, allow_empty=True)
    if targets.dim() not in (2, 3):
        raise ValueError(f"targets must be 3-D (B, P, d) or 2-D (T, d), got shape {tuple(targets.shape)}")
    v.same_device("history", history, "targets", targets)
    v.same_dtype("history", history, "targets", targets)
    d = targets.shape[-1]
    if d == 0:
        raise ValueError(f"targets has embedding dimension 0 (shape {tuple(targets.shape)})")
    if history.dim() in (2, 3) and history.shape[-1] != d:
        raise ValueError(f"history has embedding dim {history.shape[-1]} but targets has {d}")
    num_heads = v.positive_int("num_heads", num_heads)
    if d % num_heads:
        raise ValueError(f"embed_dim {d} is not divisible by num_heads {num_heads}")
    params = (("in_proj_weight", in_proj_weight, (3 * d, d)), ("in_proj_bias", in_proj_bias, (3 * d,)),
              ("out_proj_weight", out_proj_weight, (d, d)), ("out_proj_bias", out_proj_bias, (d,)))
    for name, t, shape in params:
        if t is None and name.endswith("bias"):
            continue
        v.tensor(name, t)
        v.shape(name, t, shape, f"embed_dim d={d}")
        v.same_device(name, t, "targets", targets)
        v.same_dtype(name, t, "targets", targets)
    mode = v.causal_mode("causal", causal)
    attention_layout.check(targets, history, key_padding_mask, mode, history_index, history_offsets,
                           target_offsets, max_history_len, lengths)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    v.finite("targets", targets)
    v.finite("history", history)


def _projected_attention(core):
    """Q from the targets and K/V from the history by one GEMM each (K/V once per history item,
    never copied per target; one GEMM for all three when history is targets), the fused attention core over the layout's segments
    (courier_fast.ops.attention_layout), then the output projection."""

    def attention(targets, history, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                  num_heads, *, key_padding_mask=None, causal=False, history_index=None,
                  history_offsets=None, target_offsets=None, max_history_len=None):
        d = targets.shape[-1]
        dh = d // num_heads
        seg = attention_layout.segments(targets, history, key_padding_mask, history_index, history_offsets,
                                        target_offsets, max_history_len)
        if history is targets:  # self-attention: Q, K and V from one GEMM
            qkv = F.linear(targets.reshape(-1, d), in_proj_weight, in_proj_bias).view(-1, 3, num_heads, dh)
            q, k, v = qkv.unbind(1)  # its backward stacks dQ, dK and dV in one pass
        else:
            b_q = in_proj_bias[:d] if in_proj_bias is not None else None
            b_kv = in_proj_bias[d:] if in_proj_bias is not None else None
            q = F.linear(targets.reshape(-1, d), in_proj_weight[:d], b_q).view(-1, num_heads, dh)
            kv = F.linear(history.reshape(-1, d), in_proj_weight[d:], b_kv).view(-1, 2, num_heads, dh)
            k, v = kv.unbind(1)  # its backward stacks dK and dV in one pass (two selects: two zeroed copies)
        mode = _validate.causal_mode("causal", causal)  # 0 none, 1 strict (s < t), 2 inclusive (s <= t)
        out, _ = core(q, k, v, seg.target_rows, seg.key_rows, seg.target_offsets,
                      seg.key_offsets, seg.order, seg.key_padding_mask, mode, 1.0 / math.sqrt(dh),
                      seg.max_targets, seg.max_keys)  # out: (T, d) fp32/fp64
        return F.linear(out.to(targets.dtype), out_proj_weight, out_proj_bias).view(targets.shape)

    return attention


def _head_dim_at_most(limit):
    return lambda targets, num_heads, **_: targets.shape[-1] // num_heads <= limit


dispatch.register(OP, "reference", reconstruction_attention_reference, devices=("cpu", "cuda"),
                  validate=False)
if _extension.loaded():
    dispatch.register(OP, "cpu", _projected_attention(_ops.attention_core), devices=("cpu",),
                      note="C++ CPU attention core (per history row and head: scores as dot products of the q / k "
                           "rows in place, exact softmax, outputs accumulated in registers, atomics-free "
                           "backward, long rows split over OpenMP threads)")
if _extension.cuda_compiled():
    dispatch.register(OP, "cuda", _projected_attention(_ops.attention_core), devices=("cuda",),
                      supports=_head_dim_at_most(256),
                      note="CUDA attention core (warp per target / history item, online softmax, "
                           "atomics-free backward)")
if importlib.util.find_spec("triton") is not None:
    from courier_fast.ops.backends import triton as _triton_ops

    dispatch.register(OP, "triton", _projected_attention(_triton_ops.attention_core),
                      devices=("cuda", "cpu") if _triton_ops.INTERPRET else ("cuda",),
                      supports=_triton_ops.attention_supports,
                      note="Triton attention core (online softmax over history tiles, masks, "
                           "causal, atomics-free backward, 16-bit MMA for 16-bit inputs)")
