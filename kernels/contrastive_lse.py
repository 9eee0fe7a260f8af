"""Triton kernels for the contrastive masked log-sum-exp (same contract as the C++ op
courier_fast::contrastive_lse, see csrc/courier_fast.cpp).

S[j, i] = scale * inv_x[j] * inv_y[i] * <x_j, y_i>: the L2 normalisation is fused as per-row
inverse norms applied to the fp32 logits tile (fp16 inputs are normalised on the host instead,
see _prep). Masks arrive as additive biases (0 kept, -inf dropped), always present.

  forward   _row_lse_kernel: programs over row blocks, online max/sum over column tiles.
            Column LSEs (symmetric loss) are the same kernel with x and y swapped.
  backward  dS = g * exp(S - row_lse) [y kept] + h * exp(S - col_lse) [x kept].
            _grad_x_kernel: programs over row blocks; each keeps its x block and a
            (BLOCK_N, D) fp32 accumulator, recomputes S once per column tile and adds
            dS @ y_tile. _grad_y_kernel: the same over column blocks (dS^T @ x_tile). Each
            program owns its output rows: no atomics, nothing N x M is stored.

Work per forward + backward: 2 N M d (forward; 4 with columns) + 2 x (2 N M d recompute +
2 N M d gradient GEMM) = 10 N M d, i.e. 1.25x the 8 N M d floor (1.5x symmetric), for
d <= 512 (MAX_FUSED_D). Above that the accumulator is split over feature chunks on grid
axis 1 and S is recomputed per chunk. The second GEMM casts dS (rescaled per output row so
that 16-bit values neither underflow nor overflow) to the input dtype, FlashAttention style:
every tl.dot runs at the input precision with fp32 accumulation. fp32 inputs use 3xTF32 dots
(IEEE fp32 under TRITON_INTERPRET=1, which emulates the 16-bit MMA: kernels/_mma.py).
"""
import torch
import triton
import triton.language as tl

from courier_fast.kernels._launch import INTERPRET, device_guard
from courier_fast.kernels._mma import dot as _dot
from courier_fast.kernels._mma import to_16bit
from courier_fast.row_norms import inverse_norms, normalize_backward

MAX_FUSED_D = 512  # above: the gradient accumulator is split over feature chunks
SPLIT_DV = 256  # feature chunk of the gradient accumulator when d > MAX_FUSED_D
SPLIT_K = 128  # feature chunk of the logits GEMM when the features do not fit one tile
FWD_ONE_K = 128  # the forward holds the whole x row block when padded d <= this


# --------------------------------------------------------------------------- configurations
def _cfg(bn, bm, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=warps, num_stages=stages)


# (kernel, d class, 16-bit or fp32 inputs) -> the configs its autotuner may pick. d class =
# padded feature dim (power of two, 16..MAX_FUSED_D) or "split" (d > MAX_FUSED_D). Every entry
# is one that bench/kernel_report.py compiled for sm_80, sm_86 and sm_90a without register
# spills and within the A100's / H100's shared memory (tests/test_kernel_report.py checks the
# committed report); configs that failed there were removed. On the 99 KB parts (sm_86 / sm_89)
# Triton's autotuner skips a config that is out of shared memory, and every table keeps one that
# fits. ("split": (64, 64, 8, 2) spilled on sm_86; of 8 tiles tried only 32 x 32 compiled clean on
# all three.) fp32 inputs (3xTF32 dots: the operands are split in
# two, so twice the registers and shared memory of a 16-bit tile) get smaller tiles.
_FWD = [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)]
_FWD_WIDE = [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3)]
_GRAD = {  # 16-bit inputs, per d class: (kernel-independent) candidates, then per-kernel drops
    "grad_x": {16: [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4)],
               32: [(128, 128, 8, 3), (64, 64, 4, 4)],
               64: [(128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4)],
               128: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 128, 8, 2)],
               256: [(64, 64, 8, 2), (64, 32, 4, 2)],
               512: [(64, 32, 8, 2), (32, 32, 4, 2)],
               "split": [(32, 32, 4, 2)]},
    "grad_y": {16: [(128, 64, 4, 3), (64, 64, 4, 4)],
               32: [(128, 64, 4, 3), (64, 64, 4, 4)],
               64: [(64, 64, 4, 4)],
               128: [(128, 64, 8, 3), (64, 64, 4, 3)],
               256: [(64, 32, 4, 2), (128, 32, 8, 2)],
               512: [(64, 32, 8, 2), (32, 32, 4, 2)],
               "split": [(32, 32, 4, 2)]},
}
_FP32 = {  # fp32 inputs: only d <= FP32_MAX_D compiled spill-free (see FP32_MAX_D)
    "row_lse": {16: [(64, 64, 4, 3), (32, 64, 4, 3), (32, 32, 4, 2)],
                32: [(64, 64, 4, 3), (32, 64, 4, 3), (32, 32, 4, 2)],
                64: [(64, 64, 4, 3), (64, 32, 4, 3), (32, 64, 4, 3), (32, 32, 4, 2)]},
    "grad_x": {16: [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
               32: [(64, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
               64: [(32, 64, 4, 2), (32, 32, 4, 2)]},
    "grad_y": {16: [(64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
               32: [(64, 32, 4, 2), (32, 32, 4, 2)],
               64: [(32, 32, 4, 2)]},
}
# Widest fp32 feature dim launched on a GPU: from d = 128 on, every tile tried (32..128 x
# 32..64, 4-8 warps, with 3xTF32 and with IEEE dots) spilled registers in the gradient kernels
# for sm_80 or sm_90a, so fp32 inputs wider than this go to the `cuda` / `chunked` backends
# (cuBLAS fp32 GEMMs). 16-bit inputs have no such limit.
FP32_MAX_D = 64
D_CLASSES = (16, 32, 64, 128, 256, 512, "split")


def config_table(kernel, d_class, fp32=False):
    """[(BLOCK_N, BLOCK_M, num_warps, num_stages)] the autotuner of `kernel` ('row_lse',
    'grad_x', 'grad_y') may pick for feature dims of d_class and 16-bit (fp32=False) or fp32
    inputs."""
    if fp32:
        return _FP32[kernel][d_class]
    if kernel == "row_lse":
        return _FWD if d_class != "split" and d_class <= FWD_ONE_K else _FWD_WIDE
    return _GRAD[kernel][d_class]


def d_class(d):
    return "split" if d > MAX_FUSED_D else max(16, triton.next_power_of_2(d))


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
    block holding every feature; else loop over feature chunks, loading x and y."""
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
def _row_lse_kernel(X, Y, INV_X, INV_Y, Y_BIAS, OUT, N, M, D, stride_x, stride_y, scale,
                    ONE_K: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """OUT[j] = logsumexp_i (S[j, i] + Y_BIAS[i]) over all M columns; -inf for an empty set."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_scale = tl.load(INV_X + rows, mask=row_ok, other=0.0) * scale
    x = _load_tile(X, rows, row_ok, stride_x, tl.arange(0, BLOCK_K), D) if ONE_K else None
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        s = _logits(x, X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y, ONE_K, BLOCK_K, DOT_FP32)
        col_term = tl.load(Y_BIAS + cols, mask=col_ok, other=float("-inf"))
        s = s * row_scale[:, None] * tl.load(INV_Y + cols, mask=col_ok, other=0.0)[None, :] + col_term[None, :]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf for empty rows
        l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        m_i = m_new
    empty = m_i == float("-inf")
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(OUT + rows, lse, mask=row_ok)


@triton.jit
def _softmax_grad(s, G, LSE_R, H, LSE_C, X_BIAS, Y_BIAS, rows, cols, row_ok, col_ok,
                  HAS_COLS: tl.constexpr):
    """dL/dS for a tile of fp32 logits s: g_j exp(S - row_lse_j) (kept columns) plus, with
    columns, h_i exp(S - col_lse_i) (kept rows). LSEs of empty sets arrive as +inf: 0."""
    y_bias = tl.load(Y_BIAS + cols, mask=col_ok, other=float("-inf"))
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    row_lse = tl.load(LSE_R + rows, mask=row_ok, other=float("inf"))
    ds = g[:, None] * tl.exp(s + y_bias[None, :] - row_lse[:, None])
    if HAS_COLS:
        x_bias = tl.load(X_BIAS + rows, mask=row_ok, other=float("-inf"))
        h = tl.load(H + cols, mask=col_ok, other=0.0)
        col_lse = tl.load(LSE_C + cols, mask=col_ok, other=float("inf"))
        ds += h[None, :] * tl.exp(s + x_bias[:, None] - col_lse[None, :])
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
def _grad_x_kernel(X, Y, INV_X, INV_Y, X_BIAS, Y_BIAS, G, LSE_R, H, LSE_C, H_MAX, GX,
                   N, M, D, stride_x, stride_y, scale, HAS_COLS: tl.constexpr,
                   FUSED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
                   DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """GX[j, :] = scale * sum_i dS[j, i] inv_y[i] y_i  (gradient w.r.t. x_hat), fp32.
    FUSED (d <= MAX_FUSED_D): one feature block; the y tile feeds both GEMMs."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    row_scale = tl.load(INV_X + rows, mask=row_ok, other=0.0) * scale
    out_scale = _out_scale(G, rows, row_ok, H_MAX, True)
    x = _load_tile(X, rows, row_ok, stride_x, tl.arange(0, BLOCK_K), D) if FUSED else None
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        inv_y = tl.load(INV_Y + cols, mask=col_ok, other=0.0)
        if FUSED:
            y = _load_tile(Y, cols, col_ok, stride_y, dv, D)
            s = _dot(x, tl.trans(y), DOT_FP32)
        else:
            s = _logits(x, X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y, False,
                        BLOCK_K, DOT_FP32)
            y = _load_tile(Y, cols, col_ok, stride_y, dv, D)
        s = s * row_scale[:, None] * inv_y[None, :]
        ds = _softmax_grad(s, G, LSE_R, H, LSE_C, X_BIAS, Y_BIAS, rows, cols, row_ok, col_ok, HAS_COLS)
        ds = ds * out_scale[:, None] * inv_y[None, :]
        acc += _dot(ds if DOT_FP32 else to_16bit(ds, y.dtype), y, DOT_FP32)
    acc = acc * (scale / out_scale)[:, None]
    offs = rows.to(tl.int64)[:, None] * D + dv[None, :]
    tl.store(GX + offs, acc, mask=row_ok[:, None] & (dv < D)[None, :])


@triton.jit
def _grad_y_kernel(X, Y, INV_X, INV_Y, X_BIAS, Y_BIAS, G, LSE_R, H, LSE_C, G_MAX, GY,
                   N, M, D, stride_x, stride_y, scale, HAS_COLS: tl.constexpr,
                   FUSED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
                   DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """GY[i, :] = scale * sum_j dS[j, i] inv_x[j] x_j  (gradient w.r.t. y_hat), fp32.
    Programs over column blocks of BLOCK_M; the row loop tiles by BLOCK_N."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    inv_y = tl.load(INV_Y + cols, mask=col_ok, other=0.0)
    out_scale = _out_scale(H, cols, col_ok, G_MAX, HAS_COLS)
    y = _load_tile(Y, cols, col_ok, stride_y, tl.arange(0, BLOCK_K), D) if FUSED else None
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        inv_x = tl.load(INV_X + rows, mask=row_ok, other=0.0)
        if FUSED:
            x = _load_tile(X, rows, row_ok, stride_x, dv, D)
            s = _dot(x, tl.trans(y), DOT_FP32)
        else:
            s = _logits(None, X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y, False,
                        BLOCK_K, DOT_FP32)
            x = _load_tile(X, rows, row_ok, stride_x, dv, D)
        s = s * (inv_x * scale)[:, None] * inv_y[None, :]
        ds = _softmax_grad(s, G, LSE_R, H, LSE_C, X_BIAS, Y_BIAS, rows, cols, row_ok, col_ok, HAS_COLS)
        dst = tl.trans(ds * inv_x[:, None] * out_scale[None, :])
        acc += _dot(dst if DOT_FP32 else to_16bit(dst, x.dtype), x, DOT_FP32)
    acc = acc * (scale / out_scale)[:, None]
    offs = cols.to(tl.int64)[:, None] * D + dv[None, :]
    tl.store(GY + offs, acc, mask=col_ok[:, None] & (dv < D)[None, :])


# ----------------------------------------------------------------------------- host side
_TUNED = {}


def tuned(kernel, cls, fp32):
    """The autotuned launcher of `kernel` ('row_lse', 'grad_x', 'grad_y') for d class `cls` and
    fp32 (else 16-bit) inputs: one Autotuner per (kernel, class, fp32), so it can only pick
    configs of config_table()."""
    if (kernel, cls, fp32) not in _TUNED:
        fn, key = {"row_lse": (_row_lse_kernel, ["M", "D"]), "grad_x": (_grad_x_kernel, ["M", "D"]),
                   "grad_y": (_grad_y_kernel, ["N", "D"])}[kernel]
        _TUNED[kernel, cls, fp32] = triton.autotune(configs=_configs(kernel, cls, fp32), key=key)(fn)
    return _TUNED[kernel, cls, fp32]


def forward_constexprs(d):
    """ONE_K / BLOCK_K of _row_lse_kernel for feature dim d."""
    cls = d_class(d)
    if cls != "split" and cls <= FWD_ONE_K:
        return {"ONE_K": True, "BLOCK_K": cls}
    return {"ONE_K": False, "BLOCK_K": SPLIT_K}


def grad_constexprs(d):
    """FUSED / BLOCK_K / BLOCK_DV of the gradient kernels for feature dim d."""
    cls = d_class(d)
    if cls == "split":
        return {"FUSED": False, "BLOCK_K": SPLIT_K, "BLOCK_DV": SPLIT_DV}
    return {"FUSED": True, "BLOCK_K": cls, "BLOCK_DV": cls}


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


def _bias(mask, n, device):
    """(n,) fp32: 0 where kept, -inf where masked out (all 0 for no mask)."""
    bias = torch.zeros(n, device=device, dtype=torch.float32)
    return bias if mask is None else bias.masked_fill_(~mask.to(device=device, dtype=torch.bool), float("-inf"))


def _row_lse(x, inv_x, y, inv_y, y_bias, scale):
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    out = torch.empty(n, device=x.device, dtype=torch.float32)
    if n == 0:
        return out
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
    with device_guard(x):
        tuned("row_lse", d_class(d), x.dtype == torch.float32)[grid](x, y, inv_x, inv_y, y_bias, out, n, m, d, x.stride(0),
                                            y.stride(0), float(scale), DOT_FP32=dot_fp32(x.dtype),
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


def lse_forward(x, y, x_mask, y_mask, scale, normalize, with_columns):
    """(row_lse (N,), col_lse (M,) or empty), fp32: logsumexp over kept y_i (resp. x_j) of
    scale * <x_hat_j, y_hat_i>; -inf for an empty set."""
    _check_launchable(x)
    (xk, inv_x, _), (yk, inv_y, _) = _prep(x, normalize), _prep(y, normalize)
    row = _row_lse(xk, inv_x, yk, inv_y, _bias(y_mask, y.shape[0], x.device), scale)
    if not with_columns:
        return row, row.new_empty(0)
    return row, _row_lse(yk, inv_y, xk, inv_x, _bias(x_mask, x.shape[0], x.device), scale)


def _abs_max(t):
    """(1,) fp32 max |t| (0 for an empty t), without a host sync."""
    return t.abs().amax().reshape(1) if t.numel() else torch.zeros(1, device=t.device)


def lse_backward(grad_row, grad_col, x, y, x_mask, y_mask, row_lse_, col_lse, scale, normalize,
                 with_columns):
    """(dL/dx, dL/dy) in the dtypes of x and y for upstream gradients grad_row (N,) and
    grad_col (M,, used only with columns)."""
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
    if n and m:
        c = grad_constexprs(d)
        args = (xk, yk, inv_x, inv_y, _bias(x_mask, n, dev), _bias(y_mask, m, dev), g, lse_r, h, lse_c)
        common = dict(HAS_COLS=with_columns, DOT_FP32=dot_fp32(xk.dtype), **c)
        chunks = triton.cdiv(d, c["BLOCK_DV"])
        with device_guard(xk):
            tuned("grad_x", d_class(d), xk.dtype == torch.float32)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), chunks)](
                *args, _abs_max(h), gx_hat, n, m, d, xk.stride(0), yk.stride(0), float(scale), **common)
            tuned("grad_y", d_class(d), xk.dtype == torch.float32)[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), chunks)](
                *args, _abs_max(g), gy_hat, n, m, d, xk.stride(0), yk.stride(0), float(scale), **common)
    if normalize:
        gx_hat = normalize_backward(gx_hat, x, true_inv_x)
        gy_hat = normalize_backward(gy_hat, y, true_inv_y)
    return gx_hat.to(x.dtype), gy_hat.to(y.dtype)
