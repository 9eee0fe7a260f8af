"""Launch limits a GPU user hits first, checked on CPU by arithmetic and the Triton interpreter
(issue 13, item 2): int64 offsets, CUDA grid limits, head-dim tiles, the device guard, and the
CUDA contrastive tile size."""
import subprocess
import sys
import textwrap

import pytest
import torch

import courier_fast as cf
from courier_fast.ops import dispatch
from courier_fast.ops.reference import reconstruction_attention_reference

from courier_fast.ops.selfcheck import tolerances
from conftest import TRITON_DEVICE, launchable, rand_mask, randn

triton = pytest.importorskip("triton")
from courier_fast.kernels import contrastive_lse as lse_kernels  # noqa: E402
from courier_fast.kernels import reconstruction_attention as attn_kernels  # noqa: E402

CUDA_GRID_YZ = 65535  # gridDim.y / gridDim.z limit (gridDim.x: 2^31 - 1)
ATTN_KERNELS = ("_short_fwd_kernel", "_short_bwd_dq_kernel", "_short_bwd_dkdv_kernel",
                "_flash_fwd_kernel", "_flash_bwd_dkdv_kernel", "_flash_bwd_dq_kernel", "_dkdv_reduce_kernel")


class _Recorder:
    """Stands in for a Triton kernel: records the grid (and whether it was launched inside the
    device guard) instead of running."""

    def __init__(self, log, guard_state):
        self.log, self.guard_state = log, guard_state

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = {"BLOCK_N": 16, "BLOCK_M": 16, **kwargs}
            self.log.append((grid(meta) if callable(grid) else grid, self.guard_state["inside"]))
        return launch


@pytest.fixture
def recorded(monkeypatch):
    """Replace every Triton kernel launcher by a recorder; the device guard marks its scope."""
    log, state = [], {"inside": False}

    class Guard:
        def __init__(self, t):
            self.t = t

        def __enter__(self):
            state["inside"] = True

        def __exit__(self, *exc):
            state["inside"] = False

    for name in ATTN_KERNELS:
        monkeypatch.setattr(attn_kernels, name, _Recorder(log, state))
    monkeypatch.setattr(attn_kernels, "device_guard", Guard)
    for name in ("_row_lse_kernel", "_grad_x_kernel", "_grad_y_kernel"):  # what lse_kernels.launch runs
        monkeypatch.setattr(lse_kernels, name, _Recorder(log, state))
    monkeypatch.setattr(lse_kernels, "device_guard", Guard)
    return log


def _attn_inputs(b, h, p, length, dh, dtype=torch.float32):
    """Flat q (B*P, h, dh), k/v (B*L, h, dh) and the padded layout's segment table."""
    from courier_fast.ops import attention_layout

    q = torch.zeros(b * p, h, dh, dtype=dtype)
    k, v = torch.zeros(b * length, h, dh, dtype=dtype), torch.zeros(b * length, h, dh, dtype=dtype)
    seg = attention_layout.segments(torch.zeros(b, p, 1), torch.zeros(b, length, 1))
    return q, k, v, seg


def test_attention_grid_keeps_batch_times_heads_off_the_limited_axes(recorded):
    """B*h = 70000 (row, head) pairs: the many programs must sit on grid axis 0 (axes 1 and 2
    stop at 65535): long histories (flash kernels) a program per (row, head) there, short ones
    (packed kernels) programs over target / key blocks there and the heads on axis 1."""
    q, k, v, seg = _attn_inputs(17500, 4, 1, 17, 16)
    out, lse = attn_kernels.attention_forward(q, k, v, seg, 0, 0.25)
    attn_kernels.attention_backward(torch.zeros_like(out), q, k, v, out, lse, seg, 0, 0.25)
    assert len(recorded) == 3
    for grid, _ in recorded:
        assert all(n <= CUDA_GRID_YZ for n in grid[1:]), grid
        assert grid[0] >= 70000
    recorded.clear()
    q, k, v, seg = _attn_inputs(17500, 4, 1, 3, 16)
    out, lse = attn_kernels.attention_forward(q, k, v, seg, 0, 0.25)
    attn_kernels.attention_backward(torch.zeros_like(out), q, k, v, out, lse, seg, 0, 0.25)
    assert len(recorded) == 3
    # forward and dQ: BLOCK_T targets per program; dK/dV: a program per piece (a row's chunk of
    # targets, kernels/attention_split.py), here one per row
    per_program = [attn_kernels.short_blocks(3, 16)[0]] * 2 + [1]
    for (grid, _), block, rows in zip(recorded, per_program, (17500, 17500, 17500)):
        assert all(n <= CUDA_GRID_YZ for n in grid[1:]), grid
        assert grid[0] * block >= rows and grid[1] == 4


def test_every_triton_launch_is_inside_the_device_guard(recorded):
    for length in (5, 20):  # short and flash kernels
        q, k, v, seg = _attn_inputs(2, 2, length, length, 8)
        out, lse = attn_kernels.attention_forward(q, k, v, seg, 1, 0.25)
        attn_kernels.attention_backward(torch.zeros_like(out), q, k, v, out, lse, seg, 1, 0.25)
    x, y = torch.randn(5, 8), torch.randn(6, 8)
    row, col = lse_kernels.lse_forward(x, y, None, None, 2.0, True, True)
    lse_kernels.lse_backward(torch.ones(5), torch.ones(6), x, y, None, None, row, col, 2.0, True, True)
    assert len(recorded) == 2 * 3 + 2 + 2
    assert all(inside for _, inside in recorded)


@pytest.mark.parametrize("dh", [8, 16, 32, 64, 100, 128, 200, 256])
@pytest.mark.parametrize("fp32", [False, True])
def test_attention_gpu_tiles_are_capped_and_from_the_compiled_table(dh, fp32):
    """The tiles a GPU launches (blocks(gpu=True), whatever machine runs the test; the
    interpreter's own 16 x 16 tiles are not what is checked): every one is a pair of the table
    the compile report checked (block_options), and the q/k/v tiles a program holds stay within
    TILE_BUDGET for any P and L. fp32 beyond FP32_MAX_HEAD_DIM is refused, not launched."""
    if fp32 and dh > attn_kernels.FP32_MAX_HEAD_DIM:
        with pytest.raises(ValueError, match="float32 inputs only up to head dim"):
            attn_kernels.blocks(4, 4, dh, fp32=True, gpu=True)
        return
    for p, length in ((1, 1), (10, 50), (1000, 1000), (5, 4096), (17, 3)):
        block_p, block_l, block_dh = attn_kernels.blocks(p, length, dh, fp32=fp32, gpu=True)
        p_opts, l_opts = attn_kernels.block_options(block_dh, fp32)
        assert block_dh >= dh and block_p in p_opts and block_l in l_opts
        assert block_l >= min(length, max(l_opts))  # one tile whenever one of the table fits
        assert (block_p + 2 * block_l) * block_dh <= attn_kernels.TILE_BUDGET, (p, length, dh)


def test_attention_rejects_head_dims_above_the_tile_limit():
    q, k, v, seg = _attn_inputs(1, 1, 2, 2, attn_kernels.MAX_HEAD_DIM + 8)
    with pytest.raises(ValueError, match="head dim"):
        attn_kernels.attention_forward(q, k, v, seg, 0, 0.1)
    impl = dispatch.implementations("reconstruction_attention")["triton"]
    assert not impl.supports(torch.zeros(1, 2, 2 * (attn_kernels.MAX_HEAD_DIM + 8)), num_heads=2)


def _triton_usable():
    return dispatch.op_backends("reconstruction_attention")["triton"][0]


@pytest.mark.skipif(not _triton_usable(), reason="triton backend not usable here")
@pytest.mark.parametrize("d,h,causal", [(256, 4, False), (256, 4, True), (256, 1, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_default_head_dims(gen, d, h, causal, dtype):
    """d = 256 with dh = 64 (the model default) and dh = 256, forward and backward, on the device
    the triton backend runs on (the GPU, else the interpreter): fp32 at fp32 accuracy where it is
    launched (declined with a clear error where it is not: dh = 256 on a GPU), bf16 within the
    16-bit bar of courier_fast.ops.selfcheck.tolerances."""
    b, length = 2, 7
    p = length if causal else 5
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    m = cf.nn.ReconstructionAttention(d, h, dtype=torch.float64)
    params = [m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias]
    t, hist = randn(gen, b, p, d, dtype=torch.float64), randn(gen, b, length, d, dtype=torch.float64)
    pad = rand_mask(gen, b, length, p=0.3)
    pad[1] = True  # an empty history row
    inputs = [x.detach().to(dtype).double() for x in (t, hist, *params)]  # what the backend sees
    g = torch.randn(b, p, d, generator=gen, dtype=torch.float64)

    def run(fn, dt, dev):
        leaves = [x.to(device=dev, dtype=dt).requires_grad_() for x in inputs]
        out = fn(*leaves, h, key_padding_mask=pad.to(dev), causal=causal)
        return [out] + list(torch.autograd.grad(out, leaves, g.to(device=dev, dtype=out.dtype)))

    triton = lambda *a, **k: cf.reconstruction_attention(*a, **k, backend="triton")
    if not launchable("reconstruction_attention", "triton", targets=t.to(TRITON_DEVICE, dtype), num_heads=h):
        with pytest.raises(ValueError, match="float32 inputs only up to head dim"):
            run(triton, dtype, TRITON_DEVICE)
        return
    want = run(reconstruction_attention_reference, torch.float64, "cpu")
    got = run(triton, dtype, TRITON_DEVICE)
    cls = tolerances.matmul_class(dtype, TRITON_DEVICE, precision="highest", allow_tf32=False)
    yard = run(reconstruction_attention_reference, dtype, TRITON_DEVICE) if dtype != torch.float32 else None
    for i, (out, ref) in enumerate(zip(got, want)):
        err = tolerances.rel_error(out, ref)
        allowed = tolerances.allowed_error(cls, None if yard is None else tolerances.rel_error(yard[i], ref))
        assert err <= allowed, f"output {i}: error {err:.3g} > allowed {allowed:.3g}"


_BIG_STRIDE = textwrap.dedent("""
    import os, sys, torch
    os.environ["TRITON_INTERPRET"] = "1"
    from courier_fast.ops import attention_layout
    from courier_fast.kernels import reconstruction_attention as attn
    dh, far = 16, 2**30 + 64  # fits int32, but 2 * far does not
    big = torch.empty(2 * far + 20 * dh, dtype=torch.float16)  # virtual, untouched but for the rows used
    g = torch.Generator().manual_seed(0)

    def check(k, b, length, heads):
        # k: a (S, h, dh) view whose rows (short kernels) or heads (flash kernels) lie 2^30 apart
        for row in range(k.shape[0]):
            for hd in range(heads):
                k[row, hd] = torch.randn(dh, generator=g).half()
        q = torch.randn(b * 2, heads, dh, generator=g).half()
        seg = attention_layout.segments(torch.zeros(b, 2, 1), torch.zeros(b, length, 1))
        out, lse = attn.attention_forward(q, k, k, seg, 0, 0.25)
        kc = k.float().reshape(b, length, heads, dh).transpose(1, 2)
        s = (q.float().reshape(b, 2, heads, dh).transpose(1, 2) @ kc.transpose(-1, -2)) * 0.25
        want = (torch.softmax(s, -1) @ kc).transpose(1, 2).reshape(b * 2, heads * dh)
        err = (out.float() - want).abs().max().item()
        dq, dk, dv = attn.attention_backward(torch.ones_like(out), q, k, k, out, lse, seg, 0, 0.25)
        print("max error", err)
        return err < 1e-2 and all(bool(torch.isfinite(t.float()).all()) for t in (dq, dk, dv))

    short = big.as_strided((3, 1, dh), (far, dh, 1))  # 3 rows of 1 key: row offsets up to 2 * far
    flash = big.as_strided((20, 3, dh), (dh, far, 1))  # 1 row of 20 keys: head offsets up to 2 * far
    sys.exit(0 if check(short, 3, 1, 1) and check(flash, 1, 20, 3) else 1)
""")


def test_attention_offsets_are_int64_beyond_2_to_31_elements():
    """History rows (short kernels) or heads (flash kernels) 2^30 elements apart (a K/V buffer
    past 2^31 elements): int32 offsets wrap around and read the wrong memory (or crash, hence
    the subprocess)."""
    run = subprocess.run([sys.executable, "-c", _BIG_STRIDE], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]


@pytest.mark.skipif(not cf.build_info()["extension_loaded"], reason="courier_fast._C not built")
def test_cuda_contrastive_tiles_are_sized_by_rows():
    """At M = 2^20 candidates a fixed 2^24-element tile is 16 rows: GEMMs that thin waste the
    GPU. The CUDA driver keeps at least CUDA_MIN_TILE_ROWS rows per tile; memory stays
    O(rows * M)."""
    rows = torch.ops.courier_fast.lse_tile_rows
    min_rows = 256
    assert rows(2**20, 2**20, True) >= min_rows
    assert rows(100, 2**20, True) == 100  # never more rows than there are
    assert rows(2**20, 1000, True) * 1000 <= 2**26  # small M: the element budget, not rows
    assert rows(2**20, 2**20, False) >= 16  # CPU keeps its cache-sized tiles


def test_fp32_inputs_wider_than_the_spill_free_tiles_are_not_launched_on_a_gpu(monkeypatch):
    """On a GPU (INTERPRET off) the Triton kernels launch fp32 only where the compile report
    found spill-free tiles; wider fp32 calls are declined by supports() (auto moves on) and are
    a clear error when asked for by name. 16-bit inputs have no such limit."""
    monkeypatch.setattr(lse_kernels, "INTERPRET", False)
    monkeypatch.setattr(attn_kernels, "INTERPRET", False)
    wide, narrow = lse_kernels.FP32_MAX_D + 1, lse_kernels.FP32_MAX_D
    assert lse_kernels.supports(torch.zeros(4, narrow)) and not lse_kernels.supports(torch.zeros(4, wide))
    assert not lse_kernels.supports(torch.zeros(4, wide, dtype=torch.float64))
    assert lse_kernels.supports(torch.zeros(4, 1024, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bf16/fp16"):
        lse_kernels.lse_forward(torch.zeros(4, wide), torch.zeros(4, wide), None, None, 1.0, True, False)
    dh = attn_kernels.FP32_MAX_HEAD_DIM
    assert attn_kernels.supports(torch.zeros(1, 2, 2 * dh), num_heads=2)
    assert not attn_kernels.supports(torch.zeros(1, 2, 4 * dh), num_heads=2)
    assert attn_kernels.supports(torch.zeros(1, 2, 4 * dh, dtype=torch.bfloat16), num_heads=2)
    with pytest.raises(ValueError, match="float32 inputs only up to head dim"):
        attn_kernels.blocks(4, 8, 2 * dh, fp32=True, gpu=True)
    assert attn_kernels.blocks(4, 8, 2 * dh, fp32=False, gpu=True)[2] == 2 * dh
    for block_dh in (16, 32, 64):  # the fp32 tables exist exactly where fp32 is launched
        assert attn_kernels.block_options(block_dh, fp32=True)
    for cls in (16, 32, 64):
        for kernel in ("row_lse", "grad_x", "grad_y"):
            assert lse_kernels.config_table(kernel, cls, fp32=True)
