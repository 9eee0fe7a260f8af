"""The matrix product both Triton kernel files use (device code).

On a GPU, `dot` is tl.dot: 16-bit operands go to bf16/fp16 MMA with fp32 accumulation, fp32
operands to 3xTF32 MMA (about fp32 accuracy; IEEE FMA dots spill registers at every useful tile
size, see bench/results/static-kernels.json).

Under TRITON_INTERPRET=1 the interpreter's own 16-bit tl.dot does not round like an MMA, and its
fp32 -> bf16 cast truncates (a GPU rounds to nearest even), so the 16-bit path is emulated
instead of skipped: `to_16bit` rounds to bf16/fp16 to nearest even exactly as the GPU's cvt
does, so the operands are the exact 16-bit values the MMA would read; `dot` widens them to fp32
(exactly) and multiplies with IEEE fp32 accumulation. Every other line of the 16-bit path
(casts, rescaling, masks) runs as it does on a GPU. fp32 dots run in IEEE fp32 there (the
GPU's 3xTF32 agrees with it to about fp32 rounding). On a GPU both functions compile to exactly
the plain tl.dot / .to() they were before (the emulation branches are constexpr-false).
"""
import triton
import triton.language as tl

from courier_fast.kernels._launch import INTERPRET

FP32_DOT = tl.constexpr("ieee" if INTERPRET else "tf32x3")
EMULATE_16BIT_MMA = tl.constexpr(INTERPRET)


@triton.jit
def _widen(a):
    """16-bit a as fp32, exactly (the interpreter's own bf16 -> fp32 cast loses subnormals)."""
    if a.dtype == tl.bfloat16:
        return (a.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return a.to(tl.float32)


@triton.jit
def dot(a, b, DOT_FP32: tl.constexpr):
    """a @ b, fp32 accumulation; a must already be in b's dtype unless DOT_FP32."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=FP32_DOT)
    elif EMULATE_16BIT_MMA:
        return tl.dot(_widen(a), _widen(b), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def to_16bit(a, dtype: tl.constexpr):
    """a (fp32) rounded to the 16-bit dtype, to nearest even (as a GPU's cvt.rn)."""
    if EMULATE_16BIT_MMA and dtype == tl.bfloat16:
        bits = a.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # the bf16 bit pattern (subnormals too)
        return bits.to(tl.uint16).to(dtype, bitcast=True)
    else:
        return a.to(dtype)
