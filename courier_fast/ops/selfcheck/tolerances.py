"""The accuracy bar every backend is held to, stated once (docs/design.md §4). The self-check
(courier_fast.ops.selfcheck.check) and the tests both judge with these functions.

Error of one output tensor (a loss, an attention output, each gradient) against the float64
reference, relative to that tensor's own norm:

    rel_error(got, want) = ||got - want||_2 / ||want||_2

An output that is exactly zero by contract (no active anchor, every candidate masked) must come
back exactly zero. A NaN or Inf anywhere fails, and no later check can hide it.

Allowed error, by the precision the computation runs at (matmul_class):
    "fp32"  float32 inputs, IEEE-accurate GEMMs                   FP32     = 1e-5
    "tf32"  float32 inputs with TF32 GEMMs (allow_tf32, or
            torch.set_float32_matmul_precision("high"))           TF32     = 3e-4
    "bf16" / "fp16"  16-bit inputs (or float32 inputs under precision "medium", judged as bf16):
            HALF_FACTOR x the error of plain PyTorch computing the same problem in that dtype
            (the flash-attention rule), plus HALF_FLOOR[dtype] so that a problem where
            PyTorch is exact by luck does not demand exactness.
"""
import math

import torch

FP32 = 1e-5
TF32 = 3e-4
HALF_FACTOR = 2.0
HALF_FLOOR = {"bf16": 2.0 ** -10, "fp16": 2.0 ** -13}  # a quarter of each dtype's unit roundoff
HALF_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def rel_error(got, want):
    """||got - want|| / ||want|| in float64 (0 when both are exactly zero, inf for a shape
    mismatch, a NaN/Inf in got, or a non-zero got where want is exactly zero)."""
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    if got.shape != want.shape or not bool(torch.isfinite(got).all()):
        return math.inf
    diff = torch.linalg.vector_norm(got - want).item()
    scale = torch.linalg.vector_norm(want).item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def matmul_class(dtype, device="cpu", precision=None, allow_tf32=None):
    """The precision class a computation in `dtype` on `device` runs at: "fp32", "tf32",
    "bf16" or "fp16". precision / allow_tf32 default to torch's current float32 matmul settings
    (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32)."""
    if dtype in HALF_DTYPES:
        return HALF_DTYPES[dtype]
    if dtype == torch.float64:
        return "fp32"  # every backend computes at least in float32; float64 is held to fp32
    precision = torch.get_float32_matmul_precision() if precision is None else precision
    if precision == "medium":
        return "bf16"
    cuda = torch.device(device).type == "cuda"
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32 if allow_tf32 is None else allow_tf32
    if precision == "high" or (cuda and allow_tf32):
        return "tf32"
    return "fp32"


def allowed_error(cls, yardstick_error=None):
    """The largest rel_error accepted for precision class cls; the 16-bit classes need the
    error of plain PyTorch on the same problem (yardstick_error)."""
    if cls == "fp32":
        return FP32
    if cls == "tf32":
        return TF32
    if yardstick_error is None:
        raise ValueError(f"the {cls} bar needs yardstick_error (plain PyTorch's own {cls} error)")
    return HALF_FACTOR * yardstick_error + HALF_FLOOR[cls]
