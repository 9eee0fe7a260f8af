"""The compiled op courier_fast::attention_core (CUDA only: csrc/cuda/attention_core_cuda.cu):
torch.library.opcheck of its schema, fake kernel and autograd on the layouts the reconstruction
attention passes (strided (B, h, T, dh) views of the projections, masks, causal, empty rows).
Its values are compared with the float64 reference in test_reconstruction_attention.py (the
`cuda` backend there); it has one path per kernel (a warp per target or history item, an online
softmax over the whole history), so no tile size to force."""
import pytest
import torch

import courier_fast as cf
from courier_fast import _extension

from conftest import rand_mask, randn, requires_cuda

pytestmark = [
    pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built"),
    requires_cuda,
    pytest.mark.cuda,
    pytest.mark.skipif(not _extension.cuda_compiled(), reason="courier_fast._C built without CUDA"),
]


def _heads(gen, b, t, h, dh, dtype, device):
    """A (B, h, T, dh) leaf with the projections' layout: a transposed view of (B, T, h, dh)."""
    return randn(gen, b, t, h, dh, dtype=dtype, device=device).transpose(1, 2).detach().requires_grad_()


def sample_inputs(gen, device, dtype=torch.float32):
    """(q, k, v, key_padding_mask, causal, sm_scale) argument tuples: no mask, a random mask with
    one row all padding (its output is 0 and its LSE -inf), causal self-reconstruction (P = L),
    strict (1) and inclusive (2)."""
    b, h, p, length, dh = 3, 2, 5, 7, 8
    q, k, v = (_heads(gen, b, t, h, dh, dtype, device) for t in (p, length, length))
    pad = rand_mask(gen, b, length, p=0.3, device=device)
    pad[1] = True
    qc = _heads(gen, b, length, h, dh, dtype, device)
    return [(q, k, v, None, 0, 0.35), (q, k, v, pad, 0, 0.35), (qc, k, v, pad, 1, 0.35), (qc, k, v, pad, 2, 0.35)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_opcheck_cuda_attention_core(gen, dtype):
    for args in sample_inputs(gen, "cuda", dtype):
        torch.library.opcheck(torch.ops.courier_fast.attention_core.default, args)
