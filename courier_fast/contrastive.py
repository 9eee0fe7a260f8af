"""courier_fast.contrastive_loss: the public op, its validation and its backends.

Every backend computes the same per-anchor terms (reference: dense PyTorch; cpu / cuda: the
chunked LSE op of courier_fast._C; triton: the kernels in kernels/; chunked: ATen row tiles,
courier_fast.chunked); weighting, reduction and
the cross-process gather are shared and live here and in courier_fast.reference /
courier_fast.distributed.
"""
import importlib.util

import torch
import torch.distributed as dist

from courier_fast import _extension, _ops, _validate, chunked, dispatch
from courier_fast.distributed import GatheredBatch, ring_lse, world_size
from courier_fast.reference import (contrastive_terms_reference, effective_weight,
                                    positive_logits, reduce_terms)

OP = "contrastive_loss"


def contrastive_loss(anchors, candidates, *, temperature=0.05, anchor_weight=None,
                     candidate_mask=None, normalize=True, symmetric=False, reduction="mean",
                     group=None, backend="auto", ring=False, capacity=None):
    """In-batch InfoNCE over every candidate of the (global) batch (docs/design.md §3.1).

    Args:
        anchors: (N, d) float16/bfloat16/float32/float64, e.g. reconstructions r_j.
        candidates: (N, d), same dtype and device; row j is anchor j's positive.
        temperature: > 0; logits are <r_j, e_i> / temperature (cosines when normalize).
        anchor_weight: None, (N,) bool or (N,) float >= 0 (e.g. click labels). An anchor
            whose own candidate is masked out has weight 0. Not differentiated.
        candidate_mask: None or (N,) bool; False removes item i from every denominator.
        normalize: L2-normalise anchors and candidates first (eps 1e-12).
        symmetric: also use candidates as anchors over the anchors (CLIP), and average.
        reduction: "mean" (sum_j w_j loss_j / sum_j w_j, exactly 0 when sum w = 0), "sum",
            or "none" ((N,) w_j * loss_j).
        group: a torch.distributed process group: candidates (and anchors when symmetric) are
            gathered from all ranks with gradient; ranks may hold different N. The ranks'
            mean loss and DDP-averaged gradients equal one process on the whole batch.
        backend: "auto", "reference", "cpu", "triton", "cuda" or "chunked" (see
            courier_fast.backends()). auto: on CUDA the self-checked cuda, then triton, then
            chunked; on CPU cpu, then chunked; the dense reference only for small N.
        ring: with a group, pass candidate blocks around a ring of point-to-point exchanges
            instead of all-gathering them (Inf-CL style): a rank never holds more than two
            ranks' candidates. Needs a kernel backend (cpu, cuda, triton or chunked).
        capacity: with a group, an int >= every rank's N, the same on every rank (e.g. rows x
            slots of a fixed batch geometry). Every rank's rows are gathered padded to it and
            the padding is masked out, so the call reads nothing back from the device. None:
            the ranks' largest N is exchanged and read back to the host, one device-to-host
            read per call. Checked against N without a group too.

    Returns a scalar (or (N,) for "none"): float32, or float64 for float64 inputs.
    The N x N logits are never materialised except by the reference backend.
    """
    _check_args(anchors, candidates, temperature, anchor_weight, candidate_mask, normalize,
                symmetric, reduction, group, backend, ring, capacity)
    scale = 1.0 / float(temperature)
    n = anchors.shape[0]
    weight = effective_weight(anchor_weight, candidate_mask, n, anchors)
    terms_fn = dispatch.select(OP, backend, anchors.device,
                               probe={"anchors": anchors, "candidates": candidates})

    world = world_size(group)
    if world == 1:
        terms = terms_fn(anchors, candidates, candidates, anchors, candidate_mask, scale,
                         normalize, symmetric, single_process=True)
        return reduce_terms(terms, weight, reduction)

    if ring and getattr(terms_fn, "lse_ops", None) is None:
        raise ValueError("ring=True needs a kernel backend (cpu, cuda, triton or chunked), not the dense reference")
    # every rank's rows padded to one capacity; padded rows are masked candidates (distributed.py)
    batch = GatheredBatch(n, group, anchors.device, capacity, candidate_mask)
    if ring:
        terms = _ring_terms(terms_fn.lse_ops, anchors, candidates, scale, normalize, symmetric, batch)
        return reduce_terms(terms, weight, reduction, batch.total(weight.sum()), world)
    all_candidates = batch.with_grad(candidates)
    all_anchors = batch.with_grad(anchors) if symmetric else None
    terms = terms_fn(anchors, candidates, all_candidates, all_anchors, batch.keep(), scale, normalize,
                     symmetric, single_process=False)
    return reduce_terms(terms, weight, reduction, batch.total(weight.sum()), world)


def _ring_terms(lse_ops, anchors, candidates, scale, normalize, symmetric, batch):
    positive = positive_logits(anchors, candidates, scale, normalize)
    terms = ring_lse(anchors, candidates, scale, normalize, batch, lse_ops) - positive
    if symmetric:
        reverse = ring_lse(candidates, anchors, scale, normalize, batch, lse_ops) - positive
        terms = 0.5 * (terms + reverse)
    return terms


def _check_args(anchors, candidates, temperature, anchor_weight, candidate_mask, normalize,
                symmetric, reduction, group, backend, ring, capacity):
    v = _validate
    v.tensor("anchors", anchors, ndim=2)
    v.tensor("candidates", candidates, ndim=2)
    if anchors.shape[1] == 0:
        raise ValueError(f"anchors has feature dimension 0 (shape {tuple(anchors.shape)})")
    v.same_device("candidates", candidates, "anchors", anchors)
    v.same_dtype("candidates", candidates, "anchors", anchors)
    v.shape("candidates", candidates, anchors.shape, "row j is anchor j's positive")
    v.positive_number("temperature", temperature)
    v.anchor_weight(anchor_weight, anchors.shape[0], "anchors", anchors)
    v.optional_mask("candidate_mask", candidate_mask, (anchors.shape[0],), "one flag per candidate",
                    "anchors", anchors)
    for name, flag in (("normalize", normalize), ("symmetric", symmetric), ("ring", ring)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    v.choice("reduction", reduction, ("mean", "sum", "none"))
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if group is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialized")
    if capacity is not None and v.positive_int("capacity", capacity) < anchors.shape[0]:
        raise ValueError(f"capacity must be >= the rows of anchors on every rank; got {capacity} with "
                         f"{anchors.shape[0]} rows here")
    v.finite("anchors", anchors)
    v.finite("candidates", candidates)


def _terms_from_lse(lse, lse_backward):
    """Per-anchor terms from a backend's masked-LSE op (same contract as the reference).
    lse_backward is the op's backward, used directly by the ring exchange."""

    def terms(anchors, candidates, all_candidates, all_anchors, all_mask, scale, normalize,
              symmetric, *, single_process):
        positive = positive_logits(anchors, candidates, scale, normalize)
        if symmetric and single_process:  # one pass gives both directions: rows and columns
            row, col = lse(anchors, candidates, all_mask, all_mask, scale, normalize, True)
            return 0.5 * (row + col) - positive
        row, _ = lse(anchors, all_candidates, None, all_mask, scale, normalize, False)
        if not symmetric:
            return row - positive
        rev, _ = lse(candidates, all_anchors, None, all_mask, scale, normalize, False)
        return 0.5 * (row + rev) - positive

    terms.lse_ops = (lse, lse_backward)
    return terms


def _reference_terms(*args, single_process):  # the dense reference needs no fused path
    return contrastive_terms_reference(*args)


REFERENCE_AUTO_MAX = 4096  # auto never picks the dense reference for more anchors x candidates


def _small(anchors, candidates, **_):
    return anchors.shape[0] * candidates.shape[0] <= REFERENCE_AUTO_MAX ** 2


dispatch.register(OP, "reference", _reference_terms, devices=("cpu", "cuda"), validate=False,
                  supports=_small, note="dense N x N logits; auto only up to N = "
                                        f"{REFERENCE_AUTO_MAX} (the ground truth of the tests)")
dispatch.register(OP, "chunked", _terms_from_lse(chunked.contrastive_lse, chunked.lse_backward),
                  devices=("cpu", "cuda"), validate=False,
                  note="ATen row tiles + recomputing autograd; O(N d + tile) memory on any device")
if _extension.loaded():
    _compiled = _terms_from_lse(_ops.contrastive_lse, torch.ops.courier_fast.contrastive_lse_backward)
    dispatch.register(OP, "cpu", _compiled, devices=("cpu",), validate=False,
                      note="C++ chunked online-LSE op (ATen GEMMs on row tiles)")
    if _extension.cuda_compiled():
        dispatch.register(OP, "cuda", _compiled, devices=("cuda",),
                          note="cuBLAS row tiles + fused CUDA epilogues")
if importlib.util.find_spec("triton") is not None:
    from courier_fast import _triton_ops

    dispatch.register(OP, "triton", _terms_from_lse(_triton_ops.contrastive_lse,
                                                    _triton_ops.contrastive_lse_backward),
                      devices=("cuda", "cpu") if _triton_ops.INTERPRET else ("cuda",),
                      supports=_triton_ops.contrastive_supports,
                      note="fused Triton kernels (normalise, mask, online LSE, atomics-free "
                           "backward, 16-bit MMA for 16-bit inputs)")
