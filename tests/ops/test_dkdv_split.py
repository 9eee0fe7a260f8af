"""The dK/dV split of the attention backward (issue 27 item 6): a history row shared by many
targets (history_index with a skewed index) is cut into pieces of <= chunk targets
(kernels/attention_split.py); phase 1 writes fp32 partials per piece, phase 2 sums them in chunk
order. Checked here: gradients against the float64 reference with a row far longer than the chunk
(short and flash kernels, masks, causal, empty rows), determinism, that the launcher runs the plan
the work model reads, the work model's balance on a Zipf-skewed index, and that the CUDA backend's
C++ mirror of the policy (csrc/attention_core.h) has the same constants."""
import os
import re

import pytest
import torch

import courier_fast as cf
from courier_fast.ops import attention_layout

from conftest import TRITON_DEVICE, rand_mask, randn
from test_reconstruction_attention import _against_reference, _inputs

triton = pytest.importorskip("triton")
from courier_fast.kernels import attention_split  # noqa: E402
from courier_fast.kernels import reconstruction_attention as attn  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _skewed_index(gen, b, long_row, n_long, n_rest):
    """n_long targets on long_row, n_rest spread over the other rows except row 1 (no targets)."""
    others = torch.tensor([r for r in range(b) if r not in (long_row, 1)])
    idx = torch.cat([torch.full((n_long,), long_row), others[torch.randint(0, len(others), (n_rest,), generator=gen)]])
    return idx[torch.randperm(len(idx), generator=gen)]


def _plan_of(targets, history, **kw):
    seg = attention_layout.segments(targets, history, **kw)
    return attn.split_plan(seg, seg.target_offsets, seg.key_offsets, targets.reshape(-1, targets.shape[-1]).shape[0],
                           seg.key_rows.numel())


@pytest.mark.parametrize("length", [5, 11, 20, 37], ids=["short5", "short11", "flash20", "flash37"])
def test_skewed_history_index_gradients_match_reference(gen, length):
    """One row holds 3x-4x the chunk's targets, a row has none, a history row is all padding,
    odd head dim (12 / 3 = 4) and lengths; output and every gradient (targets: dQ; history and the
    in-projection's K and V blocks: dK and dV separately) vs the float64 reference."""
    b, d, h = 5, 12, 3
    idx = _skewed_index(gen, b, long_row=3, n_long=110, n_rest=13)
    inputs = _inputs(gen, (len(idx), d), (b, length, d), d, h)
    pad = rand_mask(gen, b, length, p=0.3)
    pad[2] = True  # an empty history row (its targets get the output bias)
    plan = _plan_of(inputs[0], inputs[1], history_index=idx)
    assert plan.ws_rows > 0 and int(plan.piece_offsets[4] - plan.piece_offsets[3]) >= 3  # really split
    _against_reference(gen, "triton", TRITON_DEVICE, torch.float32, h, inputs,
                       {"history_index": idx, "key_padding_mask": pad})


@pytest.mark.parametrize("causal", [True, "inclusive"])
def test_causal_jagged_long_row_split(gen, causal):
    """target_offsets with causal (positions within the row cross the chunk boundary): a 70-item
    row (3 pieces of <= 32 targets), an empty row, a short one; flash kernels."""
    d, h = 8, 2
    lengths = torch.tensor([3, 70, 0, 5])
    offsets = cf.jagged.lengths_to_offsets(lengths)
    n = int(offsets[-1])
    inputs = _inputs(gen, (n, d), (n, d), d, h)
    kw = {"history_offsets": offsets, "target_offsets": offsets, "key_padding_mask": rand_mask(gen, n, p=0.2)}
    assert _plan_of(inputs[0], inputs[1], **{k: kw[k] for k in ("history_offsets", "target_offsets")}).ws_rows > 0
    _against_reference(gen, "triton", TRITON_DEVICE, torch.float32, h, inputs, kw, causal=causal)


def test_jagged_short_history_many_targets(gen):
    """Jagged history (short kernels, max_history_len above the longest row) with jagged targets:
    a row of 75 targets over 3 keys, rows without targets or keys, a padding mask."""
    d, h = 6, 2
    h_off = cf.jagged.lengths_to_offsets(torch.tensor([3, 0, 5, 1, 4]))
    t_off = cf.jagged.lengths_to_offsets(torch.tensor([75, 4, 0, 1, 9]))
    inputs = _inputs(gen, (int(t_off[-1]), d), (int(h_off[-1]), d), d, h)
    kw = {"history_offsets": h_off, "target_offsets": t_off, "max_history_len": 7,
          "key_padding_mask": rand_mask(gen, int(h_off[-1]), p=0.2)}
    _against_reference(gen, "triton", TRITON_DEVICE, torch.float32, h, inputs, kw)


@pytest.mark.parametrize("length", [5, 20], ids=["short", "flash"])
def test_split_backward_is_deterministic(gen, length):
    """Two runs give bitwise equal dQ, dK, dV (phase 2 sums in chunk order; no atomics)."""
    b, h, dh = 3, 2, 8
    idx = _skewed_index(gen, b, long_row=0, n_long=100, n_rest=7)
    seg = attention_layout.segments(torch.zeros(len(idx), 1), torch.zeros(b, length, 1), history_index=idx)
    q = randn(gen, len(idx), h, dh, device=TRITON_DEVICE)
    k, v = randn(gen, b * length, h, dh, device=TRITON_DEVICE), randn(gen, b * length, h, dh, device=TRITON_DEVICE)
    seg = attention_layout.Segments(*[x.to(TRITON_DEVICE) if isinstance(x, torch.Tensor) else x for x in seg])
    out, lse = attn.attention_forward(q, k, v, seg, 0, 0.3)
    go = randn(gen, *out.shape, device=TRITON_DEVICE)
    first = attn.attention_backward(go, q, k, v, out, lse, seg, 0, 0.3)
    second = attn.attention_backward(go, q, k, v, out, lse, seg, 0, 0.3)
    for a, e in zip(first, second):
        assert torch.equal(a, e)


class _Spy:
    """Stands in for a Triton kernel: records (grid, args) and launches nothing."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, grid, args))


@pytest.mark.parametrize("length", [5, 20], ids=["short", "flash"])
def test_launcher_runs_the_split_plan(monkeypatch, length):
    """The dK/dV launch is the one the work model describes: its grid spans the plan's pieces
    (x heads, x key tiles), it reads the plan's piece table, and phase 2 runs when a row has more
    than one piece. The old kernels launched a program per key block (grid cdiv(S, 16) x h) or per
    (row, head) x key tile, walking every target of the row."""
    log, plans = [], []
    for name in ("_short_bwd_dq_kernel", "_short_bwd_dkdv_kernel", "_flash_bwd_dkdv_kernel",
                 "_flash_bwd_dq_kernel", "_dkdv_reduce_kernel"):
        monkeypatch.setattr(attn, name, _Spy(name, log), raising=False)
    real = attention_split.split_plan
    monkeypatch.setattr(attention_split, "split_plan", lambda *a: plans.append(real(*a)) or plans[-1])
    b, h, dh = 4, 3, 8
    idx = torch.tensor([0] * 200 + [1, 2, 2])
    seg = attention_layout.segments(torch.zeros(len(idx), 1), torch.zeros(b, length, 1), history_index=idx)
    q, k = torch.zeros(len(idx), h, dh), torch.zeros(b * length, h, dh)
    attn.attention_backward(torch.zeros(len(idx), h * dh), q, k, k, torch.zeros(len(idx), h * dh),
                            torch.zeros(len(idx), h), seg, 0, 0.3)
    assert len(plans) == 1, "the dK/dV launch did not compute the split plan"
    plan = plans[0]
    assert plan.chunk == attention_split.target_chunk(len(idx), b) == 50
    assert plan.piece_offsets.tolist() == [0, 4, 5, 6, 6]  # 200 targets: 4 pieces of 50
    launched = {name: (grid, args) for name, grid, args in log}
    if length <= attn.SHORT_MAX_KEYS:
        grid, args = launched["_short_bwd_dkdv_kernel"]
        assert grid == (plan.n_pieces, h)
    else:
        grid, args = launched["_flash_bwd_dkdv_kernel"]
        assert grid == (plan.n_pieces * h, triton.cdiv(length, attn.blocks(200, length, dh)[1]))
    assert any(a is plan.piece_rows for a in args) and any(a is plan.ws_offsets for a in args)
    assert "_dkdv_reduce_kernel" in launched and plan.ws_rows >= 4 * length


def _zipf_segments(gen, b, n_targets, exponent, max_len):
    """Segment table of history_index ~ Zipf(exponent) over b rows (row r drawn with weight
    (r+1)^-exponent) and a jagged history of uniform lengths in [1, max_len]."""
    weights = torch.arange(1, b + 1, dtype=torch.float64) ** -exponent
    idx = torch.multinomial(weights / weights.sum(), n_targets, replacement=True, generator=gen)
    lengths = torch.randint(1, max_len + 1, (b,), generator=gen)
    h_off = cf.jagged.lengths_to_offsets(lengths)
    return attention_layout.segments(torch.zeros(n_targets, 1), torch.zeros(int(h_off[-1]), 1), history_index=idx,
                                     history_offsets=h_off, max_history_len=max_len)


@pytest.mark.parametrize("family,max_len,key_tile", [("cuda", 50, 1), ("flash", 50, 16), ("flash", 50, 64),
                                                     ("short", 16, 16)])
def test_work_model_balances_a_zipf_skewed_index(gen, family, max_len, key_tile):
    """B = 1000 rows, T = 10^5 targets, history_index ~ Zipf(1.1) (the top row draws ~18 % of the
    targets), history lengths uniform in [1, max_len]: with the plan the launcher computes
    (attn.split_plan), the longest dK/dV program walks at most 2x the mean program's targets x key
    slots. Without the split (a program per key or key tile walking its whole row) it is > 50x."""
    seg = _zipf_segments(gen, 1000, 100_000, 1.1, max_len)
    plan = attn.split_plan(seg, seg.target_offsets, seg.key_offsets, 100_000, seg.key_rows.numel())
    targets, slots, pairs = attention_split.dkdv_work(plan, seg.target_offsets, seg.key_offsets, seg.max_keys,
                                                      family, key_tile)
    work = (targets * slots).double()
    assert work.max() <= 2 * work.mean(), (work.max(), work.mean())
    assert int(pairs.sum()) == int(((seg.target_offsets.diff()) * seg.key_offsets.diff()).sum())  # every pair once
    # the un-split mapping: every program walks its whole row (n_r targets)
    n, keys = seg.target_offsets.diff(), seg.key_offsets.diff()
    per_unit = keys if family == "cuda" else (keys + key_tile - 1) // key_tile
    old = torch.repeat_interleave(n, per_unit).double()
    assert old.max() > 50 * old.mean()


def test_plan_bounds_hold_on_random_tables(gen):
    """The host-side bounds (grid, workspace) cover the device tables on random skewed tables, and
    pieces partition every row's targets into chunks of <= chunk."""
    for trial in range(30):
        b = int(torch.randint(1, 40, (), generator=gen))
        n = torch.randint(0, 3, (b,), generator=gen) * torch.randint(0, 300, (b,), generator=gen)
        keys = torch.randint(0, 30, (b,), generator=gen)
        t_off, k_off = cf.jagged.lengths_to_offsets(n), cf.jagged.lengths_to_offsets(keys)
        max_keys = int(keys.max())
        known = int(n.max()) if trial % 2 else -1
        plan = attention_split.split_plan(t_off, k_off, int(n.sum()), int(keys.sum()), max_keys, known)
        m = plan.piece_offsets.diff()
        assert int(plan.piece_offsets[-1]) <= plan.n_pieces
        assert plan.piece_rows[:int(plan.piece_offsets[-1])].tolist() == torch.repeat_interleave(
            torch.arange(b), m).tolist()
        assert (plan.piece_rows[int(plan.piece_offsets[-1]):] == b).all()
        assert int(plan.ws_offsets[-1]) <= plan.ws_rows
        assert ((m - 1) * plan.chunk < n).all() and (m * plan.chunk >= n).all()


def test_cuda_mirror_uses_the_same_policy():
    """csrc/attention_core.h mirrors target_chunk for the CUDA backend (it cannot import Python):
    the same constants, and the launcher reads them through dkdv_target_chunk."""
    with open(os.path.join(ROOT, "csrc", "attention_core.h")) as f:
        header = f.read()
    consts = dict(re.findall(r"constexpr int64_t (kDkdv\w+Chunk) = (\d+);", header))
    assert consts == {"kDkdvMinChunk": str(attention_split.DKDV_MIN_CHUNK),
                      "kDkdvMaxChunk": str(attention_split.DKDV_MAX_CHUNK)}
    with open(os.path.join(ROOT, "csrc", "cuda", "attention_core_cuda.cu")) as f:
        assert "dkdv_target_chunk(" in f.read()


def _cuda_dkdv_index_emulation(t_off, k_off, n_targets, n_keys, max_keys, max_targets):
    """The CUDA backend's dK/dV index arithmetic (csrc/cuda/attention_core_cuda.cu: dkdv_plan,
    attn_bwd_dkdv_kernel's warp -> (row, piece, key, targets, output row), the reduce kernel's
    reads), transliterated per warp with the host bounds of csrc/attention_core.h (mirrored by
    attention_split). Returns (writes: {(dest, row index): {(key, target)}}, reads: {key: [ws rows]})."""
    b = t_off.numel() - 1
    chunk = attention_split.target_chunk(n_targets, b)
    n = (t_off[1:] - t_off[:-1]).tolist()
    keys = (k_off[1:] - k_off[:-1]).clamp(max=max_keys).tolist()
    m = [(x + chunk - 1) // chunk for x in n]
    key_pieces = [0]
    ws_off = [0]
    for r in range(b):
        key_pieces.append(key_pieces[-1] + m[r] * keys[r])
        ws_off.append(ws_off[-1] + (m[r] * keys[r] if m[r] > 1 else 0))
    warps = (n_targets * max_keys + (chunk - 1) * n_keys) // chunk  # dkdv_key_pieces
    ws_rows = attention_split.workspace_rows(n_targets, n_keys, chunk, max_keys, max_targets)
    writes, reads = {}, {}
    for j in range(warps):
        if j >= key_pieces[b]:
            continue
        lo_r, hi_r = 0, b  # row_of
        while hi_r - lo_r > 1:
            mid = lo_r + (hi_r - lo_r) // 2
            lo_r, hi_r = (mid, hi_r) if key_pieces[mid] <= j else (lo_r, mid)
        row, local = lo_r, j - key_pieces[lo_r]
        c, slot = local // keys[row], local % keys[row]
        s = int(k_off[row]) + slot
        lo, hi = c * chunk, min(c * chunk + chunk, n[row])
        dest = ("dk", s) if m[row] == 1 else ("ws", ws_off[row] + local)
        assert dest not in writes and (dest[0] == "dk" or dest[1] < ws_rows)
        writes[dest] = {(s, p) for p in range(lo, hi)}
    for s in range(n_keys):  # the reduce kernel
        row = int(torch.searchsorted(k_off, torch.tensor(s), right=True)) - 1
        slot = s - int(k_off[row])
        if m[row] > 1 and slot < keys[row]:
            reads[s] = [ws_off[row] + c * keys[row] + slot for c in range(m[row])]
    return writes, reads


def test_cuda_dkdv_index_arithmetic_covers_every_pair_once(gen):
    """Emulated on CPU (the CUDA kernels cannot run here): every (key, target) pair of a row is
    summed by exactly one warp, each warp writes its own dK row or workspace row (within the host
    bound), and the reduce kernel reads exactly the workspace rows of its key's pieces."""
    split_rows = 0
    for trial in range(12):
        b = int(torch.randint(1, 8, (), generator=gen))
        n = torch.randint(0, 2, (b,), generator=gen) * torch.randint(0, 150, (b,), generator=gen)
        keys = torch.randint(0, 9, (b,), generator=gen)
        t_off, k_off = cf.jagged.lengths_to_offsets(n), cf.jagged.lengths_to_offsets(keys)
        n_t, n_s = int(n.sum()), int(keys.sum())
        writes, reads = _cuda_dkdv_index_emulation(t_off, k_off, n_t, n_s, int(keys.max()), -1)
        split_rows += len(reads)
        pairs = [pair for got in writes.values() for pair in got]
        want = {(int(k_off[r]) + s, p) for r in range(b) for s in range(int(keys[r])) for p in range(int(n[r]))}
        assert len(pairs) == len(set(pairs)) and set(pairs) == want
        for s, rows in reads.items():
            assert all(writes[("ws", w)] and {k for k, _ in writes[("ws", w)]} == {s} for w in rows)
            assert set().union(*(writes[("ws", w)] for w in rows)) == {(s, p) for p in range(int(n[int(
                torch.searchsorted(k_off, torch.tensor(s), right=True)) - 1]))}
    assert split_rows > 0  # some keys had several pieces
