"""The compiled op courier_fast::attention_core (CUDA only: csrc/cuda/attention_core_cuda.cu):
torch.library.opcheck of its schema, fake kernel and autograd on the segment tables the
reconstruction attention passes (strided (N, h, dh) views of the projections, every layout,
masks, causal modes, empty rows).
Its values are compared with the float64 reference in test_reconstruction_attention.py (the
`cuda` backend there); it has one path per kernel and values-per-lane count (a warp per target or
history item, an online softmax over the whole history), so no tile size to force."""
import pytest
import torch

import courier_fast as cf
from courier_fast import _extension

from conftest import requires_cuda
from test_reconstruction_attention import _core_args

pytestmark = [
    pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built"),
    requires_cuda,
    pytest.mark.cuda,
    pytest.mark.skipif(not _extension.cuda_compiled(), reason="courier_fast._C built without CUDA"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout,causal", [("padded", 0), ("padded", 1), ("padded", 2), ("history_index", 0),
                                           ("jagged", 0), ("jagged", 1)])
@pytest.mark.parametrize("dh", [4, 40, 200])  # 1, 2 and 8 values per lane
def test_opcheck_cuda_attention_core(gen, dtype, layout, causal, dh):
    """The op on each layout's segment table (rows without targets, empty history rows, padding,
    causal modes; see test_reconstruction_attention._core_args)."""
    args = list(_core_args(gen, "cuda", layout, causal, dh=dh))
    args[:3] = [x.detach().to(dtype).requires_grad_() for x in args[:3]]
    torch.library.opcheck(torch.ops.courier_fast.attention_core.default, tuple(args))
