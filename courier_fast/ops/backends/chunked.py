"""The `chunked` backend of the contrastive masked log-sum-exp: ATen ops only, any device.

Same contract as the compiled op courier_fast::contrastive_lse (csrc/courier_fast.cpp):
    row_lse[j] = log sum_{i : y_mask[i], keep(j, i)} exp(S[j, i] - y_logq[i])   (N,)
    col_lse[i] = log sum_{j : x_mask[j], keep(j, i)} exp(S[j, i])               (M,) with_columns
    keep(j, i) = not (x_ids[j] == y_ids[i] and i != j + id_offset)   (accidental hits; all
                 pairs without ids)
with S = scale * x_hat @ y_hat.T (x_hat, y_hat L2-normalised when normalize), -inf for an
empty set. scale is a 0-d tensor (its gradient is returned); y_logq (M,) float or None;
x_ids (N,) / y_ids (M,) int64 or None. x (N, d) and y (M, d) are float16/bfloat16/float32/
float64; LSEs and the arithmetic are float32 (float64 for float64 inputs), gradients come back
in the inputs' dtypes.

Anchors are processed in row tiles of tile_rows(N, M, device) rows: a (rows, M) logits tile is
one GEMM, reduced and dropped, so memory is O((N + M) d + rows * M), never N x M. The backward
(a custom autograd Function) recomputes each tile from the saved LSEs, turns it into dL/dS and
applies two GEMMs; dL/dscale = sum_j <x_hat_j, (dL/dS @ y_hat)_j> comes from the first of them
(no extra pass over the tiles). Because it is plain ATen, its behaviour on a GPU follows from
its CPU tests.
"""
import torch

from courier_fast.ops.reference import compute_dtype
from courier_fast.ops.row_norms import inverse_norms, normalize_backward

# Logits elements per tile (fp32: 16 MB on CPU, 256 MB on CUDA) and the fewest rows per tile
# (thin GEMMs waste a GPU); both bound the extra memory at O(rows * M).
TILE_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 26}
MIN_ROWS = {"cpu": 16, "cuda": 128}


def tile_rows(n, m, device_type):
    """Rows per logits tile for N anchors and M candidates on a device type."""
    elems, min_rows = TILE_ELEMS.get(device_type, TILE_ELEMS["cpu"]), MIN_ROWS.get(device_type, 16)
    return max(1, min(n, max(min_rows, elems // max(m, 1))))


def _rows(x, normalize):
    """(x_hat, inv) in the compute dtype; inv is None without normalisation."""
    xc = x.to(compute_dtype(x.dtype))
    if not normalize:
        return xc, None
    inv = inverse_norms(x)
    return xc * inv[:, None], inv


def _bias(mask, like, logq=None):
    """0 where kept, -inf where masked out, minus logq when given; None for neither."""
    if mask is None and logq is None:
        return None
    bias = torch.zeros(mask.shape if mask is not None else logq.shape, dtype=like.dtype, device=like.device)
    if logq is not None:
        bias -= logq.to(like.dtype)
    return bias if mask is None else bias.masked_fill_(~mask.bool(), float("-inf"))


def _tiles(n, m, device):
    """(rows per tile, [(r0, r1)]) covering n anchor rows."""
    step = tile_rows(n, m, device.type)
    return step, [(r0, min(n, r0 + step)) for r0 in range(0, n, step)]


def _shift(m):
    """A max usable as a shift: 0 where it is -inf (an empty set), so no inf - inf appears."""
    return torch.where(torch.isinf(m), torch.zeros_like(m), m)


def _hits(x_ids, y_ids, id_offset, r0, r1):
    """(r1 - r0, M) bool: the tile's accidental hits (same id, not the row's own positive);
    None without ids."""
    if x_ids is None:
        return None
    cols = torch.arange(y_ids.shape[0], device=y_ids.device)
    rows = torch.arange(r0, r1, device=y_ids.device)
    return (x_ids[r0:r1, None] == y_ids[None, :]) & (cols[None, :] != (rows + id_offset)[:, None])


def lse_forward(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize, with_columns):
    """(row_lse, col_lse) without autograd; col_lse is empty unless with_columns.
    Peak extra memory: one (rows, M) tile (two with columns) plus O((N + M) d)."""
    xh, _ = _rows(x, normalize)
    yh, _ = _rows(y, normalize)
    xs, yt = xh * scale.to(xh.dtype), yh.t()
    x_bias, y_bias = _bias(x_mask, xs), _bias(y_mask, xs, y_logq)
    n, m = xs.shape[0], yh.shape[0]
    row = xs.new_empty(n)
    step, tiles = _tiles(n, m, x.device)
    buf = xs.new_empty(step, m)  # reused by every tile: no allocation per tile
    tmp = xs.new_empty(step, m) if with_columns else None
    col_max = xs.new_full((m,), float("-inf")) if with_columns else None
    col_sum = xs.new_zeros(m) if with_columns else None
    for r0, r1 in tiles:
        s = torch.mm(xs[r0:r1], yt, out=buf[: r1 - r0])  # (rows, M) scaled logits
        hits = _hits(x_ids, y_ids, id_offset, r0, r1)
        if hits is not None:
            s.masked_fill_(hits, float("-inf"))
        if with_columns:
            t = tmp[: r1 - r0].copy_(s)
            if x_bias is not None:
                t += x_bias[r0:r1, None]
            new_max = torch.maximum(col_max, t.amax(0))
            shift = _shift(new_max)
            col_sum = col_sum * (col_max - shift).exp() + t.sub_(shift).exp_().sum(0)
            col_max = new_max
        if y_bias is not None:
            s += y_bias
        shift = _shift(s.amax(1))
        row[r0:r1] = s.sub_(shift[:, None]).exp_().sum(1).log_() + shift  # -inf for an empty row
    if not with_columns:
        return row, xs.new_empty(0)
    return row, torch.where(torch.isinf(col_max), col_max, col_max + col_sum.log())


def lse_backward(grad_row, grad_col, x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, row_lse,
                 col_lse, scale, normalize, with_columns):
    """Gradients of sum(grad_row * row_lse) + sum(grad_col * col_lse) w.r.t. x, y and scale
    ((N, d), (M, d), 0-d). Rows / columns whose LSE is -inf (empty set) get no gradient."""
    xh, inv_x = _rows(x, normalize)
    yh, inv_y = _rows(y, normalize)
    sc = scale.to(xh.dtype)
    xs, yt = xh * sc, yh.t()
    x_bias, y_bias = _bias(x_mask, xs), _bias(y_mask, xs, y_logq)
    safe = lambda lse: torch.where(torch.isinf(lse), torch.full_like(lse, float("inf")), lse).to(xs.dtype)
    g, rl = grad_row.to(xs.dtype), safe(row_lse)
    if with_columns:
        h, cl = grad_col.to(xs.dtype), safe(col_lse)
    n, m = xs.shape[0], yh.shape[0]
    gx, gy = torch.empty_like(xh), torch.zeros_like(yh)  # both without the factor scale until the end
    step, tiles = _tiles(n, m, x.device)
    buf = xs.new_empty(step, m)
    tmp = xs.new_empty(step, m) if with_columns else None
    for r0, r1 in tiles:
        s = torch.mm(xs[r0:r1], yt, out=buf[: r1 - r0])
        hits = _hits(x_ids, y_ids, id_offset, r0, r1)
        if hits is not None:
            s.masked_fill_(hits, float("-inf"))  # exp() of it: no gradient through a hit
        if with_columns:  # h_i exp(S - col_lse_i) over kept rows
            t = torch.sub(s, cl, out=tmp[: r1 - r0])
            if x_bias is not None:
                t += x_bias[r0:r1, None]
            t.exp_().mul_(h)
        s -= rl[r0:r1, None]  # s becomes dL/dS in place: g_j exp(S - row_lse_j) over kept columns
        if y_bias is not None:
            s += y_bias
        s.exp_().mul_(g[r0:r1, None])
        if with_columns:
            s += t
        torch.mm(s, yh, out=gx[r0:r1])
        gy.addmm_(s.t(), xh[r0:r1])
    grad_scale = (gx * xh).sum()  # sum_ji dL/dS_ji <x_hat_j, y_hat_i>
    gx, gy = gx * sc, gy * sc
    if normalize:
        gx, gy = normalize_backward(gx, x, inv_x), normalize_backward(gy, y, inv_y)
    return gx.to(x.dtype), gy.to(y.dtype), grad_scale.to(scale.dtype)


class _ChunkedLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize, with_columns):
        row, col = lse_forward(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize,
                               with_columns)
        ctx.save_for_backward(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, scale, row, col)
        ctx.id_offset, ctx.normalize, ctx.with_columns = id_offset, normalize, with_columns
        return row, col

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        x, y, x_mask, y_mask, y_logq, x_ids, y_ids, scale, row, col = ctx.saved_tensors
        grad_row = torch.zeros_like(row) if grad_row is None else grad_row
        grad_col = torch.zeros_like(col) if grad_col is None else grad_col
        gx, gy, gs = lse_backward(grad_row, grad_col, x, y, x_mask, y_mask, y_logq, x_ids, y_ids, ctx.id_offset,
                                  row, col, scale, ctx.normalize, ctx.with_columns)
        return gx, gy, None, None, None, None, None, None, gs, None, None


def contrastive_lse(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize, with_columns):
    """Differentiable (row_lse, col_lse); see the module docstring."""
    return _ChunkedLSE.apply(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, id_offset, scale, normalize,
                             with_columns)
