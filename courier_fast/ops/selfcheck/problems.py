"""The problems the self-check runs each kernel backend on (courier_fast.ops.selfcheck.check).

Each op has a list of (name, spec) problems and a builder that turns one into a Case: the
inputs in float64 (exactly representable in the problem's dtype), `run(backend, dtype, leaves,
device)` -> [output, *gradients], the `probe` dispatch gives the backends' supports(), and
`yardstick(dtype)`: plain PyTorch computing the same problem in a 16-bit dtype (the error a user
accepts today, for the 16-bit bar of courier_fast.ops.selfcheck.tolerances).

The lists cover every code path a GPU verdict vouches for (tests/ops/test_selftest.py checks it
with the paths below): for the Triton loss each (kernel, constexpr branch, input dtype) a GPU
launches (row LSE with the whole feature block or a feature loop; gradients with one held block,
feature chunks or feature groups, with and without column terms; fp32, bf16, fp16 with its host
normalisation), and a learned scale (its gradient checked), bias, accidental-hit ids and logQ
in each dtype, on several tiles of the compiled op too;
for the attention core, per kernel family (short / flash) and input dtype, each tile class,
causal masks of each mode, several target and history tiles of the GPU's tile sizes, and the
jagged and history_index layouts. Odd shapes, masks (random, all-false,
empty history rows), float and bool weights, unnormalised logits, reduction "none" and, for the
compiled C++/CUDA loss, forced small row tiles (several tiles per problem) are spread over them.
"""
import contextlib
import dataclasses
import hashlib
import math
from typing import Callable

import torch
import torch.nn.functional as F

from courier_fast.ops.attention import reconstruction_attention
from courier_fast.ops.contrastive import contrastive_loss
from courier_fast.ops.reference import (NORM_EPS, contrastive_loss_reference,
                                        reconstruction_attention_reference)

FP32, BF16, FP16 = "float32", "bfloat16", "float16"

CONTRASTIVE = [
    ("fp32 n=7 d=100 random mask, float weights", dict(n=7, d=100, dtype=FP32, mask="random", weight="float")),
    ("fp32 n=2 d=3", dict(n=2, d=3, dtype=FP32, mask="none", weight="none")),
    ("fp32 n=257 d=64 bool weights", dict(n=257, d=64, dtype=FP32, mask="random", weight="bool")),
    ("fp32 n=150 d=40 symmetric, 7-row tiles", dict(n=150, d=40, dtype=FP32, mask="random", weight="float", symmetric=True, tile_rows=7)),
    ("fp32 n=33 d=10 all candidates masked", dict(n=33, d=10, dtype=FP32, mask="false", weight="float", symmetric=True)),
    ("fp32 n=40 d=12 unnormalised, tau=1, reduction none", dict(n=40, d=12, dtype=FP32, mask="random", weight="float", normalize=False, temperature=1.0, reduction="none")),
    ("fp32 n=90 d=48 scale, bias, ids, logq, symmetric, 7-row tiles", dict(n=90, d=48, dtype=FP32, mask="random", weight="float", symmetric=True, extras=True, tile_rows=7)),
    ("fp32 n=60 d=64 scale, bias, ids, logq", dict(n=60, d=64, dtype=FP32, mask="none", weight="bool", extras=True)),
    ("bf16 n=67 d=100 symmetric", dict(n=67, d=100, dtype=BF16, mask="random", weight="bool", symmetric=True)),
    ("bf16 n=130 d=64, 16-row tiles", dict(n=130, d=64, dtype=BF16, mask="none", weight="float", tile_rows=16)),
    ("bf16 n=70 d=200 (feature loop)", dict(n=70, d=200, dtype=BF16, mask="random", weight="float")),
    ("bf16 n=24 d=600 symmetric (feature chunks)", dict(n=24, d=600, dtype=BF16, mask="random", weight="float", symmetric=True)),
    ("bf16 n=21 d=520 (feature chunks)", dict(n=21, d=520, dtype=BF16, mask="none", weight="bool")),
    ("bf16 n=50 d=384 scale, bias, ids, logq, symmetric (3 chunks), 16-row tiles", dict(n=50, d=384, dtype=BF16, mask="random", weight="float", symmetric=True, extras=True, tile_rows=16)),
    ("bf16 n=20 d=1100 scale, bias, ids, logq (feature groups)", dict(n=20, d=1100, dtype=BF16, mask="random", weight="float", extras=True)),
    ("fp16 n=90 d=48 symmetric", dict(n=90, d=48, dtype=FP16, mask="random", weight="float", symmetric=True)),
    ("fp16 n=65 d=64 reduction sum", dict(n=65, d=64, dtype=FP16, mask="random", weight="bool", reduction="sum")),
    ("fp16 n=45 d=300 symmetric (feature loop, 3 chunks)", dict(n=45, d=300, dtype=FP16, mask="none", weight="float", symmetric=True)),
    ("fp16 n=22 d=700 (feature chunks)", dict(n=22, d=700, dtype=FP16, mask="random", weight="float")),
    ("fp16 n=20 d=576 symmetric (feature chunks)", dict(n=20, d=576, dtype=FP16, mask="random", weight="bool", symmetric=True)),
    ("fp16 n=30 d=768 scale, bias, ids, logq, symmetric (6 chunks)", dict(n=30, d=768, dtype=FP16, mask="random", weight="bool", symmetric=True, extras=True)),
    ("fp16 n=12 d=1030 symmetric (feature groups)", dict(n=12, d=1030, dtype=FP16, mask="none", weight="float", symmetric=True)),
]

ATTENTION = [
    ("fp32 B=3 P=5 L=7 d=12 h=3, an empty history row", dict(b=3, p=5, length=7, d=12, h=3, dtype=FP32, pad="random")),
    ("fp32 causal B=2 L=9 d=8 h=2", dict(b=2, p=9, length=9, d=8, h=2, dtype=FP32, pad="random", causal=True)),
    ("fp32 all history padded", dict(b=2, p=3, length=4, d=8, h=2, dtype=FP32, pad="all")),
    ("fp32 B=2 P=20 L=70 d=32 h=1 (several tiles)", dict(b=2, p=20, length=70, d=32, h=1, dtype=FP32, pad="random")),
    ("fp32 B=2 P=5 L=20 d=128 h=2 (dh=64)", dict(b=2, p=5, length=20, d=128, h=2, dtype=FP32, pad="random")),
    ("fp32 causal B=2 L=20 d=32 h=2 (dh=16, long rows)", dict(b=2, p=20, length=20, d=32, h=2, dtype=FP32, pad="random", causal=True)),
    ("fp32 B=3 P=10 L=5 d=256 h=4 (COURIER's shape)", dict(b=3, p=10, length=5, d=256, h=4, dtype=FP32, pad="random")),
    ("fp32 history_index B=4 L=5 d=48 h=2", dict(b=4, p=7, length=5, d=48, h=2, dtype=FP32, layout="history_index", counts=[3, 0, 7, 2])),
    ("fp32 history_index B=3 L=30 d=32 h=2", dict(b=3, p=6, length=30, d=32, h=2, dtype=FP32, layout="history_index", counts=[6, 1, 0])),
    ("fp32 jagged inclusive causal, short rows", dict(b=4, p=9, length=9, d=24, h=2, dtype=FP32, layout="jagged", lengths=[5, 0, 9, 1], causal="inclusive")),
    ("fp32 jagged inclusive causal, long rows", dict(b=3, p=40, length=40, d=16, h=1, dtype=FP32, layout="jagged", lengths=[40, 17, 0], causal="inclusive")),
    ("bf16 B=3 P=5 L=33 d=64 h=4", dict(b=3, p=5, length=33, d=64, h=4, dtype=BF16, pad="random")),
    ("bf16 causal B=2 L=6 d=24 h=2", dict(b=2, p=6, length=6, d=24, h=2, dtype=BF16, pad="random", causal=True)),
    ("bf16 B=2 P=40 L=150 d=64 h=2 (dh=32, several tiles)", dict(b=2, p=40, length=150, d=64, h=2, dtype=BF16, pad="random")),
    ("bf16 B=2 P=7 L=40 d=256 h=4 (dh=64)", dict(b=2, p=7, length=40, d=256, h=4, dtype=BF16, pad="random")),
    ("bf16 causal B=1 L=40 d=128 h=1 (dh=128)", dict(b=1, p=40, length=40, d=128, h=1, dtype=BF16, pad="random", causal=True)),
    ("bf16 B=2 P=3 L=40 d=256 h=1 (dh=256)", dict(b=2, p=3, length=40, d=256, h=1, dtype=BF16, pad="random")),
    ("bf16 B=4 P=10 L=5 d=256 h=4 (COURIER's shape)", dict(b=4, p=10, length=5, d=256, h=4, dtype=BF16, pad="random")),
    ("bf16 history_index B=4 L=5 d=64 h=2", dict(b=4, p=9, length=5, d=64, h=2, dtype=BF16, layout="history_index", counts=[2, 9, 0, 4])),
    ("bf16 history_index B=2 L=24 d=64 h=1", dict(b=2, p=5, length=24, d=64, h=1, dtype=BF16, layout="history_index", counts=[5, 3])),
    ("bf16 jagged inclusive causal, short rows", dict(b=3, p=12, length=12, d=64, h=2, dtype=BF16, layout="jagged", lengths=[12, 3, 0], causal="inclusive")),
    ("bf16 jagged inclusive causal, long rows", dict(b=3, p=30, length=30, d=64, h=2, dtype=BF16, layout="jagged", lengths=[30, 0, 21], causal="inclusive")),
    ("fp16 B=3 P=5 L=9 d=32 h=2 (dh=16)", dict(b=3, p=5, length=9, d=32, h=2, dtype=FP16, pad="random")),
    ("fp16 causal B=2 L=70 d=64 h=2 (dh=32, several tiles)", dict(b=2, p=70, length=70, d=64, h=2, dtype=FP16, pad="random", causal=True)),
    ("fp16 B=2 P=6 L=20 d=128 h=2 (dh=64)", dict(b=2, p=6, length=20, d=128, h=2, dtype=FP16, pad="random")),
    ("fp16 B=2 P=35 L=40 d=128 h=1 (dh=128, several tiles)", dict(b=2, p=35, length=40, d=128, h=1, dtype=FP16, pad="random")),
    ("fp16 B=1 P=4 L=20 d=256 h=1 (dh=256)", dict(b=1, p=4, length=20, d=256, h=1, dtype=FP16, pad="random")),
    ("fp16 causal B=2 L=12 d=128 h=2 (dh=64, short rows)", dict(b=2, p=12, length=12, d=128, h=2, dtype=FP16, pad="random", causal=True)),
    ("fp16 history_index B=3 L=3 d=32 h=1", dict(b=3, p=4, length=3, d=32, h=1, dtype=FP16, layout="history_index", counts=[4, 4, 1])),
    ("fp16 history_index B=2 L=18 d=64 h=2", dict(b=2, p=8, length=18, d=64, h=2, dtype=FP16, layout="history_index", counts=[0, 8])),
    ("fp16 jagged inclusive causal, short rows", dict(b=3, p=7, length=7, d=32, h=2, dtype=FP16, layout="jagged", lengths=[7, 0, 2], causal="inclusive")),
    ("fp16 jagged, long rows", dict(b=4, p=11, length=33, d=64, h=2, dtype=FP16, layout="jagged", lengths=[33, 0, 5, 18], counts=[3, 2, 0, 11])),
    ("fp16 jagged inclusive causal, long rows", dict(b=2, p=25, length=25, d=32, h=2, dtype=FP16, layout="jagged", lengths=[25, 19], causal="inclusive")),
]


@dataclasses.dataclass
class Case:
    """One problem made concrete (see the module docstring)."""
    inputs: list  # float64 CPU tensors, exactly representable in `dtype`
    dtype: torch.dtype
    run: Callable  # run(backend, dtype, leaves, device) -> [output, *gradients of the leaves]
    probe: Callable  # probe(leaves) -> keyword arguments of the backends' supports()
    yardstick: Callable  # yardstick(dtype) -> [output, *gradients], plain PyTorch in that dtype


def generator(name):
    """A torch.Generator seeded from the problem's name: the same inputs on every machine."""
    return torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))


def _representable(tensors, dtype):
    """float64 copies rounded to dtype, so that the float64 reference sees what the backend sees."""
    return [t if dtype == torch.float32 else t.to(dtype).double() for t in tensors]


def _tiles(rows):
    """Context forcing the compiled loss op (cpu / cuda backends) onto `rows`-row logits tiles,
    so that small problems check its column updates and gradient sums across tiles."""
    from courier_fast import _extension
    from courier_fast.ops.backends import compiled as _ops

    if rows is None or not _extension.loaded():
        return contextlib.nullcontext()
    return _ops.forced_lse_tile_rows(rows)


def contrastive_case(name, spec):

    g = generator(name)
    n, d, dtype = spec["n"], spec["d"], getattr(torch, spec["dtype"])
    a, c = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    mask = {"none": None, "random": torch.rand(n, generator=g) < 0.7,
            "false": torch.zeros(n, dtype=torch.bool)}[spec["mask"]]
    if mask is not None and spec["mask"] == "random":
        mask[0] = True
    weight = {"none": None, "bool": torch.rand(n, generator=g) < 0.5,
              "float": torch.rand(n, generator=g, dtype=torch.float64)}[spec["weight"]]
    if weight is not None and weight.dtype == torch.bool:
        weight[0] = True  # at least one active anchor unless every candidate is masked
    a, c = _representable([a, c], dtype)
    if weight is not None and weight.is_floating_point():
        (weight,) = _representable([weight], dtype)
    kw = dict(normalize=spec.get("normalize", True), symmetric=spec.get("symmetric", False),
              reduction=spec.get("reduction", "mean"))
    inputs, extra = [a, c], {}
    if spec.get("extras"):  # a learned scale (a third leaf), a bias, ids repeating ~3 times, logq
        inputs.append(torch.tensor(12.0, dtype=torch.float64))
        (logq,) = _representable([0.5 * torch.randn(n, generator=g, dtype=torch.float64)], dtype)
        extra = dict(logit_bias=-2.0, candidate_ids=torch.randint(0, max(1, n // 3), (n,), generator=g),
                     candidate_logq=logq)
    else:
        kw["temperature"] = spec.get("temperature", 0.05)
    upstream = torch.randn(n, generator=g, dtype=torch.float64) if kw["reduction"] == "none" else None

    def options(leaves, dtype, dev):
        """contrastive_loss's keyword arguments besides the embeddings, on dev."""
        w = weight if weight is None or weight.dtype == torch.bool else weight.to(dtype)
        out = dict(kw, anchor_weight=None if w is None else w.to(dev),
                   candidate_mask=None if mask is None else mask.to(dev))
        if extra:
            out.update(logit_scale=leaves[2], logit_bias=extra["logit_bias"],
                       candidate_ids=extra["candidate_ids"].to(dev),
                       candidate_logq=extra["candidate_logq"].to(dev, dtype))
        return out

    def run(backend, dtype, leaves, dev):
        with _tiles(spec.get("tile_rows")):
            loss = contrastive_loss(*leaves[:2], backend=backend, **options(leaves, dtype, dev))
            up = torch.ones((), dtype=loss.dtype, device=dev) if upstream is None else upstream.to(dev, loss.dtype)
            return [loss] + list(torch.autograd.grad(loss, leaves, up))

    def yardstick(low):
        """F.normalize in float64, rows rounded to the 16-bit dtype (what a 16-bit F.normalize
        then a dense matmul sees), differentiated through the rounding; the gradients are
        returned in the 16-bit dtype, as a user receives them."""
        leaves = [t.clone().requires_grad_() for t in inputs]
        unit = [(F.normalize(t, dim=-1, eps=NORM_EPS) if kw["normalize"] else t) for t in leaves[:2]]
        unit = [u + (u.to(low).double() - u).detach() for u in unit]  # round, keep the gradient
        opts = options(leaves, torch.float64, "cpu")
        loss = contrastive_loss_reference(*unit, **{**opts, "normalize": False})
        up = torch.ones((), dtype=loss.dtype) if upstream is None else upstream
        return [loss] + [grad.to(low).double() for grad in torch.autograd.grad(loss, leaves, up)]

    probe = lambda leaves: {"anchors": leaves[0], "candidates": leaves[1]}
    return Case(inputs, dtype, run, probe, yardstick)


def _attention_layout(g, spec, d):
    """(targets, history, key_padding_mask, layout keyword arguments, and the targets' shape) of
    an attention problem: padded (b, p, length), "jagged" (history rows of `lengths` items,
    `counts` targets per row, or the history itself when causal) or "history_index" (padded
    history, `counts` targets per row in a shuffled order)."""
    layout, b = spec.get("layout", "padded"), spec["b"]
    if layout == "padded":
        p, length = spec["p"], spec["length"]
        t = torch.randn(b, p, d, generator=g, dtype=torch.float64)
        hist = torch.randn(b, length, d, generator=g, dtype=torch.float64)
        pad = torch.rand(b, length, generator=g) < 0.3 if spec["pad"] == "random" else torch.ones(b, length, dtype=torch.bool)
        if spec["pad"] == "random" and b > 1:
            pad[0] = True  # an empty history row
        return t, hist, pad, {}
    if layout == "history_index":
        counts = torch.tensor(spec["counts"])
        hist = torch.randn(b, spec["length"], d, generator=g, dtype=torch.float64)
        pad = torch.rand(b, spec["length"], generator=g) < 0.3
        rows = torch.repeat_interleave(torch.arange(b), counts)
        index = rows[torch.randperm(rows.numel(), generator=g)]
        return torch.randn(rows.numel(), d, generator=g, dtype=torch.float64), hist, pad, {"history_index": index}
    lengths = torch.tensor(spec["lengths"])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    hist = torch.randn(int(offsets[-1]), d, generator=g, dtype=torch.float64)
    pad = torch.rand(hist.shape[0], generator=g) < 0.3
    counts = None if spec.get("causal") else torch.tensor(spec["counts"])
    t_offsets = offsets if counts is None else torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    t = torch.randn(int(t_offsets[-1]), d, generator=g, dtype=torch.float64)
    return t, hist, pad, {"history_offsets": offsets, "target_offsets": t_offsets}


def attention_case(name, spec):

    g = generator(name)
    d, h = spec["d"], spec["h"]
    dtype = getattr(torch, spec["dtype"])
    t, hist, pad, layout = _attention_layout(g, spec, d)
    w_in = torch.randn(3 * d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b_in = torch.randn(3 * d, generator=g, dtype=torch.float64)
    w_out = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    b_out = torch.randn(d, generator=g, dtype=torch.float64)
    causal = spec.get("causal", False)
    upstream = torch.randn(*t.shape, generator=g, dtype=torch.float64)
    inputs = _representable([t, hist, w_in, b_in, w_out, b_out], dtype)

    def call(fn, leaves, dev):
        out = fn(*leaves, h, key_padding_mask=pad.to(dev), causal=causal, **{k: x.to(dev) for k, x in layout.items()})
        return [out] + list(torch.autograd.grad(out, leaves, upstream.to(dev, out.dtype)))

    def run(backend, dtype, leaves, dev):
        return call(lambda *a, **k: reconstruction_attention(*a, **k, backend=backend), leaves, dev)

    def yardstick(low):  # the reference computes in its inputs' dtype: genuinely 16-bit
        leaves = [x.to(low).requires_grad_() for x in inputs]
        return [o.double() for o in call(reconstruction_attention_reference, leaves, "cpu")]

    probe = lambda leaves: {"targets": leaves[0], "num_heads": h}
    return Case(inputs, dtype, run, probe, yardstick)


PROBLEMS = {"contrastive_loss": (CONTRASTIVE, contrastive_case),
            "reconstruction_attention": (ATTENTION, attention_case)}


# ----------------------------------------------------------------------------- coverage
def contrastive_paths(d, dtype, symmetric):
    """The Triton loss code paths a GPU runs for feature dim d, input dtype name and symmetric:
    the row LSE with the whole feature block or a feature loop; the gradients with one held
    block, with feature chunks (the accumulator kept whole) or in feature groups (grid axis 1),
    with and without column terms."""
    from courier_fast.kernels import contrastive_lse as lse

    one_k = lse.forward_constexprs(d)["ONE_K"]
    grad = lse.grad_constexprs(d)
    layout = "one block" if grad["ONE_K"] else "feature chunks" if lse.feature_groups(d) == 1 else "feature groups"
    return {("row_lse", "ONE_K" if one_k else "feature loop", dtype),
            ("gradients", layout, "columns" if symmetric else "rows only", dtype)}


ATTENTION_LAYOUTS = ("padded", "history_index", "jagged")
ATTENTION_CAUSAL = (False, True, "inclusive")


def attention_paths(p, length, dh, dtype, causal, layout="padded"):
    """The Triton attention code paths a GPU runs for at most p targets and length history items
    per row, head dim dh, dtype, causal mode and layout (empty for a call the op rejects): per
    kernel family (short: length <= SHORT_MAX_KEYS, packed FMA kernels; flash: MMA tiles) its
    tile class per dtype (short: the head-dim chunk, and whether dh takes several; flash: the
    head-dim tile, several target / history tiles), causal by mode, and the jagged and
    history_index layouts."""
    from courier_fast.kernels import reconstruction_attention as attn

    mode = {False: None, True: "strict", "strict": "strict", "inclusive": "inclusive"}[causal]
    if mode and layout == "history_index":
        return set()
    if attn.short_history(length):
        family = "short"
        block_d = attn.short_blocks(length, dh)[2]
        paths = {("short head-dim chunk", block_d, dtype)}
        if dh > block_d:
            paths.add(("short: several head-dim chunks", dtype))
    else:
        family = "flash"
        block_p, block_l, block_dh = attn.blocks(p, length, dh, fp32=dtype == FP32, gpu=True)
        paths = {("head dim tile", block_dh, dtype)}
        if p > block_p:
            paths.add(("several target tiles", dtype))
        if length > block_l:
            paths.add(("several history tiles", dtype))
    if mode:
        paths.add(("causal", mode, family, dtype))
    if layout != "padded":
        paths.add((layout, family, dtype))
    return paths
