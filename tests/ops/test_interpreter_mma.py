"""The interpreter's emulation of the GPU's 16-bit arithmetic (kernels/_mma.py): on CPU the
Triton kernels run their 16-bit path with the precision a GPU's cvt.rn and bf16/fp16 MMA give,
so the 16-bit tests and self-check problems check that path and not an fp32 stand-in."""
import pytest
import torch

from courier_fast.kernels._launch import INTERPRET

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(not INTERPRET, reason="checks the CPU interpreter's emulation (a GPU runs real MMA)")

import triton.language as tl  # noqa: E402

from courier_fast.kernels import contrastive_lse, reconstruction_attention  # noqa: E402
from courier_fast.kernels._mma import dot, to_16bit  # noqa: E402


@triton.jit
def _round_kernel(X, OUT_BF16, OUT_FP16, N: tl.constexpr):
    i = tl.arange(0, N)
    x = tl.load(X + i)
    tl.store(OUT_BF16 + i, to_16bit(x, tl.bfloat16))
    tl.store(OUT_FP16 + i, to_16bit(x, tl.float16))


@triton.jit
def _dot_kernel(A, B, C, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    a = tl.load(A + tl.arange(0, M)[:, None] * K + tl.arange(0, K)[None, :])
    b = tl.load(B + tl.arange(0, K)[:, None] * N + tl.arange(0, N)[None, :])
    tl.store(C + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :], dot(a, b, False))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy: fp16 overflow to inf
def test_rounding_to_16_bits_is_round_to_nearest_even_like_the_gpu(gen):
    """Normal, subnormal, overflowing and tie values: the same bits as torch's conversion."""
    n = 4096
    x = torch.randn(n, generator=gen) * 3
    x[:512] = torch.rand(512, generator=gen) * 2e-38  # bf16 / fp32 subnormals
    x[512:1024] = torch.rand(512, generator=gen) * 1e-4  # fp16 subnormals
    x[1024:1030] = torch.tensor([3.3e38, -3.4e38, 7e4, float("inf"), -0.0, 1.0 + 2**-8])  # overflow, tie
    ties = torch.randint(-(2**15), 2**15, (100,), generator=gen).float() * 2**-7 + 2**-8  # exact bf16 ties
    x[1100:1200] = ties
    bf16, fp16 = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.float16)
    _round_kernel[(1,)](x, bf16, fp16, N=n)
    assert torch.equal(bf16.view(torch.int16), x.bfloat16().view(torch.int16))
    assert torch.equal(fp16.view(torch.int16), x.half().view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_dot_is_exact_products_with_fp32_accumulation(gen, dtype):
    """dot(a, b) of 16-bit operands (subnormals included) equals the float64 product of those
    operands up to fp32 accumulation rounding, as a tensor-core MMA computes it."""
    a = (torch.randn(32, 64, generator=gen) * torch.logspace(-6, 1, 64)).to(dtype)
    b = torch.randn(64, 16, generator=gen).to(dtype)
    a[0, :8] = torch.tensor([1e-40, 5e-39, 2e-41, 1e-39, -3e-40, 0.0, 6e-8, -6e-8]).to(dtype)
    c = torch.empty(32, 16)
    _dot_kernel[(1,)](a, b, c, M=32, K=64, N=16)
    want = a.double() @ b.double()
    bound = 64 * 2**-24 * (a.double().abs() @ b.double().abs())  # fp32 accumulation of 64 terms
    assert ((c.double() - want).abs() <= bound + 1e-45).all()


def test_16bit_inputs_take_the_16bit_path_in_the_interpreter():
    """No fp32 stand-in: 16-bit inputs launch with DOT_FP32 off (P / dS are cast to 16 bits and
    the MMA is emulated), fp32 inputs with it on."""
    assert not contrastive_lse.dot_fp32(torch.bfloat16) and not contrastive_lse.dot_fp32(torch.float16)
    assert contrastive_lse.dot_fp32(torch.float32)
    assert not reconstruction_attention._dot_fp32(torch.bfloat16) and reconstruction_attention._dot_fp32(torch.float32)
