"""Triton kernels for the reconstruction-attention core (after the Q/K/V projections).

For every (request row b, head) program block: P targets attend over that row's L history
items, masked by key_padding_mask (True = padding) and, when causal, by s < t. K/V are read
once per row (never copied per target); softmax is online over L tiles, so long histories
(L up to thousands) need no L x P buffer, and short ones (L <= 64) use one right-sized tile.
  forward   _attn_fwd_kernel: O (B, P, h*dh) in the inputs' dtype, LSE (B, h, P) fp32.
  backward  FlashAttention-2 style, atomics-free: _attn_bwd_dkdv_kernel (programs over L
            tiles) and _attn_bwd_dq_kernel (programs over P tiles) recompute P from the LSE.
A target with no valid key gets O = 0 (the caller adds the output bias) and LSE = -inf.
q/k/v are (B, h, T, dh) views with any batch/head/row strides (last dim contiguous).
"""
import math
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def _load_rows(PTR, b, hd, idx, ok, stride_b, stride_h, stride_t, dh_idx, dh_ok):
    """(len(idx), BLOCK_DH) tile of rows idx of head hd in request row b; 0 outside."""
    return tl.load(PTR + b * stride_b + hd * stride_h + idx[:, None] * stride_t + dh_idx[None, :],
                   mask=ok[:, None] & dh_ok[None, :], other=0.0)


@triton.jit
def _scores(q, K, b, hd, cols, col_ok, rows, MASK, stride_kb, stride_kh, stride_kt, stride_mb,
            L, sm_scale, dh_idx, dh_ok, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
            DOT_FP32: tl.constexpr):
    """Masked scaled scores (BLOCK_P, BLOCK_L) of q rows against key tile `cols`; -inf masked."""
    k = _load_rows(K, b, hd, cols, col_ok, stride_kb, stride_kh, stride_kt, dh_idx, dh_ok)
    if DOT_FP32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * sm_scale
    keep = col_ok[None, :] & (rows[:, None] >= 0)
    if HAS_MASK:
        pad = tl.load(MASK + b * stride_mb + cols, mask=col_ok, other=1)
        keep = keep & (pad == 0)[None, :]
    if CAUSAL:
        keep = keep & (cols[None, :] < rows[:, None])
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _attn_fwd_kernel(Q, K, V, MASK, O, LSE, H, P, L, DH, sm_scale,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_mb, stride_ob, stride_oh, stride_ot,
                     HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT_FP32: tl.constexpr,
                     BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DH: tl.constexpr):
    pid_p, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hd = pid_bh // H, pid_bh % H
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < P
    dh_idx = tl.arange(0, BLOCK_DH)
    dh_ok = dh_idx < DH
    q = _load_rows(Q, b, hd, rows, row_ok, stride_qb, stride_qh, stride_qt, dh_idx, dh_ok)
    m_i = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_DH], dtype=tl.float32)
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        col_ok = cols < L
        s = _scores(q, K, b, hd, cols, col_ok, rows, MASK, stride_kb, stride_kh, stride_kt,
                    stride_mb, L, sm_scale, dh_idx, dh_ok, HAS_MASK, CAUSAL, DOT_FP32)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(V, b, hd, cols, col_ok, stride_vb, stride_vh, stride_vt, dh_idx, dh_ok)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(O + b * stride_ob + hd * stride_oh + rows[:, None] * stride_ot + dh_idx[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & dh_ok[None, :])
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + pid_bh * P + rows, lse, mask=row_ok)


@triton.jit
def _probs(q, K, b, hd, cols, col_ok, rows, MASK, stride_kb, stride_kh, stride_kt, stride_mb, L,
           sm_scale, dh_idx, dh_ok, lse, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
           DOT_FP32: tl.constexpr):
    """Softmax probabilities recomputed from the saved LSE (lse = +inf for empty rows -> 0)."""
    s = _scores(q, K, b, hd, cols, col_ok, rows, MASK, stride_kb, stride_kh, stride_kt, stride_mb,
                L, sm_scale, dh_idx, dh_ok, HAS_MASK, CAUSAL, DOT_FP32)
    return tl.exp(s - lse[:, None])


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, MASK, DO, LSE, DELTA, DK, DV, H, P, L, DH, sm_scale,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_mb, stride_ob, stride_oh,
                          stride_ot, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                          DOT_FP32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr,
                          BLOCK_DH: tl.constexpr):
    """dV = P^T dO, dK = sm_scale * dS^T Q for one tile of keys, looping over all targets."""
    pid_l, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hd = pid_bh // H, pid_bh % H
    cols = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    col_ok = cols < L
    dh_idx = tl.arange(0, BLOCK_DH)
    dh_ok = dh_idx < DH
    v = _load_rows(V, b, hd, cols, col_ok, stride_vb, stride_vh, stride_vt, dh_idx, dh_ok).to(tl.float32)
    dk = tl.zeros([BLOCK_L, BLOCK_DH], dtype=tl.float32)
    dv = tl.zeros([BLOCK_L, BLOCK_DH], dtype=tl.float32)
    for r0 in range(0, P, BLOCK_P):
        rows = r0 + tl.arange(0, BLOCK_P)
        row_ok = rows < P
        q = _load_rows(Q, b, hd, rows, row_ok, stride_qb, stride_qh, stride_qt, dh_idx, dh_ok)
        lse = tl.load(LSE + pid_bh * P + rows, mask=row_ok, other=float("inf"))
        p = _probs(q, K, b, hd, cols, col_ok, rows, MASK, stride_kb, stride_kh, stride_kt,
                   stride_mb, L, sm_scale, dh_idx, dh_ok, lse, HAS_MASK, CAUSAL, DOT_FP32)
        do = _load_rows(DO, b, hd, rows, row_ok, stride_ob, stride_oh, stride_ot, dh_idx, dh_ok).to(tl.float32)
        dv += tl.dot(tl.trans(p), do, input_precision="ieee" if DOT_FP32 else "tf32")
        dp = tl.dot(do, tl.trans(v), input_precision="ieee" if DOT_FP32 else "tf32")
        delta = tl.load(DELTA + pid_bh * P + rows, mask=row_ok, other=0.0)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds), q.to(tl.float32), input_precision="ieee" if DOT_FP32 else "tf32")
    base = pid_bh * L * DH + cols[:, None] * DH + dh_idx[None, :]
    tl.store(DK + base, dk * sm_scale, mask=col_ok[:, None] & dh_ok[None, :])
    tl.store(DV + base, dv, mask=col_ok[:, None] & dh_ok[None, :])


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, MASK, DO, LSE, DELTA, DQ, H, P, L, DH, sm_scale,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_mb, stride_ob, stride_oh,
                        stride_ot, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
                        DOT_FP32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr,
                        BLOCK_DH: tl.constexpr):
    """dQ = sm_scale * dS K for one tile of targets, looping over all keys."""
    pid_p, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hd = pid_bh // H, pid_bh % H
    rows = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < P
    dh_idx = tl.arange(0, BLOCK_DH)
    dh_ok = dh_idx < DH
    q = _load_rows(Q, b, hd, rows, row_ok, stride_qb, stride_qh, stride_qt, dh_idx, dh_ok)
    do = _load_rows(DO, b, hd, rows, row_ok, stride_ob, stride_oh, stride_ot, dh_idx, dh_ok).to(tl.float32)
    lse = tl.load(LSE + pid_bh * P + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * P + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_P, BLOCK_DH], dtype=tl.float32)
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        col_ok = cols < L
        p = _probs(q, K, b, hd, cols, col_ok, rows, MASK, stride_kb, stride_kh, stride_kt,
                   stride_mb, L, sm_scale, dh_idx, dh_ok, lse, HAS_MASK, CAUSAL, DOT_FP32)
        v = _load_rows(V, b, hd, cols, col_ok, stride_vb, stride_vh, stride_vt, dh_idx, dh_ok).to(tl.float32)
        k = _load_rows(K, b, hd, cols, col_ok, stride_kb, stride_kh, stride_kt, dh_idx, dh_ok).to(tl.float32)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee" if DOT_FP32 else "tf32")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k, input_precision="ieee" if DOT_FP32 else "tf32")
    base = pid_bh * P * DH + rows[:, None] * DH + dh_idx[None, :]
    tl.store(DQ + base, dq * sm_scale, mask=row_ok[:, None] & dh_ok[None, :])


# ----------------------------------------------------------------------------- host side
def _blocks(p, length, dh):
    cap = 16 if INTERPRET else 64
    block_p = max(16, min(cap, triton.next_power_of_2(max(p, 1))))
    block_l = max(16, min(cap if INTERPRET else 128, triton.next_power_of_2(max(length, 1))))
    return block_p, block_l, max(16, triton.next_power_of_2(dh))


def _mask_arg(mask, like):
    if mask is None:
        return like.new_empty(0, dtype=torch.uint8), 0, False
    m = mask.to(torch.uint8).contiguous()
    return m, m.stride(0), True


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _compute(t):
    """fp64 is computed in fp32 here (tests hold this backend to fp32 tolerances)."""
    return t.float() if t.dtype == torch.float64 else t


def attention_forward(q, k, v, key_padding_mask, causal, sm_scale):
    """q (B, h, P, dh), k/v (B, h, L, dh) -> O (B, P, h*dh) in q's dtype, LSE (B, h, P) fp32."""
    out_dtype = q.dtype
    q, k, v = _compute(q), _compute(k), _compute(v)
    b, h, p, dh = q.shape
    length = k.shape[2]
    o = torch.empty(b, p, h, dh, device=q.device, dtype=q.dtype)
    o_view = o.transpose(1, 2)  # (B, h, P, dh) view of the (B, P, h, dh) buffer
    lse = torch.empty(b, h, p, device=q.device, dtype=torch.float32)
    block_p, block_l, block_dh = _blocks(p, length, dh)
    mask, stride_mb, has_mask = _mask_arg(key_padding_mask, q)
    grid = (triton.cdiv(p, block_p), b * h)
    if p > 0 and b * h > 0:
        _attn_fwd_kernel[grid](q, k, v, mask, o_view, lse, h, p, length, dh, float(sm_scale),
                               *_strides(q), *_strides(k), *_strides(v), stride_mb, *_strides(o_view),
                               HAS_MASK=has_mask, CAUSAL=causal,
                               DOT_FP32=INTERPRET or q.dtype == torch.float32,
                               BLOCK_P=block_p, BLOCK_L=block_l, BLOCK_DH=block_dh)
    return o.reshape(b, p, h * dh).to(out_dtype), lse


def attention_backward(grad_o, q, k, v, o, lse, key_padding_mask, causal, sm_scale):
    """(dq, dk, dv), each contiguous (B, h, T, dh) in the dtype of q/k/v."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v = _compute(q), _compute(k), _compute(v)
    b, h, p, dh = q.shape
    length = k.shape[2]
    do = grad_o.to(q.dtype).reshape(b, p, h, dh).transpose(1, 2)
    delta = (do.float() * o.float().reshape(b, p, h, dh).transpose(1, 2)).sum(-1).contiguous()
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
    dq = torch.zeros(b, h, p, dh, device=q.device, dtype=torch.float32)
    dk = torch.zeros(b, h, length, dh, device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    block_p, block_l, block_dh = _blocks(p, length, dh)
    mask, stride_mb, has_mask = _mask_arg(key_padding_mask, q)
    common = dict(HAS_MASK=has_mask, CAUSAL=causal, DOT_FP32=INTERPRET or q.dtype == torch.float32,
                  BLOCK_P=block_p, BLOCK_L=block_l, BLOCK_DH=block_dh)
    args = (*_strides(q), *_strides(k), *_strides(v), stride_mb, *_strides(do))
    if p > 0 and length > 0 and b * h > 0:
        _attn_bwd_dkdv_kernel[(triton.cdiv(length, block_l), b * h)](
            q, k, v, mask, do, lse_safe, delta, dk, dv, h, p, length, dh, float(sm_scale), *args, **common)
        _attn_bwd_dq_kernel[(triton.cdiv(p, block_p), b * h)](
            q, k, v, mask, do, lse_safe, delta, dq, h, p, length, dh, float(sm_scale), *args, **common)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])


def default_scale(dh):
    return 1.0 / math.sqrt(dh)
