"""Triton kernels for the reconstruction-attention core (after the Q/K/V projections).

For every (request row b, head) and block of targets: P targets attend over that row's L
history items, masked by key_padding_mask (True = padding) and by position: causal = 0 none,
1 strict (target t sees s < t), 2 inclusive (s <= t). K/V
are read in place (never copied per target); softmax is online over L tiles, so long
histories need no L x P buffer, and short ones (L <= 16) use one right-sized tile.
  forward   _attn_fwd_kernel: O (B, P, h*dh) and LSE (B, h, P), both fp32. O stays fp32 (the
            caller rounds it for the output projection) because the backward's
            delta = rowsum(dO * O) must come from the unrounded O: from a 16-bit O its error
            does not cancel in dS = P (dP - delta) and doubled the 16-bit dQ / dK error.
  backward  FlashAttention-2 style, atomics-free: _attn_bwd_dkdv_kernel (programs over L
            tiles) and _attn_bwd_dq_kernel (programs over P tiles) recompute P from the LSE.
Every tl.dot runs at the input precision with fp32 accumulation (P and dS are cast to the
input dtype for the second GEMMs); fp32 inputs use 3xTF32 dots (kernels/_mma.py: IEEE fp32
and an exact emulation of the 16-bit MMA under TRITON_INTERPRET=1). A target with no valid key gets O = 0 (the caller adds the output bias) and
LSE = -inf. q/k/v are (B, h, T, dh) views with any batch/head/row strides (dh contiguous).

Launch limits: (b, head) pairs run on grid axis 0 (2^31 - 1 programs; axes 1 and 2 stop at
65535), offsets are computed in int64, and tiles shrink as the head dim grows (blocks());
head dims above MAX_HEAD_DIM are rejected.
"""
import math

import torch
import triton
import triton.language as tl

from courier_fast.kernels._launch import INTERPRET, device_guard
from courier_fast.kernels._mma import dot as _dot
from courier_fast.kernels._mma import to_16bit

MAX_HEAD_DIM = 256
TILE_BUDGET = 128 * 128  # (BLOCK_P + 2 BLOCK_L) * BLOCK_DH elements of q, k, v tiles per program
NUM_STAGES = 2


def num_warps(block_p, block_l):
    """4 warps; 8 for 64 x 64 score tiles (4 spill registers in the sm_80 dK/dV kernel)."""
    return 8 if block_p * block_l >= 64 * 64 else 4


@triton.jit
def _cast(a, like, DOT_FP32: tl.constexpr):
    """a in like's dtype for a 16-bit MMA (kept fp32 when DOT_FP32)."""
    if DOT_FP32:
        return a
    else:
        return to_16bit(a, like.dtype)


@triton.jit
def _load_rows(PTR, b, hd, idx, ok, stride_b, stride_h, stride_t, dh_idx, dh_ok):
    """(len(idx), BLOCK_DH) tile of rows idx of head hd in request row b; 0 outside.
    b and hd are int64, so no offset wraps past 2^31 elements."""
    base = PTR + b * stride_b + hd * stride_h
    return tl.load(base + idx.to(tl.int64)[:, None] * stride_t + dh_idx[None, :],
                   mask=ok[:, None] & dh_ok[None, :], other=0.0)


@triton.jit
def _scores(q, k, b, cols, col_ok, rows, MASK, stride_mb, sm_scale, causal, DOT_FP32: tl.constexpr):
    """Masked scaled scores (BLOCK_P, BLOCK_L) of q rows against key tile k; -inf masked."""
    s = _dot(q, tl.trans(k), DOT_FP32) * sm_scale
    pad = tl.load(MASK + b * stride_mb + cols, mask=col_ok, other=1)
    keep = (col_ok & (pad == 0))[None, :] & (rows[:, None] >= 0)
    keep = keep & ((cols[None, :] < rows[:, None] + causal // 2) | (causal == 0))  # 1: s < t, 2: s <= t
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _program_ids(H):
    """(b, head, (b, head) index) of this program, as int64."""
    pid_bh = tl.program_id(0).to(tl.int64)
    return pid_bh // H, pid_bh % H, pid_bh


@triton.jit
def _attn_fwd_kernel(Q, K, V, MASK, O, LSE, H, P, L, DH, sm_scale, causal,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_mb, stride_ob, stride_oh, stride_ot,
                     DOT_FP32: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr,
                     BLOCK_DH: tl.constexpr):
    b, hd, pid_bh = _program_ids(H)
    rows = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
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
        k = _load_rows(K, b, hd, cols, col_ok, stride_kb, stride_kh, stride_kt, dh_idx, dh_ok)
        s = _scores(q, k, b, cols, col_ok, rows, MASK, stride_mb, sm_scale, causal, DOT_FP32)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(V, b, hd, cols, col_ok, stride_vb, stride_vh, stride_vt, dh_idx, dh_ok)
        acc = acc * alpha[:, None] + _dot(_cast(p, v, DOT_FP32), v, DOT_FP32)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptr = O + b * stride_ob + hd * stride_oh + rows.to(tl.int64)[:, None] * stride_ot + dh_idx[None, :]
    tl.store(o_ptr, out, mask=row_ok[:, None] & dh_ok[None, :])
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + pid_bh * P + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, MASK, DO, LSE, DELTA, DK, DV, H, P, L, DH, sm_scale, causal,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_mb, stride_ob, stride_oh,
                          stride_ot, DOT_FP32: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK_L: tl.constexpr, BLOCK_DH: tl.constexpr):
    """dV = P^T dO, dK = sm_scale * dS^T Q for one tile of keys, looping over all targets.
    LSE arrives with -inf replaced by +inf (a target without keys: P = 0)."""
    b, hd, pid_bh = _program_ids(H)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    col_ok = cols < L
    dh_idx = tl.arange(0, BLOCK_DH)
    dh_ok = dh_idx < DH
    k = _load_rows(K, b, hd, cols, col_ok, stride_kb, stride_kh, stride_kt, dh_idx, dh_ok)
    v = _load_rows(V, b, hd, cols, col_ok, stride_vb, stride_vh, stride_vt, dh_idx, dh_ok)
    dk = tl.zeros([BLOCK_L, BLOCK_DH], dtype=tl.float32)
    dv = tl.zeros([BLOCK_L, BLOCK_DH], dtype=tl.float32)
    for r0 in range(0, P, BLOCK_P):
        rows = r0 + tl.arange(0, BLOCK_P)
        row_ok = rows < P
        q = _load_rows(Q, b, hd, rows, row_ok, stride_qb, stride_qh, stride_qt, dh_idx, dh_ok)
        lse = tl.load(LSE + pid_bh * P + rows, mask=row_ok, other=float("inf"))
        p = tl.exp(_scores(q, k, b, cols, col_ok, rows, MASK, stride_mb, sm_scale, causal, DOT_FP32)
                   - lse[:, None])
        do = _load_rows(DO, b, hd, rows, row_ok, stride_ob, stride_oh, stride_ot, dh_idx, dh_ok)
        dv += _dot(_cast(tl.trans(p), do, DOT_FP32), do, DOT_FP32)
        dp = _dot(do, tl.trans(v), DOT_FP32)
        delta = tl.load(DELTA + pid_bh * P + rows, mask=row_ok, other=0.0)
        ds = p * (dp - delta[:, None])
        dk += _dot(_cast(tl.trans(ds), q, DOT_FP32), q, DOT_FP32)
    base = pid_bh * L * DH + cols.to(tl.int64)[:, None] * DH + dh_idx[None, :]
    tl.store(DK + base, dk * sm_scale, mask=col_ok[:, None] & dh_ok[None, :])
    tl.store(DV + base, dv, mask=col_ok[:, None] & dh_ok[None, :])


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, MASK, DO, LSE, DELTA, DQ, H, P, L, DH, sm_scale, causal,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_mb, stride_ob, stride_oh,
                        stride_ot, DOT_FP32: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_DH: tl.constexpr):
    """dQ = sm_scale * dS K for one tile of targets, looping over all keys."""
    b, hd, pid_bh = _program_ids(H)
    rows = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < P
    dh_idx = tl.arange(0, BLOCK_DH)
    dh_ok = dh_idx < DH
    q = _load_rows(Q, b, hd, rows, row_ok, stride_qb, stride_qh, stride_qt, dh_idx, dh_ok)
    do = _load_rows(DO, b, hd, rows, row_ok, stride_ob, stride_oh, stride_ot, dh_idx, dh_ok)
    lse = tl.load(LSE + pid_bh * P + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * P + rows, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_P, BLOCK_DH], dtype=tl.float32)
    for c0 in range(0, L, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        col_ok = cols < L
        k = _load_rows(K, b, hd, cols, col_ok, stride_kb, stride_kh, stride_kt, dh_idx, dh_ok)
        p = tl.exp(_scores(q, k, b, cols, col_ok, rows, MASK, stride_mb, sm_scale, causal, DOT_FP32)
                   - lse[:, None])
        v = _load_rows(V, b, hd, cols, col_ok, stride_vb, stride_vh, stride_vt, dh_idx, dh_ok)
        ds = p * (_dot(do, tl.trans(v), DOT_FP32) - delta[:, None])
        dq += _dot(_cast(ds, k, DOT_FP32), k, DOT_FP32)
    base = pid_bh * P * DH + rows.to(tl.int64)[:, None] * DH + dh_idx[None, :]
    tl.store(DQ + base, dq * sm_scale, mask=row_ok[:, None] & dh_ok[None, :])


# ----------------------------------------------------------------------------- host side
def _tile(n, options):
    """The smallest option >= n (the largest when none is)."""
    return next((o for o in options if o >= n), options[-1])


# padded head dim -> (BLOCK_P options, BLOCK_L options) for 16-bit inputs; the host launches any
# pair. Every pair is one that bench/kernel_report.py compiled for sm_80 and sm_90a (forward,
# dK/dV and dQ kernels) without register spills and within the A100's shared memory; pairs
# that failed there were removed (64-row target tiles with head dim >= 32 spilled in dQ or dK/dV).
_BLOCKS = {16: ((16, 64), (16, 128)), 32: ((16,), (16, 64, 128)), 64: ((16,), (16, 64)),
           128: ((16,), (16, 32)), 256: ((16, 32), (16,))}
# fp32 inputs (3xTF32 dots: twice the operand registers): only head dims <= FP32_MAX_HEAD_DIM
# compiled spill-free; from 128 on every tile tried (16..64 x 16..64) spilled in the backward.
_BLOCKS_FP32 = {16: ((16, 32), (16, 32, 64)), 32: ((16,), (16, 32)), 64: ((16, 32), (16,))}
FP32_MAX_HEAD_DIM = 64


def block_options(block_dh, fp32=False):
    """(BLOCK_P options, BLOCK_L options) the host may launch on a GPU for a padded head dim and
    16-bit (fp32=False) or fp32 inputs; within (BLOCK_P + 2 BLOCK_L) * BLOCK_DH <= TILE_BUDGET.
    (The interpreter always uses 16 x 16 tiles, for speed.)"""
    return (_BLOCKS_FP32 if fp32 else _BLOCKS)[block_dh]


def blocks(p, length, dh, fp32=False, *, gpu=not INTERPRET):
    """(BLOCK_P, BLOCK_L, BLOCK_DH) for P targets, L history items, head dim dh, fp32 (else
    16-bit) inputs: the GPU's tiles (block_options), or with gpu=False (the default under
    TRITON_INTERPRET=1) the interpreter's 16 x 16 tiles, which keep it fast."""
    if dh > MAX_HEAD_DIM:
        raise ValueError(f"the triton attention core supports head dim <= {MAX_HEAD_DIM} "
                         f"(embed_dim / num_heads), got {dh}")
    if fp32 and dh > FP32_MAX_HEAD_DIM and gpu:
        raise ValueError(f"the triton attention core takes float32 inputs only up to head dim "
                         f"{FP32_MAX_HEAD_DIM} on a GPU (wider fp32 tiles spill registers; "
                         f"bench/results/static-kernels.json), got {dh}: use bf16/fp16 (autocast) or backend='cuda'")
    block_dh = max(16, triton.next_power_of_2(dh))
    p_opts, l_opts = block_options(block_dh, fp32) if gpu else ((16,), (16,))
    return _tile(p, p_opts), _tile(length, l_opts), block_dh


def supports(targets, num_heads, **_):
    """Whether this backend handles the call (used by backend='auto'): head dim <= MAX_HEAD_DIM,
    and <= FP32_MAX_HEAD_DIM when the projections give fp32 (no CUDA autocast to 16 bits)."""
    dh = targets.shape[-1] // num_heads
    dtype = targets.dtype
    if targets.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    fp32 = dtype in (torch.float32, torch.float64) and not INTERPRET
    return dh <= (FP32_MAX_HEAD_DIM if fp32 else MAX_HEAD_DIM)


def _mask_arg(mask, b, length, device):
    """(B, L) uint8, 1 = padding (all 0 without a mask), and its row stride."""
    m = torch.zeros(b, length, dtype=torch.uint8, device=device) if mask is None else mask.to(torch.uint8).contiguous()
    return m, m.stride(0)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _compute(t):
    """fp64 is computed in fp32 here (tests hold this backend to fp32 tolerances)."""
    return t.float() if t.dtype == torch.float64 else t


def _dot_fp32(dtype):
    return dtype == torch.float32  # 16-bit: 16-bit MMA (emulated in the interpreter, kernels/_mma.py)


def grid(b, h, tiles):
    """(b * h, tiles): the many (row, head) pairs on axis 0, whose limit is 2^31 - 1."""
    if tiles > 65535:
        raise ValueError(f"too many target or history tiles per row ({tiles} > 65535)")
    return (b * h, tiles)


def attention_forward(q, k, v, key_padding_mask, causal, sm_scale):
    """q (B, h, P, dh), k/v (B, h, L, dh) -> O (B, P, h*dh) fp32, LSE (B, h, P) fp32."""
    q, k, v = _compute(q), _compute(k), _compute(v)
    b, h, p, dh = q.shape
    length = k.shape[2]
    block_p, block_l, block_dh = blocks(p, length, dh, q.dtype == torch.float32)
    o = torch.empty(b, p, h, dh, device=q.device, dtype=torch.float32)
    o_view = o.transpose(1, 2)  # (B, h, P, dh) view of the (B, P, h, dh) buffer
    lse = torch.empty(b, h, p, device=q.device, dtype=torch.float32)
    mask, stride_mb = _mask_arg(key_padding_mask, b, length, q.device)
    if p > 0 and b * h > 0:
        with device_guard(q):
            _attn_fwd_kernel[grid(b, h, triton.cdiv(p, block_p))](
                q, k, v, mask, o_view, lse, h, p, length, dh, float(sm_scale), int(causal),
                *_strides(q), *_strides(k), *_strides(v), stride_mb, *_strides(o_view),
                DOT_FP32=_dot_fp32(q.dtype), BLOCK_P=block_p, BLOCK_L=block_l, BLOCK_DH=block_dh,
                num_warps=num_warps(block_p, block_l), num_stages=NUM_STAGES)
    return o.reshape(b, p, h * dh), lse


def attention_backward(grad_o, q, k, v, o, lse, key_padding_mask, causal, sm_scale):
    """(dq, dk, dv), each contiguous (B, h, T, dh) in the dtype of q/k/v."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v = _compute(q), _compute(k), _compute(v)
    b, h, p, dh = q.shape
    length = k.shape[2]
    block_p, block_l, block_dh = blocks(p, length, dh, q.dtype == torch.float32)
    do = grad_o.to(q.dtype).reshape(b, p, h, dh).transpose(1, 2)
    delta = (do.float() * o.float().reshape(b, p, h, dh).transpose(1, 2)).sum(-1).contiguous()
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
    dq = torch.zeros(b, h, p, dh, device=q.device, dtype=torch.float32)
    dk = torch.zeros(b, h, length, dh, device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    mask, stride_mb = _mask_arg(key_padding_mask, b, length, q.device)
    common = dict(DOT_FP32=_dot_fp32(q.dtype), BLOCK_P=block_p, BLOCK_L=block_l, BLOCK_DH=block_dh,
                  num_warps=num_warps(block_p, block_l), num_stages=NUM_STAGES)
    args = (h, p, length, dh, float(sm_scale), int(causal),
            *_strides(q), *_strides(k), *_strides(v), stride_mb, *_strides(do))
    if p > 0 and length > 0 and b * h > 0:
        with device_guard(q):
            _attn_bwd_dkdv_kernel[grid(b, h, triton.cdiv(length, block_l))](
                q, k, v, mask, do, lse_safe, delta, dk, dv, *args, **common)
            _attn_bwd_dq_kernel[grid(b, h, triton.cdiv(p, block_p))](
                q, k, v, mask, do, lse_safe, delta, dq, *args, **common)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])


def default_scale(dh):
    return 1.0 / math.sqrt(dh)
