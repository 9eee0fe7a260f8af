"""Triton kernels for the reconstruction-attention core (after the Q/K/V projections).

The core runs over segments (courier_fast/ops/attention_layout.py): target t attends the keys
[key_offsets[r], key_offsets[r+1]) of its row r = target_rows[t], masked by key_padding_mask
(True = padding) and by position within the row: causal = 0 none, 1 strict (target t sees
s < t), 2 inclusive (s <= t). q (T, h, dh) and k/v (S, h, dh) are views with any row and head
strides (dh contiguous); K/V are read in place, never copied per target. Outputs: O (T, h*dh)
and LSE (T, h), both fp32. O stays fp32 (the caller rounds it for the output projection)
because the flash backward's delta = rowsum(dO * O) must come from the unrounded O: from a
16-bit O its error does not cancel in dS = P (dP - delta) (the short backward takes delta from
P and dP themselves). A target with no valid key gets O = 0 (the
caller adds the output bias) and LSE = -inf.

Two kernel families, chosen by the longest history row (max_keys):

  short (max_keys <= SHORT_MAX_KEYS, COURIER's histories of ~5): a 16-row MMA tile would be mostly
  padding there (P = L = 5 ran 15x its FLOP floor), so these kernels pack BLOCK_T consecutive
  targets of any rows into one program and gather each target's own keys into a
  (BLOCK_T, BLOCK_L, BLOCK_D) tile: products by broadcast-multiply-sum on CUDA cores (fp32,
  16-bit operands widened exactly), the head dim looped in BLOCK_D chunks. Work is padded only
  to BLOCK_L = next power of 2 >= max_keys.
    _short_fwd_kernel       O, LSE                                 (products: QK, PV)
    _short_bwd_dq_kernel    dQ; stores P and dS (T, h, BLOCK_L)    (QK, dO V, dS K; delta = sum P dP)
    _short_bwd_dkdv_kernel  a program per piece (a row's chunk of targets, below) over the row's
                            BLOCK_L key slots, looping over the chunk's targets (via order) in
                            steps of BLOCK_P: dV = P^T dO, dK = dS^T Q
  flash (longer rows): a program per (row, head) and block of targets, online softmax over
  key tiles, every product a tl.dot at the input precision with fp32 accumulation (P and dS
  cast to the input dtype for the second GEMMs; fp32 inputs: 3xTF32), FlashAttention-2's
  atomics-free backward (_flash_bwd_dkdv_kernel over (piece, key tile), _flash_bwd_dq_kernel
  over target tiles, P recomputed from the LSE).
Both families split dK/dV by pieces (kernels/attention_split.py): a row's targets in chunks of
target_chunk(T, B) targets, so a row shared by 10^5 targets (a skewed history_index) is not one
program's serial walk. A row of one piece writes dK/dV; a longer row writes fp32 partials per
piece, which _dkdv_reduce_kernel sums per key in chunk order (deterministic, no atomics).
kernels/_mma.py holds the dot and the 16-bit casts: under TRITON_INTERPRET=1 they emulate the
GPU's 16-bit MMA and rounding exactly.

Launch limits: the many programs sit on grid axis 0 (2^31 - 1; axes 1 and 2 stop at 65535),
offsets are int64, flash tiles shrink as the head dim grows (blocks()); head dims above
MAX_HEAD_DIM are rejected.
"""
import math

import torch
import triton
import triton.language as tl

from courier_fast.kernels import attention_split
from courier_fast.kernels._launch import INTERPRET, device_guard
from courier_fast.kernels._mma import _widen
from courier_fast.kernels._mma import dot as _dot
from courier_fast.kernels._mma import to_16bit

MAX_HEAD_DIM = 256
TILE_BUDGET = 128 * 128  # flash: (BLOCK_P + 2 BLOCK_L) * BLOCK_DH elements of q, k, v tiles per program
NUM_STAGES = 2
SHORT_MAX_KEYS = 16  # rows of at most this many history items take the short kernels
SHORT_TILE = 2048  # short: elements of one gathered (rows, slots, BLOCK_D) tile (4096 spilled)
SHORT_WARPS = 8  # forward and dQ (4 spilled a few bytes on sm_86)
SHORT_MAX_ROWS = 32  # targets per short forward / dQ program (64 spilled with 1-2 slots per row)
SHORT_DKDV_WARPS = 4  # dK/dV (8 spilled on sm_80)
SHORT_DKDV_MAX_KEYS = 16  # keys per dK/dV program (32 spilled on sm_90a)
SHORT_BLOCK_P = (1, 2, 4)  # target steps of the short dK/dV kernel
REDUCE_TILE = 1024  # dK/dV phase 2: (keys, head dim) fp32 elements per accumulator
REDUCE_WARPS = 4


def num_warps(block_p, block_l, block_dh=None, fp32=False):
    """Flash: 4 warps; 8 for 64 x 64 score tiles (4 spill registers in the sm_80 dK/dV kernel) and
    for fp32 inputs of head-dim classes FP32_EIGHT_WARPS (4 warps spilled in some kernel there)."""
    return 8 if block_p * block_l >= 64 * 64 or (fp32 and block_dh in FP32_EIGHT_WARPS) else 4


# ----------------------------------------------------------------------------- short kernels
@triton.jit
def _visible(key_pos, target_pos, causal):
    """Whether key position s is visible to target position t (broadcast tiles, positions within
    the row): causal 0 all, 1 s < t, 2 s <= t. The no-causal case is compared as a tile, not as the
    scalar `causal == 0`: Triton's interpreter widens a scalar bool or'ed into a tile to int32,
    which its tl.load (Triton 3.9) rejects as a mask."""
    return (key_pos < target_pos + causal // 2) | (key_pos * 0 + causal == 0)


@triton.jit
def _rows(PTR, idx, ok, hd, stride_t, stride_h, d, d_ok):
    """(len(idx), BLOCK_D) fp32 tile: rows idx of head hd, columns d; 0 where not ok."""
    ptr = PTR + idx.to(tl.int64)[:, None] * stride_t + hd * stride_h + d[None, :]
    return _widen(tl.load(ptr, mask=ok[:, None] & d_ok[None, :], other=0.0))


@triton.jit
def _gathered(PTR, idx, ok, hd, stride_t, stride_h, d, d_ok):
    """(rows, slots, BLOCK_D) fp32 tile: row idx[i, j] of head hd, columns d; 0 where not ok."""
    ptr = PTR + idx.to(tl.int64)[:, :, None] * stride_t + hd * stride_h + d[None, None, :]
    return _widen(tl.load(ptr, mask=ok[:, :, None] & d_ok[None, None, :], other=0.0))


@triton.jit
def _own_keys(t, t_ok, TROW, KOFF, TOFF, MASK, causal, BLOCK_L: tl.constexpr):
    """Each target's key slots: (key index, attended) tiles (BLOCK_T, BLOCK_L). Slot j of target
    t is key key_offsets[r] + j of its row r; attended when j < the row's length, the key is not
    padding and the causal rule allows it (positions within the row)."""
    row = tl.load(TROW + t, mask=t_ok, other=0)
    # bounds of the trusted segment table (docs/design.md §3.4), each before the read it guards;
    # compiled in under TRITON_DEBUG=1 (the upper bounds B, S are not kernel arguments)
    tl.device_assert(row >= 0, "attention_core: negative target_rows")
    first = tl.load(KOFF + row, mask=t_ok, other=0)
    count = (tl.load(KOFF + row + 1, mask=t_ok, other=0) - first).to(tl.int32)  # < 2^31 per row
    tl.device_assert((first >= 0) & (count >= 0), "attention_core: key_offsets not non-decreasing from 0")
    pos = (t - tl.load(TOFF + row, mask=t_ok, other=0)).to(tl.int32)
    slot = tl.arange(0, BLOCK_L)
    key = first[:, None] + slot[None, :]
    keep = t_ok[:, None] & (slot[None, :] < count[:, None])
    pad = tl.load(MASK + key, mask=keep, other=1)
    keep = keep & (pad == 0)
    keep = keep & _visible(slot[None, :], pos[:, None], causal)
    return key, keep


@triton.jit
def _short_fwd_kernel(Q, K, V, MASK, TROW, KOFF, TOFF, O, LSE, T, H, DH, sm_scale, causal,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                      stride_ot, stride_oh, BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    hd = tl.program_id(1).to(tl.int64)
    t_ok = t < T
    key, keep = _own_keys(t, t_ok, TROW, KOFF, TOFF, MASK, causal, BLOCK_L)
    s = tl.zeros([BLOCK_T, BLOCK_L], dtype=tl.float32)
    for d0 in range(0, DH, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < DH
        q = _rows(Q, t, t_ok, hd, stride_qt, stride_qh, d, d_ok)
        k = _gathered(K, key, keep, hd, stride_kt, stride_kh, d, d_ok)
        s += tl.sum(q[:, None, :] * k, axis=2)
    s = tl.where(keep, s * sm_scale, float("-inf"))
    m = tl.max(s, axis=1)
    shift = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp(s - shift[:, None])  # 0 where not attended
    total = tl.sum(p, axis=1)
    empty = total == 0.0
    p = p / tl.where(empty, 1.0, total)[:, None]
    for d0 in range(0, DH, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < DH
        v = _gathered(V, key, keep, hd, stride_vt, stride_vh, d, d_ok)
        o = tl.sum(p[:, :, None] * v, axis=1)
        tl.store(O + t[:, None] * stride_ot + hd * stride_oh + d[None, :], o, mask=t_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("-inf"), shift + tl.log(tl.where(empty, 1.0, total)))
    tl.store(LSE + t * H + hd, lse, mask=t_ok)


@triton.jit
def _short_bwd_dq_kernel(Q, K, V, MASK, DO, LSE, TROW, KOFF, TOFF, DQ, PS, DS, T, H, DH,
                         sm_scale, causal, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
                         stride_vh, stride_ot, stride_oh, BLOCK_T: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ = sm_scale * dS K per target; P and dS (T, h, BLOCK_L), 0 where not attended, stored
    for the dK/dV pass. LSE arrives with -inf replaced by +inf (a target without keys: P = 0).
    A target's keys all sit in this program, so delta = sum_s P dP is taken from the same P and
    dP as dS (not from O): sum_s dS = 0 up to rounding, and a target with one key gets dS = 0
    exactly, as its softmax has no gradient."""
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    hd = tl.program_id(1).to(tl.int64)
    t_ok = t < T
    key, keep = _own_keys(t, t_ok, TROW, KOFF, TOFF, MASK, causal, BLOCK_L)
    s = tl.zeros([BLOCK_T, BLOCK_L], dtype=tl.float32)
    dp = tl.zeros([BLOCK_T, BLOCK_L], dtype=tl.float32)
    for d0 in range(0, DH, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < DH
        q = _rows(Q, t, t_ok, hd, stride_qt, stride_qh, d, d_ok)
        do = _rows(DO, t, t_ok, hd, stride_ot, stride_oh, d, d_ok)
        s += tl.sum(q[:, None, :] * _gathered(K, key, keep, hd, stride_kt, stride_kh, d, d_ok), axis=2)
        dp += tl.sum(do[:, None, :] * _gathered(V, key, keep, hd, stride_vt, stride_vh, d, d_ok), axis=2)
    lse = tl.load(LSE + t * H + hd, mask=t_ok, other=float("inf"))
    p = tl.where(keep, tl.exp(s * sm_scale - lse[:, None]), 0.0)
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    at = (t * H + hd)[:, None] * BLOCK_L + tl.arange(0, BLOCK_L)[None, :]
    tl.store(PS + at, p, mask=t_ok[:, None])
    tl.store(DS + at, ds, mask=t_ok[:, None])
    for d0 in range(0, DH, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < DH
        dq = tl.sum(ds[:, :, None] * _gathered(K, key, keep, hd, stride_kt, stride_kh, d, d_ok), axis=1)
        tl.store(DQ + (t * H + hd)[:, None] * DH + d[None, :], dq * sm_scale, mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _piece(p, PROW, POFF, TOFF, KOFF, B, MAXK, CHUNK):
    """Piece p of the dK/dV split (kernels/attention_split.py): (valid, row, chunk index c, pieces
    in the row m, first position into ORDER, first target position within the row, targets in
    the chunk, first key, key count, key count clamped to MAXK (the workspace stride)). A piece
    past the real count finds row B: not valid, 0 targets."""
    row = tl.load(PROW + p)
    ok = row < B
    row = tl.where(ok, row, 0)
    first_piece = tl.load(POFF + row)
    m = tl.load(POFF + row + 1) - first_piece
    t0 = tl.load(TOFF + row)
    lo = (p - first_piece) * CHUNK
    cnt = tl.where(ok, tl.minimum(tl.load(TOFF + row + 1) - t0 - lo, CHUNK), 0).to(tl.int32)
    k0 = tl.load(KOFF + row)
    kn = tl.where(ok, tl.load(KOFF + row + 1) - k0, 0).to(tl.int32)  # a piece past the last: no keys
    return ok, row, p - first_piece, m, t0 + lo, lo, cnt, k0, kn, tl.minimum(kn, MAXK)


@triton.jit
def _out_first(WOFF, row, c, m, k0, lr):
    """The first output row of a piece: its row's first key in DK/DV (S, h, dh) when the row is
    one piece (m == 1), else its partials' first workspace row WOFF[row] + c * lr. Taken before
    the target loop, so that row, c and lr need not stay live across it."""
    return tl.where(m == 1, k0, tl.load(WOFF + row) + c * lr)


@triton.jit
def _store_dkdv(DK, DV, WK, WV, first, m, slots, slot_ok, hd, H, DH, d, d_ok, dk, dv):
    """A piece's dK/dV rows for key slots `slots` (output rows first + slot, _out_first): into
    DK/DV when the row is one piece (m == 1), else fp32 partials into WK/WV, which phase 2
    (_dkdv_reduce_kernel) sums."""
    ok = slot_ok[:, None] & d_ok[None, :]
    at = ((first + slots) * H + hd)[:, None] * DH + d[None, :]
    if m == 1:
        tl.store(DK + at, dk, mask=ok)
        tl.store(DV + at, dv, mask=ok)
    else:
        tl.store(WK + at, dk, mask=ok)
        tl.store(WV + at, dv, mask=ok)


@triton.jit
def _short_bwd_dkdv_kernel(Q, DO, PS, DS, PROW, POFF, TOFF, KOFF, WOFF, ORDER, DK, DV, WK, WV, B, H, DH,
                           LS, MAXK, CHUNK, sm_scale, stride_qt, stride_qh, stride_ot, stride_oh,
                           BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """Phase 1 of dK/dV for one piece (a row's chunk of <= CHUNK targets, kernels/attention_split.py)
    and head: dV[s] = sum_t P[t, s] dO[t], dK[s] = sm_scale sum_t dS[t, s] Q[t] over the chunk's
    targets (order[first:first + cnt]) for the row's key slots (BLOCK_L = LS slots per target in the
    stored P and dS), BLOCK_P targets per step (unrolled); every slot < its row's count is written
    (0 when no target attends it)."""
    hd = tl.program_id(1).to(tl.int64)
    ok, row, c, m, first, lo, cnt, k0, kn, lr = _piece(tl.program_id(0).to(tl.int64), PROW, POFF, TOFF,
                                                       KOFF, B, MAXK, CHUNK)
    out = _out_first(WOFF, row, c, m, k0, lr)
    slot = tl.arange(0, BLOCK_L)
    s_ok = slot < lr
    scratch = hd * LS + slot  # head and key slot within a target's stored P / dS
    for d0 in range(0, DH, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < DH
        dk = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32)
        for j0 in range(0, cnt, BLOCK_P):
            # rank-1 updates, one target at a time (BLOCK_P unrolled): a broadcast-multiply-sum
            # over the step's targets was turned into a tl.dot by Triton (an FMA dot: no MMA)
            for jj in tl.static_range(BLOCK_P):
                ok_j = j0 + jj < cnt
                t = tl.load(ORDER + first + j0 + jj, mask=ok_j, other=0)
                at = t * (H * LS) + scratch
                # the target's test as tiles, not `tile & ok_j` (a scalar bool, which Triton's
                # interpreter widens to an int32 mask: see _visible)
                ok_s = s_ok & (slot * 0 + j0 + jj < cnt)
                ok_d = d_ok & (d * 0 + j0 + jj < cnt)
                p = tl.load(PS + at, mask=ok_s, other=0.0)
                ds = tl.load(DS + at, mask=ok_s, other=0.0)
                do = _widen(tl.load(DO + t * stride_ot + hd * stride_oh + d, mask=ok_d, other=0.0))
                q = _widen(tl.load(Q + t * stride_qt + hd * stride_qh + d, mask=ok_d, other=0.0))
                dv += p[:, None] * do[None, :]
                dk += ds[:, None] * q[None, :]
        _store_dkdv(DK, DV, WK, WV, out, m, slot, s_ok, hd, H, DH, d, d_ok, dk * sm_scale, dv)


@triton.jit
def _dkdv_reduce_kernel(WK, WV, DK, DV, KROW, KOFF, POFF, WOFF, S, H, DH, MAXK, BLOCK_S: tl.constexpr,
                        BLOCK_DH: tl.constexpr):
    """Phase 2 of dK/dV: for BLOCK_S keys and one head, each key of a multi-piece row (m > 1) sums
    its m fp32 partials WK/WV[WOFF[row] + c * lr + slot] in chunk order c = 0 .. m-1 (a fixed
    order: deterministic, no atomics) into DK/DV (S, h, dh); keys of one-piece rows are left as
    phase 1 wrote them."""
    s = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    hd = tl.program_id(1).to(tl.int64)
    s_ok = s < S
    row = tl.load(KROW + s, mask=s_ok, other=0)
    m = tl.load(POFF + row + 1, mask=s_ok, other=0) - tl.load(POFF + row, mask=s_ok, other=0)
    k0 = tl.load(KOFF + row, mask=s_ok, other=0)
    lr = tl.minimum(tl.load(KOFF + row + 1, mask=s_ok, other=0) - k0, MAXK)
    live = s_ok & (m > 1) & (s - k0 < lr)
    base = tl.load(WOFF + row, mask=live, other=0) + (s - k0)
    d = tl.arange(0, BLOCK_DH)
    ok = live[:, None] & (d < DH)[None, :]
    dk = tl.zeros([BLOCK_S, BLOCK_DH], dtype=tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DH], dtype=tl.float32)
    for c in range(0, tl.max(tl.where(live, m, 0), axis=0).to(tl.int32)):
        at = ((base + c * lr) * H + hd)[:, None] * DH + d[None, :]
        take = ok & (c < m)[:, None]
        dk += tl.load(WK + at, mask=take, other=0.0)
        dv += tl.load(WV + at, mask=take, other=0.0)
    at = (s * H + hd)[:, None] * DH + d[None, :]
    tl.store(DK + at, dk, mask=ok)
    tl.store(DV + at, dv, mask=ok)


# ----------------------------------------------------------------------------- flash kernels
@triton.jit
def _cast(a, like, DOT_FP32: tl.constexpr):
    """a in like's dtype for a 16-bit MMA (kept fp32 when DOT_FP32)."""
    if DOT_FP32:
        return a
    else:
        return to_16bit(a, like.dtype)


@triton.jit
def _load_rows(PTR, idx, ok, hd, stride_t, stride_h, dh_idx, dh_ok):
    """(len(idx), BLOCK_DH) tile of rows idx of head hd; 0 outside (idx and hd int64)."""
    return tl.load(PTR + idx.to(tl.int64)[:, None] * stride_t + hd * stride_h + dh_idx[None, :],
                   mask=ok[:, None] & dh_ok[None, :], other=0.0)


@triton.jit
def _row_program(TOFF, KOFF, H):
    """(row, head, its first target slot, target count, first key, key count) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    t0 = tl.load(TOFF + b)
    k0 = tl.load(KOFF + b)
    # the counts as int32 (< 2^31 per row): an int64 loop bound took a stack slot and spilled
    return b, pid % H, t0, (tl.load(TOFF + b + 1) - t0).to(tl.int32), k0, (tl.load(KOFF + b + 1) - k0).to(tl.int32)


@triton.jit
def _scores(q, k, keys, col_ok, rows, cols, MASK, sm_scale, causal, DOT_FP32: tl.constexpr):
    """Masked scaled scores (BLOCK_P, BLOCK_L) of q rows against key tile k; -inf masked. rows /
    cols: positions within the row (for causal), keys: the keys' flat indices (for the mask)."""
    s = _dot(q, tl.trans(k), DOT_FP32) * sm_scale
    pad = tl.load(MASK + keys, mask=col_ok, other=1)
    keep = (col_ok & (pad == 0))[None, :] & (rows[:, None] >= 0)
    keep = keep & _visible(cols[None, :], rows[:, None], causal)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _target_tile(Q, TOFF, KOFF, ORDER, H, DH, stride_qt, stride_qh, BLOCK_P: tl.constexpr,
                 BLOCK_DH: tl.constexpr):
    """The forward's and dQ's program: (head, target count, first key, key count, keys to visit
    (0 for a tile past the row's targets: no work), target slots in the row, their mask, the
    targets' flat indices, feature indices, their mask, the (BLOCK_P, BLOCK_DH) q tile)."""
    b, hd, t0, tn, k0, kn = _row_program(TOFF, KOFF, H)
    rows = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    row_ok = rows < tn
    t = tl.load(ORDER + t0 + rows, mask=row_ok, other=0)
    dh_idx = tl.arange(0, BLOCK_DH)
    dh_ok = dh_idx < DH
    q = _load_rows(Q, t, row_ok, hd, stride_qt, stride_qh, dh_idx, dh_ok)
    n_keys = tl.where(tl.program_id(1) * BLOCK_P < tn, kn, 0)
    return hd, tn, k0, kn, n_keys, rows, row_ok, t, dh_idx, dh_ok, q


@triton.jit
def _flash_fwd_kernel(Q, K, V, MASK, TOFF, KOFF, ORDER, O, LSE, H, DH, sm_scale, causal,
                      stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                      stride_ot, stride_oh, DOT_FP32: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_L: tl.constexpr, BLOCK_DH: tl.constexpr):
    hd, tn, k0, kn, n_keys, rows, row_ok, t, dh_idx, dh_ok, q = _target_tile(
        Q, TOFF, KOFF, ORDER, H, DH, stride_qt, stride_qh, BLOCK_P, BLOCK_DH)
    m_i = tl.full([BLOCK_P], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_P], dtype=tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_DH], dtype=tl.float32)
    for c0 in range(0, n_keys, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        col_ok = cols < kn
        k = _load_rows(K, k0 + cols, col_ok, hd, stride_kt, stride_kh, dh_idx, dh_ok)
        s = _scores(q, k, k0 + cols, col_ok, rows, cols, MASK, sm_scale, causal, DOT_FP32)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m_i - shift)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_rows(V, k0 + cols, col_ok, hd, stride_vt, stride_vh, dh_idx, dh_ok)
        acc = acc * alpha[:, None] + _dot(_cast(p, v, DOT_FP32), v, DOT_FP32)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptr = O + t[:, None] * stride_ot + hd * stride_oh + dh_idx[None, :]
    tl.store(o_ptr, out, mask=row_ok[:, None] & dh_ok[None, :])
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + t * H + hd, lse, mask=row_ok)


@triton.jit
def _flash_bwd_dkdv_kernel(Q, K, V, MASK, DO, LSE, DELTA, PROW, POFF, TOFF, KOFF, WOFF, ORDER, DK, DV, WK, WV,
                           B, H, DH, MAXK, CHUNK, sm_scale, causal, stride_qt, stride_qh, stride_kt,
                           stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, DOT_FP32: tl.constexpr,
                           BLOCK_P: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DH: tl.constexpr):
    """Phase 1 of dK/dV for one piece (a row's chunk of <= CHUNK targets, kernels/attention_split.py),
    head (program_id(0) = piece * H + head) and tile of the row's keys: dV = P^T dO,
    dK = sm_scale * dS^T Q over the chunk's targets. LSE arrives with -inf replaced by +inf (a
    target without keys: P = 0)."""
    pid = tl.program_id(0).to(tl.int64)
    hd = pid % H
    ok, row, c, m, first, lo, cnt, k0, kn, lr = _piece(pid // H, PROW, POFF, TOFF, KOFF, B, MAXK, CHUNK)
    out = _out_first(WOFF, row, c, m, k0, lr)
    cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    col_ok = cols < lr
    dh_idx = tl.arange(0, BLOCK_DH)
    dh_ok = dh_idx < DH
    k = _load_rows(K, k0 + cols, col_ok, hd, stride_kt, stride_kh, dh_idx, dh_ok)
    v = _load_rows(V, k0 + cols, col_ok, hd, stride_vt, stride_vh, dh_idx, dh_ok)
    dk = tl.zeros([BLOCK_L, BLOCK_DH], dtype=tl.float32)
    dv = tl.zeros([BLOCK_L, BLOCK_DH], dtype=tl.float32)
    n_targets = tl.where(tl.program_id(1) * BLOCK_L < lr, cnt, 0)
    for r0 in range(0, n_targets, BLOCK_P):
        j = r0 + tl.arange(0, BLOCK_P)
        row_ok = j < cnt
        t = tl.load(ORDER + first + j, mask=row_ok, other=0)
        q = _load_rows(Q, t, row_ok, hd, stride_qt, stride_qh, dh_idx, dh_ok)
        lse = tl.load(LSE + t * H + hd, mask=row_ok, other=float("inf"))
        # positions within the row (lo + j) for the causal rule
        p = tl.exp(_scores(q, k, k0 + cols, col_ok, lo + j, cols, MASK, sm_scale, causal, DOT_FP32) - lse[:, None])
        do = _load_rows(DO, t, row_ok, hd, stride_ot, stride_oh, dh_idx, dh_ok)
        dv += _dot(_cast(tl.trans(p), do, DOT_FP32), do, DOT_FP32)
        dp = _dot(do, tl.trans(v), DOT_FP32)
        delta = tl.load(DELTA + t * H + hd, mask=row_ok, other=0.0)
        ds = p * (dp - delta[:, None])
        dk += _dot(_cast(tl.trans(ds), q, DOT_FP32), q, DOT_FP32)
    _store_dkdv(DK, DV, WK, WV, out, m, cols, col_ok, hd, H, DH, dh_idx, dh_ok, dk * sm_scale, dv)


@triton.jit
def _flash_bwd_dq_kernel(Q, K, V, MASK, DO, LSE, DELTA, TOFF, KOFF, ORDER, DQ, H, DH, sm_scale, causal,
                         stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_ot, stride_oh, DOT_FP32: tl.constexpr, BLOCK_P: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_DH: tl.constexpr):
    """dQ = sm_scale * dS K for one tile of a row's targets, looping over the row's keys."""
    hd, tn, k0, kn, n_keys, rows, row_ok, t, dh_idx, dh_ok, q = _target_tile(
        Q, TOFF, KOFF, ORDER, H, DH, stride_qt, stride_qh, BLOCK_P, BLOCK_DH)
    do = _load_rows(DO, t, row_ok, hd, stride_ot, stride_oh, dh_idx, dh_ok)
    lse = tl.load(LSE + t * H + hd, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + t * H + hd, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_P, BLOCK_DH], dtype=tl.float32)
    for c0 in range(0, n_keys, BLOCK_L):
        cols = c0 + tl.arange(0, BLOCK_L)
        col_ok = cols < kn
        k = _load_rows(K, k0 + cols, col_ok, hd, stride_kt, stride_kh, dh_idx, dh_ok)
        p = tl.exp(_scores(q, k, k0 + cols, col_ok, rows, cols, MASK, sm_scale, causal, DOT_FP32) - lse[:, None])
        v = _load_rows(V, k0 + cols, col_ok, hd, stride_vt, stride_vh, dh_idx, dh_ok)
        ds = p * (_dot(do, tl.trans(v), DOT_FP32) - delta[:, None])
        dq += _dot(_cast(ds, k, DOT_FP32), k, DOT_FP32)
    base = (t * H + hd)[:, None] * DH + dh_idx[None, :]
    tl.store(DQ + base, dq * sm_scale, mask=row_ok[:, None] & dh_ok[None, :])


# ----------------------------------------------------------------------------- host side
def _tile(n, options):
    """The smallest option >= n (the largest when none is)."""
    return next((o for o in options if o >= n), options[-1])


# padded head dim -> (BLOCK_P options, BLOCK_L options) of the flash kernels for 16-bit inputs;
# the host launches any pair. Every pair is one that bench/kernel_report.py compiled for sm_80,
# sm_86 and sm_90a (forward, dK/dV and dQ kernels) without register spills and within the
# A100's shared memory; pairs that failed there were removed (64-row target tiles with head
# dim >= 32 spilled in dQ or dK/dV; since the kernels run over segments, 128-key tiles at head
# dim 16 spilled a few bytes in fp16).
_BLOCKS = {16: ((16, 64), (16, 64)), 32: ((16,), (16, 64, 128)), 64: ((16,), (16, 64)),
           128: ((16,), (16, 32)), 256: ((16, 32), (16,))}
# fp32 inputs (3xTF32 dots: twice the operand registers): only head dims <= FP32_MAX_HEAD_DIM
# compiled spill-free; from 128 on every tile tried (16..64 x 16..64) spilled in the backward.
# Over segments, head dims 16 and 64 need 8 warps (FP32_EIGHT_WARPS) and head dim 16 64-key tiles;
# head dim 32 too since the dK/dV split (issue 27 item 6: its 16 x 32 dK/dV tile, at 253 registers
# before, spilled 12 bytes on sm_90a with 4 warps).
_BLOCKS_FP32 = {16: ((16, 32), (64,)), 32: ((16,), (16, 32)), 64: ((16, 32), (16,))}
FP32_EIGHT_WARPS = (16, 32, 64)
FP32_MAX_HEAD_DIM = 64


def block_options(block_dh, fp32=False):
    """Flash kernels: (BLOCK_P options, BLOCK_L options) the host may launch on a GPU for a padded
    head dim and 16-bit (fp32=False) or fp32 inputs; within (BLOCK_P + 2 BLOCK_L) * BLOCK_DH <=
    TILE_BUDGET. (The interpreter always uses 16 x 16 tiles, for speed.)"""
    return (_BLOCKS_FP32 if fp32 else _BLOCKS)[block_dh]


def blocks(p, length, dh, fp32=False, *, gpu=not INTERPRET):
    """Flash kernels: (BLOCK_P, BLOCK_L, BLOCK_DH) for P targets, L history items, head dim dh,
    fp32 (else 16-bit) inputs: the GPU's tiles (block_options), or with gpu=False (the default
    under TRITON_INTERPRET=1) the interpreter's 16 x 16 tiles, which keep it fast."""
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


def short_history(max_keys):
    """Whether rows of at most max_keys history items take the short kernels."""
    return max_keys <= SHORT_MAX_KEYS


def short_blocks(max_keys, dh):
    """Short forward / dQ kernels: (BLOCK_T targets per program, BLOCK_L key slots, BLOCK_D head
    dim chunk) with BLOCK_T * BLOCK_L * BLOCK_D = SHORT_TILE (at most SHORT_MAX_ROWS targets;
    16-wide chunks with 16 key slots: 4 x 16 x 32 spilled in the fp32 dQ kernel on sm_80)."""
    block_l = triton.next_power_of_2(max(max_keys, 1))
    block_d = 16 if dh <= 16 or block_l >= 16 else 32
    return min(SHORT_MAX_ROWS, SHORT_TILE // (block_l * block_d)), block_l, block_d


def short_dkdv_blocks(max_keys, max_targets, chunk):
    """Short dK/dV kernel (a program per piece: one row's chunk of <= chunk targets): (BLOCK_L key
    slots = the row's, as in short_blocks; BLOCK_P targets per step; BLOCK_D). BLOCK_P pads a
    piece's target count (min(max_targets, chunk)) least, the larger on a tie; 4 when max_targets
    is not known. BLOCK_D is 16 and BLOCK_P at most 4: (16, 8, 16) and (16, 4, 32) tiles spilled a
    few bytes on sm_90a (bench/kernel_report.py)."""
    if max_targets > 0:
        most = min(max_targets, chunk)
        block_p = min(SHORT_BLOCK_P, key=lambda b: (-(-most // b) * b, -b))
    else:
        block_p = 4
    return triton.next_power_of_2(max(max_keys, 1)), block_p, 16


def reduce_blocks(dh):
    """dK/dV phase 2 (_dkdv_reduce_kernel): (BLOCK_S keys, BLOCK_DH) with BLOCK_S * BLOCK_DH =
    REDUCE_TILE fp32 per accumulator."""
    block_dh = max(16, triton.next_power_of_2(dh))
    return max(1, REDUCE_TILE // block_dh), block_dh


def supports(targets, num_heads, **_):
    """Whether this backend handles the call (used by backend='auto'): head dim <= MAX_HEAD_DIM,
    and <= FP32_MAX_HEAD_DIM when the projections give fp32 (no CUDA autocast to 16 bits)."""
    dh = targets.shape[-1] // num_heads
    dtype = targets.dtype
    if targets.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    fp32 = dtype in (torch.float32, torch.float64) and not INTERPRET
    return dh <= (FP32_MAX_HEAD_DIM if fp32 else MAX_HEAD_DIM)


def _mask_arg(mask, n, device):
    """(S,) uint8, 1 = padding (all 0 without a mask)."""
    return torch.zeros(n, dtype=torch.uint8, device=device) if mask is None else mask.to(torch.uint8).contiguous()


def _strides(t):
    """(row, head) element strides of a (N, h, dh) view."""
    return t.stride(0), t.stride(1)


def _compute(t):
    """fp64 is computed in fp32 here (tests hold this backend to fp32 tolerances)."""
    return t.float() if t.dtype == torch.float64 else t


def _dot_fp32(dtype):
    return dtype == torch.float32  # 16-bit: 16-bit MMA (emulated in the interpreter, kernels/_mma.py)


def grid(b, h, tiles):
    """Flash: (b * h, tiles): the many (row, head) pairs on axis 0, whose limit is 2^31 - 1."""
    if tiles > 65535:
        raise ValueError(f"too many target or history tiles per row ({tiles} > 65535)")
    return (b * h, tiles)


def _check_head_dim(dh):
    if dh > MAX_HEAD_DIM:
        raise ValueError(f"the triton attention core supports head dim <= {MAX_HEAD_DIM} "
                         f"(embed_dim / num_heads), got {dh}")


def _max_targets(seg):
    """The most targets in a row: the flash kernels' grid. One host read when the layout did not
    say (history_index, target_offsets), stated in reconstruction_attention's docstring and
    docs/design.md; tests/ops/test_attention_host_reads.py counts it."""
    if seg.max_targets >= 0:
        return seg.max_targets
    counts = seg.target_offsets[1:] - seg.target_offsets[:-1]
    return int(counts.max()) if counts.numel() else 0


def _index(seg):
    """The segment table's tensors, contiguous int64."""
    return [x.contiguous().long() for x in (seg.target_rows, seg.key_rows, seg.target_offsets,
                                            seg.key_offsets, seg.order)]


def attention_forward(q, k, v, seg, causal, sm_scale):
    """q (T, h, dh), k/v (S, h, dh) views over the segments seg -> O (T, h*dh) fp32 and
    LSE (T, h) fp32. causal: 0 none, 1 strict, 2 inclusive."""
    q, k, v = _compute(q), _compute(k), _compute(v)
    n_t, h, dh = q.shape
    _check_head_dim(dh)
    trow, _, toff, koff, order = _index(seg)
    o = torch.empty(n_t, h, dh, device=q.device, dtype=torch.float32)
    lse = torch.empty(n_t, h, device=q.device, dtype=torch.float32)
    mask = _mask_arg(seg.key_padding_mask, k.shape[0], q.device)
    if n_t == 0 or h == 0:
        return o.view(n_t, h * dh), lse
    common = (h, dh, float(sm_scale), int(causal), *_strides(q), *_strides(k), *_strides(v), *_strides(o))
    with device_guard(q):
        if short_history(seg.max_keys):
            bt, bl, bd = short_blocks(seg.max_keys, dh)
            _short_fwd_kernel[(triton.cdiv(n_t, bt), h)](
                q, k, v, mask, trow, koff, toff, o, lse, n_t, *common,
                BLOCK_T=bt, BLOCK_L=bl, BLOCK_D=bd, num_warps=SHORT_WARPS, num_stages=NUM_STAGES)
        else:
            most = _max_targets(seg)
            bp, bl, bdh = blocks(most, seg.max_keys, dh, q.dtype == torch.float32)
            n_rows = toff.numel() - 1
            _flash_fwd_kernel[grid(n_rows, h, triton.cdiv(most, bp))](
                q, k, v, mask, toff, koff, order, o, lse, *common,
                DOT_FP32=_dot_fp32(q.dtype), BLOCK_P=bp, BLOCK_L=bl, BLOCK_DH=bdh,
                num_warps=num_warps(bp, bl, bdh, _dot_fp32(q.dtype)), num_stages=NUM_STAGES)
    return o.view(n_t, h * dh), lse


def attention_backward(grad_o, q, k, v, o, lse, seg, causal, sm_scale):
    """(dq, dk, dv), contiguous (T, h, dh) / (S, h, dh) in the dtypes of q / k / v."""
    dtypes = (q.dtype, k.dtype, v.dtype)
    q, k, v = _compute(q), _compute(k), _compute(v)
    n_t, h, dh = q.shape
    n_s = k.shape[0]
    _check_head_dim(dh)
    trow, krow, toff, koff, order = _index(seg)
    do = grad_o.to(q.dtype).reshape(n_t, h, dh)
    lse_safe = torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).contiguous()
    dq = torch.zeros(n_t, h, dh, device=q.device, dtype=torch.float32)
    dk = torch.zeros(n_s, h, dh, device=q.device, dtype=torch.float32)
    dv = torch.zeros_like(dk)
    mask = _mask_arg(seg.key_padding_mask, n_s, q.device)
    if n_t and n_s and h:
        with device_guard(q):
            if short_history(seg.max_keys):
                _short_backward(q, k, v, do, mask, lse_safe, trow, krow, toff, koff, order,
                                dq, dk, dv, seg, causal, sm_scale)
            else:
                delta = (do.float() * o.float().reshape(n_t, h, dh)).sum(-1).contiguous()  # (T, h)
                _flash_backward(q, k, v, do, mask, lse_safe, delta, krow, toff, koff, order, dq, dk, dv,
                                seg, causal, sm_scale)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2])


def _short_backward(q, k, v, do, mask, lse, trow, krow, toff, koff, order, dq, dk, dv, seg, causal,
                    sm_scale):
    n_t, h, dh = q.shape
    bt, bl, bd = short_blocks(seg.max_keys, dh)
    probs = torch.empty(n_t, h, bl, device=q.device, dtype=torch.float32)
    dscores = torch.empty_like(probs)
    _short_bwd_dq_kernel[(triton.cdiv(n_t, bt), h)](
        q, k, v, mask, do, lse, trow, koff, toff, dq, probs, dscores, n_t, h, dh,
        float(sm_scale), int(causal), *_strides(q), *_strides(k), *_strides(v), *_strides(do),
        BLOCK_T=bt, BLOCK_L=bl, BLOCK_D=bd, num_warps=SHORT_WARPS, num_stages=NUM_STAGES)
    plan = split_plan(seg, toff, koff, n_t, k.shape[0])
    wk, wv = _workspace(plan, dk)
    _, bp, bd = short_dkdv_blocks(seg.max_keys, seg.max_targets, plan.chunk)
    _short_bwd_dkdv_kernel[(_axis0(plan.n_pieces), h)](
        q, do, probs, dscores, plan.piece_rows, plan.piece_offsets, toff, koff, plan.ws_offsets, order,
        dk, dv, wk, wv, toff.numel() - 1, h, dh, bl, seg.max_keys, plan.chunk, float(sm_scale),
        *_strides(q), *_strides(do), BLOCK_L=bl, BLOCK_P=bp, BLOCK_D=bd,
        num_warps=SHORT_DKDV_WARPS, num_stages=NUM_STAGES)
    _reduce(plan, wk, wv, dk, dv, krow, koff, seg.max_keys)


def _flash_backward(q, k, v, do, mask, lse, delta, krow, toff, koff, order, dq, dk, dv, seg, causal,
                    sm_scale):
    n_t, h, dh = q.shape
    most = _max_targets(seg)
    bp, bl, bdh = blocks(most, seg.max_keys, dh, q.dtype == torch.float32)
    n_rows = toff.numel() - 1
    common = dict(DOT_FP32=_dot_fp32(q.dtype), BLOCK_P=bp, BLOCK_L=bl, BLOCK_DH=bdh,
                  num_warps=num_warps(bp, bl, bdh, _dot_fp32(q.dtype)), num_stages=NUM_STAGES)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    plan = split_plan(seg, toff, koff, n_t, k.shape[0])
    wk, wv = _workspace(plan, dk)
    _flash_bwd_dkdv_kernel[grid(_axis0(plan.n_pieces), h, triton.cdiv(seg.max_keys, bl))](
        q, k, v, mask, do, lse, delta, plan.piece_rows, plan.piece_offsets, toff, koff, plan.ws_offsets,
        order, dk, dv, wk, wv, n_rows, h, dh, seg.max_keys, plan.chunk, float(sm_scale), int(causal),
        *strides, **common)
    _reduce(plan, wk, wv, dk, dv, krow, koff, seg.max_keys)
    _flash_bwd_dq_kernel[grid(n_rows, h, triton.cdiv(most, bp))](
        q, k, v, mask, do, lse, delta, toff, koff, order, dq, h, dh, float(sm_scale), int(causal),
        *strides, **common)


def split_plan(seg, toff, koff, n_targets, n_keys):
    """The dK/dV split both backward paths launch (kernels/attention_split.split_plan; no host read)."""
    return attention_split.split_plan(toff, koff, n_targets, n_keys, seg.max_keys, seg.max_targets)


def _axis0(n):
    if n > 2 ** 31 - 1:
        raise ValueError(f"too many dK/dV pieces for grid axis 0 ({n} > 2^31 - 1)")
    return n


def _workspace(plan, dk):
    """fp32 (ws_rows, h, dh) partials of dK and dV (kernels/attention_split.py); with ws_rows = 0
    no row has two pieces and nothing is written there: dk itself stands in as the pointer."""
    if plan.ws_rows == 0:
        return dk, dk
    shape = (plan.ws_rows, *dk.shape[1:])
    return (torch.empty(shape, device=dk.device, dtype=torch.float32),
            torch.empty(shape, device=dk.device, dtype=torch.float32))


def _reduce(plan, wk, wv, dk, dv, krow, koff, max_keys):
    """Phase 2 of dK/dV (sums multi-piece rows' partials); not launched when no row can have two
    pieces (plan.ws_rows == 0)."""
    if plan.ws_rows == 0:
        return
    n_s, h, dh = dk.shape
    bs, bdh = reduce_blocks(dh)
    _dkdv_reduce_kernel[(triton.cdiv(n_s, bs), h)](
        wk, wv, dk, dv, krow, koff, plan.piece_offsets, plan.ws_offsets, n_s, h, dh, max_keys,
        BLOCK_S=bs, BLOCK_DH=bdh, num_warps=REDUCE_WARPS, num_stages=NUM_STAGES)


def default_scale(dh):
    return 1.0 / math.sqrt(dh)
