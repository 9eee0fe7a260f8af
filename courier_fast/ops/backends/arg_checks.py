"""Argument checks of the Triton ops courier_fast::contrastive_lse_triton / attention_core_triton
(and their backwards): the same rules as the compiled ops' checks in csrc/contrastive_lse.h and
csrc/attention_core.h, so that every op of torch.ops.courier_fast rejects a malformed tensor
before a kernel reads it. Shapes and devices raise RuntimeError, dtypes TypeError (as
TORCH_CHECK / TORCH_CHECK_TYPE do); each error names the argument. Index contents are trusted
(see docs/design.md §3 and csrc/attention_core.h): checked by value at the public API."""
import torch


def _vector(op, name, t, length, what, ref):
    if t is None:
        return
    if t.dim() != 1 or (length is not None and t.shape[0] != length):
        raise RuntimeError(f"{op}: {name} must be {what} = ({length},), got shape {list(t.shape)}")
    if t.device != ref.device:
        raise RuntimeError(f"{op}: {name} is on {t.device} but {'x' if op == 'contrastive_lse' else 'q'} "
                           f"is on {ref.device}")


def _dtype(op, name, t, ok, what):
    if t is not None and not ok(t.dtype):
        raise TypeError(f"{op}: {name} must be {what}, got {t.dtype}")


def _floating(dtype):
    return dtype.is_floating_point


def contrastive_lse_args(x, y, x_mask, y_mask, y_logq, x_ids, y_ids, scale):
    """x (N, d), y (M, d) floating, same dtype and device; masks (N,) / (M,) bool; y_logq (M,)
    floating; ids (N,) / (M,) int64, both or neither; scale 1 element floating."""
    op = "contrastive_lse"
    if x.dim() != 2 or y.dim() != 2:
        raise RuntimeError(f"{op}: x and y must be 2-D, got {list(x.shape)} and {list(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise RuntimeError(f"{op}: x and y need the same feature dim, got {x.shape[1]} and {y.shape[1]}")
    if x.device != y.device:
        raise RuntimeError(f"{op}: x and y on different devices")
    if x.dtype != y.dtype:
        raise TypeError(f"{op}: x and y differ in dtype")
    _dtype(op, "x", x, _floating, "floating point")
    n, m = x.shape[0], y.shape[0]
    for name, t, length, what in (("x_mask", x_mask, n, "(N,)"), ("y_mask", y_mask, m, "(M,)"),
                                  ("y_logq", y_logq, m, "(M,)"), ("x_ids", x_ids, n, "(N,)"),
                                  ("y_ids", y_ids, m, "(M,)")):
        _vector(op, name, t, length, what, x)
    for name, t in (("x_mask", x_mask), ("y_mask", y_mask)):
        _dtype(op, name, t, lambda d: d == torch.bool, "bool")
    _dtype(op, "y_logq", y_logq, _floating, "floating point")
    if (x_ids is None) != (y_ids is None):
        raise RuntimeError(f"{op}: give both x_ids and y_ids, or neither")
    for name, t in (("x_ids", x_ids), ("y_ids", y_ids)):
        _dtype(op, name, t, lambda d: d == torch.int64, "int64")
    if scale.numel() != 1 or scale.device != x.device:
        raise RuntimeError(f"{op}: scale must be a 1-element tensor on the inputs' device, got shape "
                           f"{list(scale.shape)} on {scale.device}")
    _dtype(op, "scale", scale, _floating, "floating point")


def contrastive_lse_backward_args(grad_row, grad_col, row_lse, col_lse, x, m, with_columns):
    """grad_row, row_lse (N,); grad_col, col_lse (M,) with columns (any 1-D length without:
    not read); on x's device; gradients floating, LSEs float32 (the Triton forward's)."""
    op, n = "contrastive_lse", x.shape[0]
    for name, t in (("grad_row", grad_row), ("row_lse", row_lse)):
        _vector(op, name, t, n, "(N,)", x)
    for name, t in (("grad_col", grad_col), ("col_lse", col_lse)):
        _vector(op, name, t, m if with_columns else None, "(M,) (with_columns)", x)
    for name, t in (("grad_row", grad_row), ("grad_col", grad_col)):
        _dtype(op, name, t, _floating, "floating point")
    for name, t in (("row_lse", row_lse), ("col_lse", col_lse)):  # the forward's: float32
        _dtype(op, name, t, lambda d: d == torch.float32, "float32 (the forward's LSE dtype)")


def attention_core_args(q, k, v, target_rows, key_rows, target_offsets, key_offsets, order, key_padding_mask,
                        causal, max_targets, max_keys):
    """q (T, h, dh), k/v (S, h, dh) floating, one dtype and device, head dim contiguous; the
    segment table int64 (T,) / (S,) / (B+1,) on q's device; key_padding_mask (S,) bool;
    causal in {0, 1, 2}; max_targets >= -1, max_keys >= 0."""
    op = "attention_core"
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise RuntimeError(f"{op}: q, k, v must be (N, h, dh), got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    if k.shape != v.shape:
        raise RuntimeError(f"{op}: k and v shapes differ: {list(k.shape)} and {list(v.shape)}")
    if q.shape[1:] != k.shape[1:]:
        raise RuntimeError(f"{op}: q and k disagree in heads or head dim: {list(q.shape)} and {list(k.shape)}")
    if k.device != q.device or v.device != q.device:
        raise RuntimeError(f"{op}: q, k, v on different devices")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{op}: q, k, v dtypes differ")
    _dtype(op, "q", q, _floating, "floating point")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[2] > 1 and t.stride(2) != 1:
            raise RuntimeError(f"{op}: {name}'s head dim must be contiguous (stride 1), got strides {t.stride()}")
    if target_offsets.dim() != 1 or target_offsets.shape[0] < 1:
        raise RuntimeError(f"{op}: target_offsets must be (B+1,), got shape {list(target_offsets.shape)}")
    b1, n_t, n_s = target_offsets.shape[0], q.shape[0], k.shape[0]
    index = (("target_rows", target_rows, n_t, "(T,)"), ("order", order, n_t, "(T,)"),
             ("key_rows", key_rows, n_s, "(S,)"), ("target_offsets", target_offsets, b1, "(B+1,)"),
             ("key_offsets", key_offsets, b1, "(B+1,) like target_offsets"))
    for name, t, length, what in index:
        _vector(op, name, t, length, what, q)
    for name, t, _, _ in index:
        _dtype(op, name, t, lambda d: d == torch.int64, "int64")
    _vector(op, "key_padding_mask", key_padding_mask, n_s, "(S,)", q)
    _dtype(op, "key_padding_mask", key_padding_mask, lambda d: d == torch.bool, "bool")
    if causal not in (0, 1, 2):
        raise RuntimeError(f"{op}: causal must be 0, 1 or 2, got {causal}")
    if max_targets < -1 or max_keys < 0:
        raise RuntimeError(f"{op}: max_targets must be >= -1 and max_keys >= 0, got {max_targets} and {max_keys}")


def attention_core_backward_args(grad_out, q, out, lse, acc_dtype):
    """grad_out, out (T, h*dh) floating; lse (T, h) of the forward's dtype acc_dtype; on q's device."""
    op = "attention_core"
    n_t, h, dh = q.shape
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.dim() != 2 or tuple(t.shape) != (n_t, h * dh):
            raise RuntimeError(f"{op}: {name} must be (T, h*dh) = ({n_t}, {h * dh}), got shape {list(t.shape)}")
        _dtype(op, name, t, _floating, "floating point")
    if tuple(lse.shape) != (n_t, h):
        raise RuntimeError(f"{op}: lse must be (T, h) = ({n_t}, {h}), got shape {list(lse.shape)}")
    _dtype(op, "lse", lse, lambda d: d == acc_dtype, f"{acc_dtype} (the forward's)")
    for name, t in (("grad_out", grad_out), ("out", out), ("lse", lse)):
        if t.device != q.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but q is on {q.device}")
