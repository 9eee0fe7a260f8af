"""Triton kernels for the contrastive masked log-sum-exp (same contract as the C++ op
courier_fast::contrastive_lse, see csrc/courier_fast.cpp).

S[j, i] = scale * inv_x[j] * inv_y[i] * <x_j, y_i>: the L2 normalisation is fused as per-row
inverse norms applied to the fp32 logits tile (fp16 inputs are normalised on the host instead,
see _prep). The scale is a 1-element device tensor the kernels load (never read back to the
host). Masks arrive as additive biases (0 kept, -inf dropped), always present; the row
direction's bias also holds -logq_i. Accidental hits (HAS_IDS: x_ids[j] == y_ids[i] and
i != j + id_offset) are masked in the tile from the two id vectors, never stored N x M.

  forward   _row_lse_kernel: programs over row blocks, online max/sum over column tiles.
            Column LSEs (symmetric loss) are the same kernel with x and y swapped.
  backward  dS = g * exp(S - logq - row_lse) [y kept] + h * exp(S - col_lse) [x kept], 0 at hits.
            _grad_x_kernel: programs over row blocks; each recomputes S once per column tile
            (over every feature) and adds dS @ y_tile to its (BLOCK_N, d) fp32 accumulator,
            held as NUM_K chunks of BLOCK_K features; it also sums dS * cos per row: the
            scale's gradient, with no extra pass. _grad_y_kernel: the same over column blocks
            (dS^T @ x_tile). Each program owns its output rows: no atomics, nothing N x M stored.

Feature widths (d_class): the forward holds one block of the padded width up to CHUNK (128) and
loops over chunks of CHUNK above it. The gradient kernels hold x and the accumulator as one block
of the power-of-two width where that pads no more than chunks would (16..128, 256, 512); other
widths up to MAX_FUSED_D = 1024 are tiled by CHUNK without padding to a power of two (d = 384 is
3 chunks, 768 is 6), the accumulator keeping every chunk (fewer rows per program as d grows, see
the tables). Work per forward + backward: 2 N M d (forward; 4 with columns) + 2 x (2 N M d
recompute + 2 N M d gradient GEMM) = 10 N M d, i.e. 1.25x the 8 N M d floor (1.5x symmetric), for
every d a multiple of 128 up to 1024 and d = 16, 32, 64. Above 1024 the accumulator is split
into groups of 1024 features on grid axis 1, each recomputing S. The
second GEMM casts dS (rescaled per output row so that 16-bit values neither underflow nor
overflow) to the input dtype, FlashAttention style: every tl.dot runs at the input precision
with fp32 accumulation. fp32 inputs use 3xTF32 dots (IEEE fp32 under TRITON_INTERPRET=1,
which emulates the 16-bit MMA: kernels/_mma.py).
"""
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from courier_fast.kernels import _tune_cache
from courier_fast.kernels._launch import INTERPRET, device_guard
from courier_fast.kernels._mma import dot as _dot
from courier_fast.kernels._mma import to_16bit
from courier_fast.ops.row_norms import inverse_norms, normalize_backward

CHUNK = 128  # feature chunk above which the kernels loop over features
MAX_CHUNKS = 8  # accumulator chunks one gradient program holds
MAX_FUSED_D = CHUNK * MAX_CHUNKS  # above: the gradient accumulator is split over feature groups
MAX_BLOCK_D = 512  # widest power-of-two class the gradient kernels hold as one block (x and the
                   # accumulator whole, one y tile feeding both GEMMs: the least traffic)


# --------------------------------------------------------------------------- configurations
def _cfg(bn, bm, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=warps, num_stages=stages)


# (kernel, d class, 16-bit or fp32 inputs) -> the configs its autotuner may pick. d class: see
# d_class() (16..128, 256, 512: one block; 384, 640..1024: chunks of CHUNK; "split": above).
# Every entry is one that bench/kernel_report.py compiled for sm_80, sm_86 and sm_90a, with and
# without column terms and accidental-hit masks, without register spills and within the A100's /
# H100's shared memory (tests/bench/test_kernel_report.py checks the committed report); configs that
# failed there were removed (the hit masks and the scale's per-row sum cost registers: several
# 128-row and 4-warp gradient tiles spill with them). On the 99 KB parts (sm_86 / sm_89)
# Triton's autotuner skips a config that is out of shared memory, and every table keeps one that
# fits. The gradient kernels hold a (rows, d) fp32 accumulator: the wider d, the fewer rows per
# program (grad_x: BLOCK_N, grad_y: BLOCK_M). fp32 inputs (3xTF32 dots: the operands are split in
# two, so twice the registers and shared memory of a 16-bit tile) get smaller tiles.
_FWD = [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)]
_FWD_WIDE = [(128, 64, 8, 3), (64, 128, 8, 3)]
_GRAD = {  # 16-bit inputs, per d class (grad_x holds BLOCK_N rows, grad_y BLOCK_M columns)
    "grad_x": {16: [(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 4)],
               32: [(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 4)],
               64: [(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 4)],
               128: [(64, 64, 8, 3), (64, 32, 4, 3)],
               256: [(64, 64, 8, 2), (64, 32, 8, 2)],
               384: [(32, 64, 8, 2), (32, 32, 8, 2)],
               512: [(32, 64, 8, 2), (32, 32, 8, 2)],
               640: [(32, 32, 8, 2), (16, 32, 8, 2)],
               768: [(32, 32, 8, 2), (16, 64, 8, 2)],
               896: [(32, 32, 8, 2), (16, 32, 8, 2)],
               1024: [(16, 32, 8, 2), (32, 16, 8, 2)],
               "split": [(16, 32, 8, 2), (32, 16, 8, 2)]},
    "grad_y": {16: [(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 4)],
               32: [(128, 64, 8, 3), (64, 64, 8, 3), (64, 64, 4, 4)],
               64: [(64, 64, 8, 3), (64, 32, 4, 4)],
               128: [(128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3)],
               256: [(64, 32, 4, 2)],
               384: [(64, 32, 8, 2), (32, 32, 8, 2)],
               512: [(64, 32, 8, 2), (32, 32, 4, 2)],
               640: [(32, 32, 16, 2), (16, 32, 8, 2)],
               768: [(32, 32, 8, 2), (32, 16, 8, 2)],
               896: [(32, 32, 8, 2), (32, 16, 8, 2)],
               1024: [(32, 16, 8, 2), (16, 32, 8, 2)],
               "split": [(32, 16, 8, 2), (16, 32, 8, 2)]},
}
_FP32 = {  # fp32 inputs: only d <= FP32_MAX_D compiled spill-free (see FP32_MAX_D)
    "row_lse": {16: [(64, 64, 4, 3), (32, 64, 4, 3), (32, 32, 4, 2)],
                32: [(64, 64, 4, 3), (32, 64, 4, 3), (32, 32, 4, 2)],
                64: [(64, 32, 4, 3), (32, 64, 4, 3), (32, 32, 4, 2)]},
    "grad_x": {16: [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
               32: [(64, 32, 4, 2), (32, 32, 4, 2)],
               64: [(32, 32, 4, 2)]},
    "grad_y": {16: [(64, 32, 4, 2), (32, 32, 4, 2)],
               32: [(32, 32, 4, 2)],
               64: [(32, 32, 4, 2)]},
}
# Widest fp32 feature dim launched on a GPU: from d = 128 on, every tile tried (32..128 x
# 32..64, 4-8 warps, with 3xTF32 and with IEEE dots) spilled registers in the gradient kernels
# for sm_80 or sm_90a, so fp32 inputs wider than this go to the `cuda` / `chunked` backends
# (cuBLAS fp32 GEMMs). 16-bit inputs have no such limit.
FP32_MAX_D = 64
D_CLASSES = (16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024, "split")


def config_table(kernel, d_class, fp32=False):
    """[(BLOCK_N, BLOCK_M, num_warps, num_stages)] that `kernel` ('row_lse', 'grad_x', 'grad_y')
    may run for feature dims of d_class and 16-bit (fp32=False) or fp32 inputs, most efficient
    first: choose_config() picks one by the work model, the opt-in autotuner by timing."""
    if fp32:
        return _FP32[kernel][d_class]
    if kernel == "row_lse":
        return _FWD if d_class != "split" and d_class <= CHUNK else _FWD_WIDE
    return _GRAD[kernel][d_class]


def d_class(d):
    """The feature-width class of d: the power of two >= d (at least 16) where that is no wider
    than d's multiple of CHUNK and at most MAX_BLOCK_D (16..128, 256, 512: one held block), else
    the multiple of CHUNK >= d (384, 640, ..., MAX_FUSED_D: feature chunks), then "split"."""
    if d > MAX_FUSED_D:
        return "split"
    pow2, chunks = max(16, triton.next_power_of_2(d)), triton.cdiv(d, CHUNK) * CHUNK
    return pow2 if pow2 <= MAX_BLOCK_D and pow2 <= max(chunks, CHUNK) else chunks


def _configs(kernel, cls, fp32):
    if INTERPRET:  # the interpreter runs every config it is given: one small one
        return [_cfg(16, 16, 4, 1)]
    return [_cfg(*c) for c in config_table(kernel, cls, fp32)]


# --------------------------------------------------------------------------- device code
@triton.jit
def _load_tile(PTR, idx, ok, stride, ks, D):
    """(len(idx), len(ks)) tile of rows idx, features ks; 0 outside. Offsets in int64."""
    offs = idx.to(tl.int64)[:, None] * stride + ks[None, :]
    return tl.load(PTR + offs, mask=ok[:, None] & (ks < D)[None, :], other=0.0)


@triton.jit
def _logits(x, X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y,
            ONE_K: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """<x_j, y_i> (fp32) for a (rows, cols) tile. ONE_K: x is the preloaded (rows, BLOCK_K)
    block holding every feature; else loop over feature chunks of BLOCK_K, loading x and y
    (d need not be a multiple: the last chunk is masked, and padded only to BLOCK_K)."""
    if ONE_K:
        y = _load_tile(Y, cols, col_ok, stride_y, tl.arange(0, BLOCK_K), D)
        acc = _dot(x, tl.trans(y), DOT_FP32)
    else:
        acc = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xk = _load_tile(X, rows, row_ok, stride_x, ks, D)
            yk = _load_tile(Y, cols, col_ok, stride_y, ks, D)
            acc += _dot(xk, tl.trans(yk), DOT_FP32)
    return acc


@triton.jit
def _keep(X_IDS, Y_IDS, id_offset, rows, cols, row_ok, col_ok):
    """(rows, cols) bool: False where column i is an accidental hit of row j (the same id, and
    i != j + id_offset, the row's own positive)."""
    xi = tl.load(X_IDS + rows, mask=row_ok, other=0)
    yi = tl.load(Y_IDS + cols, mask=col_ok, other=0)
    return (xi[:, None] != yi[None, :]) | (cols[None, :] == rows[:, None] + id_offset)


@triton.jit
def _row_lse_kernel(X, Y, INV_X, INV_Y, Y_BIAS, X_IDS, Y_IDS, id_offset, SCALE, OUT, N, M, D,
                    stride_x, stride_y, HAS_IDS: tl.constexpr,
                    ONE_K: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """OUT[j] = logsumexp_i (S[j, i] + Y_BIAS[i]) over all M columns but the row's accidental
    hits (HAS_IDS); -inf for an empty set. SCALE: a 1-element tensor (read on the device)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_scale = tl.load(INV_X + rows, mask=row_ok, other=0.0) * tl.load(SCALE)
    x = _load_tile(X, rows, row_ok, stride_x, tl.arange(0, BLOCK_K), D) if ONE_K else None
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        s = _logits(x, X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y, ONE_K, BLOCK_K, DOT_FP32)
        col_term = tl.load(Y_BIAS + cols, mask=col_ok, other=float("-inf"))
        s = s * row_scale[:, None] * tl.load(INV_Y + cols, mask=col_ok, other=0.0)[None, :] + col_term[None, :]
        if HAS_IDS:
            s = tl.where(_keep(X_IDS, Y_IDS, id_offset, rows, cols, row_ok, col_ok), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf for empty rows
        l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        m_i = m_new
    empty = m_i == float("-inf")
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(OUT + rows, lse, mask=row_ok)


@triton.jit
def _softmax_grad(s, G, LSE_R, H, LSE_C, X_BIAS, Y_BIAS, X_IDS, Y_IDS, id_offset, rows, cols, row_ok,
                  col_ok, HAS_COLS: tl.constexpr, HAS_IDS: tl.constexpr):
    """dL/dS for a tile of fp32 logits s: g_j exp(S + y_bias_i - row_lse_j) (kept columns; the
    bias holds -logq) plus, with columns, h_i exp(S - col_lse_i) (kept rows); 0 at accidental
    hits. LSEs of empty sets arrive as +inf: 0."""
    y_bias = tl.load(Y_BIAS + cols, mask=col_ok, other=float("-inf"))
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    row_lse = tl.load(LSE_R + rows, mask=row_ok, other=float("inf"))
    ds = g[:, None] * tl.exp(s + y_bias[None, :] - row_lse[:, None])
    if HAS_COLS:
        x_bias = tl.load(X_BIAS + rows, mask=row_ok, other=float("-inf"))
        h = tl.load(H + cols, mask=col_ok, other=0.0)
        col_lse = tl.load(LSE_C + cols, mask=col_ok, other=float("inf"))
        ds += h[None, :] * tl.exp(s + x_bias[:, None] - col_lse[None, :])
    if HAS_IDS:
        ds = tl.where(_keep(X_IDS, Y_IDS, id_offset, rows, cols, row_ok, col_ok), ds, 0.0)
    return ds


@triton.jit
def _out_scale(W, idx, ok, OTHER_MAX, HAS_W: tl.constexpr):
    """Per-output-row factor 1 / (|w| + max|other|) that brings the row's dS into [-1, 1]
    before the 16-bit cast (|dS| <= |g_j| + |h_i|); 1 for an all-zero row."""
    bound = tl.load(OTHER_MAX) + tl.zeros(idx.shape, dtype=tl.float32)
    if HAS_W:
        bound += tl.abs(tl.load(W + idx, mask=ok, other=0.0))
    return 1.0 / tl.where(bound > 0, bound, 1.0)


@triton.jit
def _acc_chunk(acc, p, PTR, idx, ok, stride, f0, D, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """acc + p @ PTR[idx, f0:f0 + BLOCK_K] (p already in the operand dtype)."""
    return acc + _dot(p, _load_tile(PTR, idx, ok, stride, f0 + tl.arange(0, BLOCK_K), D), DOT_FP32)


@triton.jit
def _acc_all(acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, p, PTR, idx, ok, stride, f0, D,
             NUM_K: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """The first NUM_K accumulator chunks, each + p @ PTR[idx, its BLOCK_K features from f0]."""
    acc0 = _acc_chunk(acc0, p, PTR, idx, ok, stride, f0, D, BLOCK_K, DOT_FP32)
    if NUM_K > 1:
        acc1 = _acc_chunk(acc1, p, PTR, idx, ok, stride, f0 + BLOCK_K, D, BLOCK_K, DOT_FP32)
    if NUM_K > 2:
        acc2 = _acc_chunk(acc2, p, PTR, idx, ok, stride, f0 + 2 * BLOCK_K, D, BLOCK_K, DOT_FP32)
    if NUM_K > 3:
        acc3 = _acc_chunk(acc3, p, PTR, idx, ok, stride, f0 + 3 * BLOCK_K, D, BLOCK_K, DOT_FP32)
    if NUM_K > 4:
        acc4 = _acc_chunk(acc4, p, PTR, idx, ok, stride, f0 + 4 * BLOCK_K, D, BLOCK_K, DOT_FP32)
    if NUM_K > 5:
        acc5 = _acc_chunk(acc5, p, PTR, idx, ok, stride, f0 + 5 * BLOCK_K, D, BLOCK_K, DOT_FP32)
    if NUM_K > 6:
        acc6 = _acc_chunk(acc6, p, PTR, idx, ok, stride, f0 + 6 * BLOCK_K, D, BLOCK_K, DOT_FP32)
    if NUM_K > 7:
        acc7 = _acc_chunk(acc7, p, PTR, idx, ok, stride, f0 + 7 * BLOCK_K, D, BLOCK_K, DOT_FP32)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _store_chunk(OUT, acc, factor, idx, ok, f0, D, BLOCK_K: tl.constexpr):
    ks = f0 + tl.arange(0, BLOCK_K)
    tl.store(OUT + idx.to(tl.int64)[:, None] * D + ks[None, :], acc * factor[:, None],
             mask=ok[:, None] & (ks < D)[None, :])


@triton.jit
def _grad_x_kernel(X, Y, INV_X, INV_Y, X_BIAS, Y_BIAS, X_IDS, Y_IDS, id_offset, G, LSE_R, H, LSE_C, H_MAX,
                   SCALE, GX, DSCOS, N, M, D, stride_x, stride_y, HAS_COLS: tl.constexpr,
                   HAS_IDS: tl.constexpr, ONE_K: tl.constexpr, NUM_K: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """GX[j, f] = scale * sum_i dS[j, i] inv_y[i] y_i[f] (gradient w.r.t. x_hat, fp32) for the
    NUM_K feature chunks of BLOCK_K of grid axis 1's group, and DSCOS[j] = sum_i dS[j, i]
    cos[j, i] (the scale's gradient per row; group 0 writes it). S is computed once per column
    tile over every feature; each chunk of the (BLOCK_N, NUM_K * BLOCK_K) fp32 accumulator
    adds dS @ y_chunk. ONE_K (d <= BLOCK_K): the x block is held and one y tile feeds both GEMMs."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    f0 = tl.program_id(1) * (NUM_K * BLOCK_K)
    scale = tl.load(SCALE)
    inv_x = tl.load(INV_X + rows, mask=row_ok, other=0.0)
    out_scale = _out_scale(G, rows, row_ok, H_MAX, True)
    x = _load_tile(X, rows, row_ok, stride_x, tl.arange(0, BLOCK_K), D) if ONE_K else None
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc4 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc5 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc6 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc7 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    dscos = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        inv_y = tl.load(INV_Y + cols, mask=col_ok, other=0.0)
        if ONE_K:
            y = _load_tile(Y, cols, col_ok, stride_y, tl.arange(0, BLOCK_K), D)
            dot = _dot(x, tl.trans(y), DOT_FP32)
        else:
            dot = _logits(None, X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y, False, BLOCK_K, DOT_FP32)
        cos = dot * inv_x[:, None] * inv_y[None, :]
        ds = _softmax_grad(cos * scale, G, LSE_R, H, LSE_C, X_BIAS, Y_BIAS, X_IDS, Y_IDS, id_offset, rows, cols,
                           row_ok, col_ok, HAS_COLS, HAS_IDS)
        dscos += tl.sum(ds * cos, axis=1)
        p = ds * out_scale[:, None] * inv_y[None, :]
        if not DOT_FP32:
            p = to_16bit(p, Y.dtype.element_ty)
        if ONE_K:
            acc0 += _dot(p, y, DOT_FP32)
        else:
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _acc_all(
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, p, Y, cols, col_ok, stride_y, f0, D, NUM_K,
                BLOCK_K, DOT_FP32)
    factor = scale / out_scale
    _store_all(GX, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, factor, rows, row_ok, f0, D, NUM_K, BLOCK_K)
    if tl.program_id(1) == 0:
        tl.store(DSCOS + rows, dscos, mask=row_ok)


@triton.jit
def _store_all(OUT, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, factor, idx, ok, f0, D,
               NUM_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Stores the first NUM_K accumulator chunks (times factor per row) at features f0 + ..."""
    _store_chunk(OUT, acc0, factor, idx, ok, f0, D, BLOCK_K)
    if NUM_K > 1:
        _store_chunk(OUT, acc1, factor, idx, ok, f0 + BLOCK_K, D, BLOCK_K)
    if NUM_K > 2:
        _store_chunk(OUT, acc2, factor, idx, ok, f0 + 2 * BLOCK_K, D, BLOCK_K)
    if NUM_K > 3:
        _store_chunk(OUT, acc3, factor, idx, ok, f0 + 3 * BLOCK_K, D, BLOCK_K)
    if NUM_K > 4:
        _store_chunk(OUT, acc4, factor, idx, ok, f0 + 4 * BLOCK_K, D, BLOCK_K)
    if NUM_K > 5:
        _store_chunk(OUT, acc5, factor, idx, ok, f0 + 5 * BLOCK_K, D, BLOCK_K)
    if NUM_K > 6:
        _store_chunk(OUT, acc6, factor, idx, ok, f0 + 6 * BLOCK_K, D, BLOCK_K)
    if NUM_K > 7:
        _store_chunk(OUT, acc7, factor, idx, ok, f0 + 7 * BLOCK_K, D, BLOCK_K)


@triton.jit
def _grad_y_kernel(X, Y, INV_X, INV_Y, X_BIAS, Y_BIAS, X_IDS, Y_IDS, id_offset, G, LSE_R, H, LSE_C, G_MAX,
                   SCALE, GY, N, M, D, stride_x, stride_y, HAS_COLS: tl.constexpr,
                   HAS_IDS: tl.constexpr, ONE_K: tl.constexpr, NUM_K: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_M: tl.constexpr):
    """GY[i, f] = scale * sum_j dS[j, i] inv_x[j] x_j[f] (gradient w.r.t. y_hat), fp32: the
    mirror of _grad_x_kernel over column blocks of BLOCK_M, the row loop tiled by BLOCK_N."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    f0 = tl.program_id(1) * (NUM_K * BLOCK_K)
    scale = tl.load(SCALE)
    inv_y = tl.load(INV_Y + cols, mask=col_ok, other=0.0)
    out_scale = _out_scale(H, cols, col_ok, G_MAX, HAS_COLS)
    y = _load_tile(Y, cols, col_ok, stride_y, tl.arange(0, BLOCK_K), D) if ONE_K else None
    acc0 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc4 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc5 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc6 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    acc7 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        inv_x = tl.load(INV_X + rows, mask=row_ok, other=0.0)
        if ONE_K:
            x = _load_tile(X, rows, row_ok, stride_x, tl.arange(0, BLOCK_K), D)
            dot = _dot(x, tl.trans(y), DOT_FP32)
        else:
            dot = _logits(None, X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y, False, BLOCK_K, DOT_FP32)
        s = dot * (inv_x * scale)[:, None] * inv_y[None, :]
        ds = _softmax_grad(s, G, LSE_R, H, LSE_C, X_BIAS, Y_BIAS, X_IDS, Y_IDS, id_offset, rows, cols, row_ok,
                           col_ok, HAS_COLS, HAS_IDS)
        p = tl.trans(ds * inv_x[:, None] * out_scale[None, :])
        if not DOT_FP32:
            p = to_16bit(p, X.dtype.element_ty)
        if ONE_K:
            acc0 += _dot(p, x, DOT_FP32)
        else:
            acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _acc_all(
                acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, p, X, rows, row_ok, stride_x, f0, D, NUM_K,
                BLOCK_K, DOT_FP32)
    _store_all(GY, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7, scale / out_scale, cols, col_ok, f0, D,
               NUM_K, BLOCK_K)


# ----------------------------------------------------------------------------- host side
# Which config a launch runs. By default a pure function of (kernel, d class, input kind, the
# power-of-two bucket of the size its grid runs over, feature groups): the same on every rank,
# in a resumed run and inside CUDA-graph capture, and nothing is benchmarked. Work model: a
# table lists a kernel's configs most efficient first (largest tiles: least re-read of the
# other operand); launches want at least MIN_PROGRAMS programs (two waves of an H100's 132 SMs,
# 2.4 of an A100's 108) so that small batches still fill the device. The first config that
# gives that many programs at the bucket is chosen, else the one giving the most (the first
# such); a config out of the device's shared memory (the 99 KB of sm_86 / sm_89: Triton's
# autotuner used to skip those) gives way to the table's next. Opt-in
# (COURIER_FAST_TRITON_AUTOTUNE=1): Triton's timing autotuner, one per (kernel, class, kind,
# bucket) and keyed on D only, so it benchmarks once per bucket and d, and its choice is cached
# on disk per device and software version (kernels/_tune_cache.py), so it times once there, not
# once per process (never during CUDA-graph capture: the deterministic choice runs there); two
# machines, or a cleared cache, can still choose differently.
MIN_PROGRAMS = 256
AUTOTUNE_ENV = "COURIER_FAST_TRITON_AUTOTUNE"
_KERNELS = {"row_lse": "_row_lse_kernel", "grad_x": "_grad_x_kernel", "grad_y": "_grad_y_kernel"}
_TUNED = {}


def size_bucket(size):
    """The power of two >= size (at least 1): sizes that share it share a config."""
    return triton.next_power_of_2(max(1, int(size)))


def config_order(kernel, cls, fp32, size, groups=1, table=None):
    """The configs `kernel` tries for d class `cls`, fp32 (else 16-bit) inputs and `size` rows on
    its parallel axis (row_lse, grad_x: N; grad_y: M), with `groups` feature groups on grid axis
    1, in order: choose_config()'s first, then the rest of the table in its order (a config out
    of the device's shared memory, e.g. on sm_86 / sm_89's 99 KB, is skipped: see launch()).
    table: the candidates (default: what _configs() gives the launch)."""
    table = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps, c.num_stages)
             for c in _configs(kernel, cls, fp32)] if table is None else list(table)
    axis = 1 if kernel == "grad_y" else 0
    bucket = size_bucket(size)
    programs = [triton.cdiv(bucket, c[axis]) * groups for c in table]
    enough = [c for c, p in zip(table, programs) if p >= MIN_PROGRAMS]
    first = enough[0] if enough else table[programs.index(max(programs))]
    return [first] + [c for c in table if c != first]


def choose_config(kernel, cls, fp32, size, groups=1, table=None):
    """(BLOCK_N, BLOCK_M, num_warps, num_stages) that `kernel` runs first (config_order): the
    table's first config that gives >= MIN_PROGRAMS programs at size's bucket, else the one
    giving the most (the first such)."""
    return config_order(kernel, cls, fp32, size, groups, table)[0]


def _autotune():
    return os.environ.get(AUTOTUNE_ENV, "") == "1"


def _capturing(t):
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_OUT_OF_RESOURCES = set()  # (kernel, cls, fp32, config, device) that did not fit the device


def launch(kernel, cls, fp32, size, groups, grid, *args, **kwargs):
    """Runs `kernel` ('row_lse', 'grad_x', 'grad_y') on grid(meta) with the first config of
    config_order() that fits the device (as Triton's autotuner skipped configs out of shared
    memory, and remembered per process): deterministic unless the timing autotuner is opted in."""
    fn = globals()[_KERNELS[kernel]]
    if _autotune() and not _capturing(args[0]):
        return _tuned_launch(fn, kernel, cls, fp32, size, grid, *args, **kwargs)
    device = str(args[0].device)
    error = None
    for bn, bm, warps, stages in config_order(kernel, cls, fp32, size, groups):
        if (kernel, cls, fp32, (bn, bm, warps, stages), device) in _OUT_OF_RESOURCES:
            continue
        try:
            return fn[grid](*args, **kwargs, BLOCK_N=bn, BLOCK_M=bm, num_warps=warps, num_stages=stages)
        except OutOfResources as e:
            _OUT_OF_RESOURCES.add((kernel, cls, fp32, (bn, bm, warps, stages), device))
            error = e
    raise error if error is not None else RuntimeError(f"no config of {kernel} fits {device}")


def _tuned_launch(fn, kernel, cls, fp32, size, grid, *args, **kwargs):
    """The opt-in timing autotuner: the config timed for (kernel, class, kind, bucket, D) on this
    device and software version (kernels/_tune_cache.py, on disk), else Triton's autotuner times
    the table (once per process per key) and its choice is stored there."""
    d = args[fn.arg_names.index("D")]
    key = f"{kernel}|{cls}|{'fp32' if fp32 else '16bit'}|{size_bucket(size)}|{d}"
    cached = _tune_cache.lookup(args[0].device, __file__, key)
    if cached is not None:
        bn, bm, warps, stages = cached
        return fn[grid](*args, **kwargs, BLOCK_N=bn, BLOCK_M=bm, num_warps=warps, num_stages=stages)
    tkey = (kernel, cls, fp32, size_bucket(size))
    if tkey not in _TUNED:
        _TUNED[tkey] = triton.autotune(configs=_configs(kernel, cls, fp32), key=["D"])(fn)
    out = _TUNED[tkey][grid](*args, **kwargs)
    best = _TUNED[tkey].best_config
    _tune_cache.store(args[0].device, __file__, key,
                      (best.kwargs["BLOCK_N"], best.kwargs["BLOCK_M"], best.num_warps, best.num_stages))
    return out


def forward_constexprs(d):
    """ONE_K / BLOCK_K of _row_lse_kernel for feature dim d."""
    cls = d_class(d)
    if cls != "split" and cls <= CHUNK:
        return {"ONE_K": True, "BLOCK_K": cls}
    return {"ONE_K": False, "BLOCK_K": CHUNK}


def grad_constexprs(d):
    """ONE_K / NUM_K / BLOCK_K of the gradient kernels for feature dim d: the accumulator is
    NUM_K chunks of BLOCK_K features: one block of the power-of-two class (ONE_K: x held, one y
    tile for both GEMMs), or chunks of CHUNK, as many as d needs up to MAX_CHUNKS; wider d is
    split into groups of MAX_CHUNKS chunks over grid axis 1 (see feature_groups)."""
    cls = d_class(d)
    if cls != "split" and cls <= MAX_BLOCK_D and cls == triton.next_power_of_2(cls):
        return {"ONE_K": True, "NUM_K": 1, "BLOCK_K": cls}
    return {"ONE_K": False, "NUM_K": min(MAX_CHUNKS, triton.cdiv(d, CHUNK)), "BLOCK_K": CHUNK}


def feature_groups(d):
    """Programs on grid axis 1 of the gradient kernels: 1 up to d = MAX_FUSED_D."""
    c = grad_constexprs(d)
    return triton.cdiv(d, c["NUM_K"] * c["BLOCK_K"])


def dot_fp32(dtype):
    """fp32 (3xTF32) dots for fp32 inputs; 16-bit inputs use 16-bit MMA (emulated in the
    interpreter, kernels/_mma.py)."""
    return dtype == torch.float32


def _prep(x, normalize):
    """(kernel input, its inverse row norms, the true inverse norms), all for row-major x.

    fp64 is computed in fp32. The kernels apply inv_x to fp32 tiles; for fp16 inputs they get
    host-normalised rows and ones instead, because folding a large 1/||x|| into a 16-bit
    operand of the gradient GEMM could overflow fp16's range."""
    x = (x.float() if x.dtype == torch.float64 else x).contiguous()
    if not normalize:
        ones = torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
        return x, ones, ones
    inv = inverse_norms(x)
    if x.dtype == torch.float16:
        return (x.float() * inv[:, None]).half(), torch.ones_like(inv), inv
    return x, inv, inv


def _bias(mask, n, device, logq=None):
    """(n,) fp32: 0 where kept, -inf where masked out (all 0 for no mask), minus logq if given."""
    bias = torch.zeros(n, device=device, dtype=torch.float32) if logq is None else -logq.to(device, torch.float32)
    return bias if mask is None else bias.masked_fill_(~mask.to(device=device, dtype=torch.bool), float("-inf"))


def _scale(scale, device):
    """(1,) fp32 on the device: the kernels read the scale there (a tensor stays on the device;
    a Python number becomes a device fill)."""
    if isinstance(scale, torch.Tensor):
        return scale.detach().reshape(1).to(device=device, dtype=torch.float32)
    return torch.full((1,), float(scale), device=device, dtype=torch.float32)


def _ids(ids, device):
    """(n,) int64 contiguous, or a 1-element placeholder when ids are not given (never read)."""
    return torch.zeros(1, device=device, dtype=torch.int64) if ids is None else ids.to(device, torch.int64).contiguous()


def _row_lse(x, inv_x, y, inv_y, y_bias, x_ids, y_ids, id_offset, scale):
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    out = torch.empty(n, device=x.device, dtype=torch.float32)
    if n == 0:
        return out
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
    with device_guard(x):
        launch("row_lse", d_class(d), x.dtype == torch.float32, n, 1, grid,
            x, y, inv_x, inv_y, y_bias, _ids(x_ids, x.device), _ids(y_ids, x.device), int(id_offset), scale, out,
            n, m, d, x.stride(0), y.stride(0), HAS_IDS=x_ids is not None, DOT_FP32=dot_fp32(x.dtype),
            **forward_constexprs(d))
    return out


def supports(anchors, **_):
    """Whether this backend launches for anchors (N, d) here (used by backend='auto')."""
    return INTERPRET or anchors.dtype not in (torch.float32, torch.float64) or anchors.shape[-1] <= FP32_MAX_D


def _check_launchable(x):
    if not supports(x):
        raise ValueError(f"the triton contrastive kernels take {x.dtype} inputs only up to d = {FP32_MAX_D} "
                         f"features on a GPU (wider fp32 tiles spill registers; bench/results/static-kernels.json), "
                         f"got d = {x.shape[-1]}: pass bf16/fp16 inputs, or use backend='cuda' or 'chunked'")


def lse_forward(x, y, x_mask, y_mask, scale, normalize, with_columns, *, y_logq=None, x_ids=None, y_ids=None,
                id_offset=0):
    """(row_lse (N,), col_lse (M,) or empty), fp32: logsumexp over kept y_i (resp. x_j) of
    scale * <x_hat_j, y_hat_i>, minus y_logq_i in the row direction; pairs with x_ids[j] ==
    y_ids[i] and i != j + id_offset (accidental hits) are left out both ways; -inf for an empty
    set. scale: a 1-element tensor (kept on the device) or a number."""
    _check_launchable(x)
    (xk, inv_x, _), (yk, inv_y, _) = _prep(x, normalize), _prep(y, normalize)
    s = _scale(scale, x.device)
    row = _row_lse(xk, inv_x, yk, inv_y, _bias(y_mask, y.shape[0], x.device, y_logq), x_ids, y_ids, id_offset, s)
    if not with_columns:
        return row, row.new_empty(0)
    # columns: the same kernel with x and y swapped; row i's positive is then column i - id_offset
    return row, _row_lse(yk, inv_y, xk, inv_x, _bias(x_mask, x.shape[0], x.device), y_ids, x_ids, -id_offset, s)


def _abs_max(t):
    """(1,) fp32 max |t| (0 for an empty t), without a host sync."""
    return t.abs().amax().reshape(1) if t.numel() else torch.zeros(1, device=t.device)


def lse_backward(grad_row, grad_col, x, y, x_mask, y_mask, row_lse_, col_lse, scale, normalize, with_columns, *,
                 y_logq=None, x_ids=None, y_ids=None, id_offset=0):
    """(dL/dx, dL/dy, dL/dscale): x's and y's dtypes, the scale's gradient (0-d fp32) for
    upstream gradients grad_row (N,) and grad_col (M,, used only with columns)."""
    _check_launchable(x)
    (xk, inv_x, true_inv_x), (yk, inv_y, true_inv_y) = _prep(x, normalize), _prep(y, normalize)
    n, m, d = xk.shape[0], yk.shape[0], xk.shape[1]
    dev = xk.device
    safe = lambda lse: torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).float().contiguous()
    g, lse_r = grad_row.float().contiguous(), safe(row_lse_)
    if with_columns:
        h, lse_c = grad_col.float().contiguous(), safe(col_lse)
    else:
        h, lse_c = g.new_empty(0), g.new_empty(0)
    gx_hat = torch.zeros(n, d, device=dev, dtype=torch.float32)
    gy_hat = torch.zeros(m, d, device=dev, dtype=torch.float32)
    dscos = torch.zeros(n, device=dev, dtype=torch.float32)
    s = _scale(scale, dev)
    if n and m:
        args = (xk, yk, inv_x, inv_y, _bias(x_mask, n, dev), _bias(y_mask, m, dev, y_logq), _ids(x_ids, dev),
                _ids(y_ids, dev), int(id_offset), g, lse_r, h, lse_c)
        common = dict(HAS_COLS=with_columns, HAS_IDS=x_ids is not None, DOT_FP32=dot_fp32(xk.dtype),
                      **grad_constexprs(d))
        groups, cls, fp32 = feature_groups(d), d_class(d), xk.dtype == torch.float32
        with device_guard(xk):
            launch("grad_x", cls, fp32, n, groups, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), groups),
                   *args, _abs_max(h), s, gx_hat, dscos, n, m, d, xk.stride(0), yk.stride(0), **common)
            launch("grad_y", cls, fp32, m, groups, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), groups),
                   *args, _abs_max(g), s, gy_hat, n, m, d, xk.stride(0), yk.stride(0), **common)
    if normalize:
        gx_hat = normalize_backward(gx_hat, x, true_inv_x)
        gy_hat = normalize_backward(gy_hat, y, true_inv_y)
    return gx_hat.to(x.dtype), gy_hat.to(y.dtype), dscos.sum()
