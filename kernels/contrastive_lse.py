"""Triton kernels for the contrastive masked log-sum-exp (same contract as the C++ op
courier_fast::contrastive_lse, see csrc/courier_fast.cpp).

S[j, i] = scale * inv_x[j] * inv_y[i] * <x_j, y_i>: the L2 normalisation is fused as per-row
inverse norms applied to the fp32 dot-product tile, so normalised copies are never written.
  forward   _row_lse_kernel: one program per block of rows, online max/sum over column tiles.
            Column LSEs (symmetric loss) are the same kernel with x and y swapped.
  backward  dS = g * exp(S - row_lse) [y kept] + h * exp(S - col_lse) [x kept], recomputed
            tile by tile; _grad_x_kernel (programs over rows) and _grad_y_kernel (programs
            over columns) each own their output rows: no atomics, nothing N x M is stored.
Inputs fp32/bf16/fp16 (fp64 is computed in fp32), accumulation in fp32; any N, M; any d
(d > 256 loops over the feature dim). Under TRITON_INTERPRET=1 dots run in fp32.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
NORM_EPS = 1e-12


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_M": 16}, num_warps=4)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm}, num_warps=w, num_stages=s)
            for bn, bm, w, s in [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4)]]


@triton.jit
def _logits_tile(X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y,
                 BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr):
    """<x_j, y_i> for a (rows, cols) tile, fp32 accumulation over the feature dim."""
    acc = tl.zeros([rows.shape[0], cols.shape[0]], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        k_ok = ks < D
        x = tl.load(X + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(Y + cols[:, None] * stride_y + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), tl.trans(y.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(y))
    return acc


@triton.autotune(configs=_configs(), key=["M", "D"])
@triton.jit
def _row_lse_kernel(X, Y, INV_X, INV_Y, Y_BIAS, OUT, N, M, D, stride_x, stride_y, scale,
                    HAS_Y_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_scale = tl.load(INV_X + rows, mask=row_ok, other=0.0) * scale
    m_i = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        s = _logits_tile(X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y, BLOCK_D, DOT_FP32)
        s = s * row_scale[:, None] * tl.load(INV_Y + cols, mask=col_ok, other=0.0)[None, :]
        bias = tl.where(col_ok, 0.0, float("-inf"))
        if HAS_Y_BIAS:
            bias += tl.load(Y_BIAS + cols, mask=col_ok, other=0.0)
        s = s + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf for empty rows
        l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(s - shift[:, None]), axis=1)
        m_i = m_new
    empty = m_i == float("-inf")
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(OUT + rows, lse, mask=row_ok)


@triton.jit
def _grad_tile(X, Y, INV_X, INV_Y, X_BIAS, Y_BIAS, G, ROW_LSE, H, COL_LSE, rows, cols, row_ok,
               col_ok, D, stride_x, stride_y, scale, HAS_X_BIAS: tl.constexpr,
               HAS_Y_BIAS: tl.constexpr, HAS_COLS: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT_FP32: tl.constexpr):
    """dL/dS for one tile. LSEs arrive with -inf replaced by +inf (empty set: no gradient)."""
    s = _logits_tile(X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y, BLOCK_D, DOT_FP32)
    s = s * (tl.load(INV_X + rows, mask=row_ok, other=0.0) * scale)[:, None]
    s = s * tl.load(INV_Y + cols, mask=col_ok, other=0.0)[None, :]
    y_bias = tl.where(col_ok, 0.0, float("-inf"))
    if HAS_Y_BIAS:
        y_bias += tl.load(Y_BIAS + cols, mask=col_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    row_lse = tl.load(ROW_LSE + rows, mask=row_ok, other=float("inf"))
    ds = g[:, None] * tl.exp(s + y_bias[None, :] - row_lse[:, None])
    if HAS_COLS:
        x_bias = tl.where(row_ok, 0.0, float("-inf"))
        if HAS_X_BIAS:
            x_bias += tl.load(X_BIAS + rows, mask=row_ok, other=0.0)
        h = tl.load(H + cols, mask=col_ok, other=0.0)
        col_lse = tl.load(COL_LSE + cols, mask=col_ok, other=float("inf"))
        ds += h[None, :] * tl.exp(s + x_bias[:, None] - col_lse[None, :])
    return ds


@triton.autotune(configs=_configs(), key=["M", "D"])
@triton.jit
def _grad_x_kernel(X, Y, INV_X, INV_Y, X_BIAS, Y_BIAS, G, ROW_LSE, H, COL_LSE, GX, N, M, D,
                   stride_x, stride_y, scale, HAS_X_BIAS: tl.constexpr, HAS_Y_BIAS: tl.constexpr,
                   HAS_COLS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """GX[j, dv] = scale * sum_i dS[j, i] * inv_y[i] * y[i, dv]  (gradient w.r.t. x_hat)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = dv < D
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for c0 in range(0, M, BLOCK_M):
        cols = c0 + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        ds = _grad_tile(X, Y, INV_X, INV_Y, X_BIAS, Y_BIAS, G, ROW_LSE, H, COL_LSE, rows, cols,
                        row_ok, col_ok, D, stride_x, stride_y, scale, HAS_X_BIAS, HAS_Y_BIAS,
                        HAS_COLS, BLOCK_D, DOT_FP32)
        ds = ds * tl.load(INV_Y + cols, mask=col_ok, other=0.0)[None, :]
        y = tl.load(Y + cols[:, None] * stride_y + dv[None, :], mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        acc += tl.dot(ds, y.to(tl.float32), input_precision="ieee" if DOT_FP32 else "tf32")
    tl.store(GX + rows[:, None] * D + dv[None, :], acc * scale, mask=row_ok[:, None] & dv_ok[None, :])


@triton.autotune(configs=_configs(), key=["N", "D"])
@triton.jit
def _grad_y_kernel(X, Y, INV_X, INV_Y, X_BIAS, Y_BIAS, G, ROW_LSE, H, COL_LSE, GY, N, M, D,
                   stride_x, stride_y, scale, HAS_X_BIAS: tl.constexpr, HAS_Y_BIAS: tl.constexpr,
                   HAS_COLS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    """GY[i, dv] = scale * sum_j dS[j, i] * inv_x[j] * x[j, dv]  (gradient w.r.t. y_hat)."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ok = cols < M
    dv = tl.program_id(1) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    dv_ok = dv < D
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        ds = _grad_tile(X, Y, INV_X, INV_Y, X_BIAS, Y_BIAS, G, ROW_LSE, H, COL_LSE, rows, cols,
                        row_ok, col_ok, D, stride_x, stride_y, scale, HAS_X_BIAS, HAS_Y_BIAS,
                        HAS_COLS, BLOCK_D, DOT_FP32)
        ds = ds * tl.load(INV_X + rows, mask=row_ok, other=0.0)[:, None]
        x = tl.load(X + rows[:, None] * stride_x + dv[None, :], mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
        acc += tl.dot(tl.trans(ds), x.to(tl.float32), input_precision="ieee" if DOT_FP32 else "tf32")
    tl.store(GY + cols[:, None] * D + dv[None, :], acc * scale, mask=col_ok[:, None] & dv_ok[None, :])


# ----------------------------------------------------------------------------- host side
def _prep(x, normalize):
    """Kernel input (fp64 -> fp32, contiguous) and fp32 inverse row norms (ones if not normalize)."""
    x = x.float() if x.dtype == torch.float64 else x
    x = x.contiguous()
    if normalize:
        inv = torch.linalg.vector_norm(x.float(), dim=1).clamp_min(NORM_EPS).reciprocal()
    else:
        inv = torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
    return x, inv


def _bias(mask, like):
    if mask is None:
        return like.new_empty(0), False
    return torch.zeros(mask.shape, device=like.device, dtype=torch.float32).masked_fill_(~mask, float("-inf")), True


def _block_d(d):
    return max(16, min(256, triton.next_power_of_2(d)))


def _dot_fp32(x):
    return INTERPRET or x.dtype == torch.float32


def row_lse(x, y, y_mask, scale, normalize):
    """(N,) fp32: logsumexp_i over kept y_i of scale * <x_hat_j, y_hat_i>."""
    (x, inv_x), (y, inv_y) = _prep(x, normalize), _prep(y, normalize)
    y_bias, has_y_bias = _bias(y_mask, x)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    out = torch.empty(n, device=x.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)
    _row_lse_kernel[grid](x, y, inv_x, inv_y, y_bias, out, n, m, d, x.stride(0), y.stride(0),
                          float(scale), HAS_Y_BIAS=has_y_bias, BLOCK_D=_block_d(d),
                          DOT_FP32=_dot_fp32(x))
    return out


def lse_forward(x, y, x_mask, y_mask, scale, normalize, with_columns):
    row = row_lse(x, y, y_mask, scale, normalize)
    col = row_lse(y, x, x_mask, scale, normalize) if with_columns else row.new_empty(0)
    return row, col


def _normalize_backward(g_hat, x, inv):
    """Gradient through x_hat = x * inv (inv = 1 / max(||x||, eps)), given g_hat = dL/dx_hat."""
    x = x.float()
    x_hat = x * inv[:, None]
    tangential = (g_hat - x_hat * (g_hat * x_hat).sum(1, keepdim=True)) * inv[:, None]
    clamped = (inv >= 1.0 / NORM_EPS)[:, None]
    return torch.where(clamped, g_hat * inv[:, None], tangential)


def lse_backward(grad_row, grad_col, x, y, x_mask, y_mask, row_lse_, col_lse, scale, normalize,
                 with_columns):
    """(dL/dx, dL/dy) for upstream gradients grad_row (N,) and grad_col (M,)."""
    x_dtype, y_dtype = x.dtype, y.dtype
    (x, inv_x), (y, inv_y) = _prep(x, normalize), _prep(y, normalize)
    x_bias, has_x_bias = _bias(x_mask, x)
    y_bias, has_y_bias = _bias(y_mask, x)
    safe = lambda lse: torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).float().contiguous()
    g, rl = grad_row.float().contiguous(), safe(row_lse_)
    if with_columns:
        h, cl = grad_col.float().contiguous(), safe(col_lse)
    else:
        h, cl = g.new_empty(0), g.new_empty(0)
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    gx_hat = torch.empty(n, d, device=x.device, dtype=torch.float32)
    gy_hat = torch.empty(m, d, device=x.device, dtype=torch.float32)
    block_dv = min(triton.next_power_of_2(d), 128 if not INTERPRET else 256)
    common = dict(HAS_X_BIAS=has_x_bias, HAS_Y_BIAS=has_y_bias, HAS_COLS=with_columns,
                  BLOCK_D=_block_d(d), BLOCK_DV=block_dv, DOT_FP32=_dot_fp32(x))
    args = (x, y, inv_x, inv_y, x_bias, y_bias, g, rl, h, cl)
    _grad_x_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(d, block_dv))](
        *args, gx_hat, n, m, d, x.stride(0), y.stride(0), float(scale), **common)
    _grad_y_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, block_dv))](
        *args, gy_hat, n, m, d, x.stride(0), y.stride(0), float(scale), **common)
    if normalize:
        gx_hat, gy_hat = _normalize_backward(gx_hat, x, inv_x), _normalize_backward(gy_hat, y, inv_y)
    return gx_hat.to(x_dtype), gy_hat.to(y_dtype)
