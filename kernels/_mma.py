"""The matrix product both Triton kernel files use (device code)."""
import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
# fp32 dots: 3xTF32 on tensor cores (about fp32 accuracy; IEEE FMA dots spill registers at
# every useful tile size, see bench/results/static-kernels.json); IEEE in the interpreter.
FP32_DOT = tl.constexpr("ieee" if INTERPRET else "tf32x3")


@triton.jit
def dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b, fp32 accumulation; a must already be in b's dtype unless DOT_FP32."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=FP32_DOT)
    else:
        return tl.dot(a, b)
