"""courier_fast.contrastive_loss: the public op, its validation and its backends.

Every backend computes the same per-anchor terms (reference: dense PyTorch; cpu / cuda: the
chunked LSE op of courier_fast._C; triton: the kernels in kernels/; chunked: ATen row tiles,
courier_fast.ops.backends.chunked); weighting, reduction and
the cross-process gather are shared and live here and in courier_fast.ops.reference /
courier_fast.ops.distributed.
"""
import importlib.util
import math
import numbers

import torch
import torch.distributed as dist

from courier_fast import _extension, _validate
from courier_fast.ops.backends import compiled as _ops
from courier_fast.ops.backends import chunked
from courier_fast.ops import dispatch
from courier_fast.ops.distributed import GatheredBatch, ring_lse, world_size
from courier_fast.ops.reference import (CandidateInfo, compute_dtype, contrastive_terms_reference,
                                    effective_weight, positive_logits, reduce_terms)

OP = "contrastive_loss"
DEFAULT_TEMPERATURE = 0.05


def contrastive_loss(anchors, candidates, *, temperature=None, logit_scale=None, logit_bias=None,
                     anchor_weight=None, candidate_mask=None, candidate_ids=None, candidate_logq=None,
                     normalize=True, symmetric=False, reduction="mean", group=None, backend="auto",
                     ring=False, capacity=None):
    """In-batch InfoNCE over every candidate of the (global) batch (docs/design.md §3.1).

    With r_j the (normalised) anchors, e_i the candidates, s the scale and b the bias, the logit
    of anchor j for candidate i and anchor j's term are

        z_ji   = s <r_j, e_i> + b - logq_i
        loss_j = log sum_{i in C_j} exp(z_ji) - z_jj,

    C_j: every candidate i with candidate_mask_i, except accidental hits (ids[i] == ids[j],
    i != j). b cancels (the loss and its value do not depend on it; its gradient is exactly 0).

    Args:
        anchors: (N, d) float16/bfloat16/float32/float64, e.g. reconstructions r_j.
        candidates: (N, d), same dtype and device; row j is anchor j's positive.
        temperature: float > 0, s = 1 / temperature. Default 0.05 (when logit_scale is None too).
        logit_scale: instead of temperature, a 1-element float tensor on the anchors' device: s
            itself (open_clip's logit_scale, already exp()'d), differentiated exactly. It stays
            on the device: no call reads it back.
        logit_bias: None, a real number or a 1-element float tensor b added to every logit
            (open_clip's logit_bias); its gradient is exactly 0.
        anchor_weight: None, (N,) bool or (N,) float >= 0 (e.g. click labels). An anchor
            whose own candidate is masked out has weight 0. Not differentiated.
        candidate_mask: None or (N,) bool; False removes item i from every denominator.
        candidate_ids: None or (N,) int64/int32 ids (e.g. item ids): a candidate with anchor j's
            positive's id, other than that positive, leaves anchor j's denominator (and, with
            symmetric, the same pair leaves the reverse direction's). Across ranks too.
        candidate_logq: None or (N,) float: log of each candidate's sampling probability,
            subtracted from every logit candidate i appears in (the positive logit of anchor i
            included): the sampled-softmax (logQ) correction. Not differentiated. With
            symmetric the reverse direction's logits are the transposed matrix, where logq_j is
            constant along anchor j's row and cancels: logQ changes the anchor -> candidate
            direction only.
        normalize: L2-normalise anchors and candidates first (eps 1e-12).
        symmetric: also use candidates as anchors over the anchors (CLIP), and average.
        reduction: "mean" (sum_j w_j loss_j / sum_j w_j, exactly 0 when sum w = 0), "sum",
            or "none" ((N,) w_j * loss_j).
        group: a torch.distributed process group: candidates (and anchors when symmetric, ids
            and logq) are gathered from all ranks, the embeddings with gradient; ranks may hold
            different N. The ranks' mean loss and DDP-averaged gradients equal one process on
            the whole batch; a logit_scale's gradient is this rank's share (DDP's average of the
            ranks' gradients is the whole batch's).
        backend: "auto", "reference", "cpu", "triton", "cuda" or "chunked" (see
            courier_fast.backends()). auto: on CUDA the self-checked cuda, then triton, then
            chunked; on CPU cpu, then chunked; the dense reference only for small N.
        ring: with a group, pass candidate blocks (with their ids and logq) around a ring of
            point-to-point exchanges instead of all-gathering them (Inf-CL style): a rank never
            holds more than two ranks' candidates. Needs a kernel backend.
        capacity: with a group, an int >= every rank's N, the same on every rank (e.g. rows x
            slots of a fixed batch geometry). Every rank's rows are gathered padded to it and
            the padding is masked out, so the call reads nothing back from the device. None:
            the ranks' largest N is exchanged and read back to the host, one device-to-host
            read per call. Checked against N without a group too.

    Returns a scalar (or (N,) for "none"): float32, or float64 for float64 inputs.
    The N x N logits are never materialised except by the reference backend.
    """
    _check_args(anchors, candidates, temperature, logit_scale, logit_bias, anchor_weight, candidate_mask,
                candidate_ids, candidate_logq, normalize, symmetric, reduction, group, backend, ring, capacity)
    scale = _scale(temperature, logit_scale, anchors)
    bias = logit_bias.reshape(()) if isinstance(logit_bias, torch.Tensor) else logit_bias
    ids = None if candidate_ids is None else candidate_ids.to(torch.int64)
    logq = None if candidate_logq is None else candidate_logq.detach().to(compute_dtype(anchors.dtype))
    n = anchors.shape[0]
    weight = effective_weight(anchor_weight, candidate_mask, n, anchors)
    terms_fn = dispatch.select(OP, backend, anchors.device,
                               probe={"anchors": anchors, "candidates": candidates})

    world = world_size(group)
    if world == 1:
        info = CandidateInfo(ids, ids, 0, logq, logq)
        # with a mean or sum, the terms' upstream gradient is proportional to the weights
        terms = terms_fn(anchors, candidates, candidates, anchors, candidate_mask, scale, normalize,
                         symmetric, info, bias, single_process=True,
                         row_weight=None if reduction == "none" else weight)
        return reduce_terms(terms, weight, reduction)

    if ring and getattr(terms_fn, "lse_ops", None) is None:
        raise ValueError("ring=True needs a kernel backend (cpu, cuda, triton or chunked), not the dense reference")
    # every rank's rows padded to one capacity; padded rows are masked candidates (distributed.py)
    batch = GatheredBatch(n, group, anchors.device, capacity, candidate_mask)
    if ring:
        terms = _ring_terms(terms_fn.lse_ops, anchors, candidates, scale, normalize, symmetric, batch,
                            ids, logq, bias)
        return reduce_terms(terms, weight, reduction, batch.total(weight.sum()), world)
    info = CandidateInfo(ids, None if ids is None else batch.gather(ids), batch.offset,
                         logq, None if logq is None else batch.gather(logq))
    all_candidates = batch.with_grad(candidates)
    all_anchors = batch.with_grad(anchors) if symmetric else None
    terms = terms_fn(anchors, candidates, all_candidates, all_anchors, batch.keep(), scale, normalize,
                     symmetric, info, bias, single_process=False)
    return reduce_terms(terms, weight, reduction, batch.total(weight.sum()), world)


def _scale(temperature, logit_scale, anchors):
    """s as a 0-d tensor of the compute dtype on the anchors' device: logit_scale (keeping its
    gradient), or 1 / temperature (a device fill, no copy or read)."""
    dt = compute_dtype(anchors.dtype)
    if logit_scale is not None:
        return logit_scale.reshape(()).to(dt)
    value = 1.0 / (DEFAULT_TEMPERATURE if temperature is None else float(temperature))
    return torch.full((), value, dtype=dt, device=anchors.device)


def _term(lse, positive, bias):
    """lse_j - z_jj with b added to both (lse(z + b) = lse(z) + b): the value does not depend on
    b and autograd gives b the gradient g - g = 0 exactly (both sums in the positive's dtype)."""
    lse = lse.to(positive.dtype)
    return lse - positive if bias is None else (lse + bias) - (positive + bias)


def _ring_terms(lse_ops, anchors, candidates, scale, normalize, symmetric, batch, ids, logq, bias):
    positive = positive_logits(anchors, candidates, scale, normalize)
    forward = ring_lse(anchors, candidates, scale, normalize, batch, lse_ops, ids, logq)
    terms = _term(forward, positive if logq is None else positive - logq, bias)
    if symmetric:
        reverse = ring_lse(candidates, anchors, scale, normalize, batch, lse_ops, ids, None)
        terms = 0.5 * (terms + _term(reverse, positive, bias))
    return terms


def _check_args(anchors, candidates, temperature, logit_scale, logit_bias, anchor_weight, candidate_mask,
                candidate_ids, candidate_logq, normalize, symmetric, reduction, group, backend, ring, capacity):
    v = _validate
    v.tensor("anchors", anchors, ndim=2)
    v.tensor("candidates", candidates, ndim=2)
    if anchors.shape[1] == 0:
        raise ValueError(f"anchors has feature dimension 0 (shape {tuple(anchors.shape)})")
    v.same_device("candidates", candidates, "anchors", anchors)
    v.same_dtype("candidates", candidates, "anchors", anchors)
    v.shape("candidates", candidates, anchors.shape, "row j is anchor j's positive")
    n = anchors.shape[0]
    if temperature is not None and logit_scale is not None:
        raise ValueError("give temperature or logit_scale, not both (s = 1 / temperature, or s = logit_scale)")
    if temperature is not None:
        v.positive_number("temperature", temperature)
    if logit_scale is not None:
        _scalar_tensor("logit_scale", logit_scale, anchors)
    if isinstance(logit_bias, torch.Tensor):
        _scalar_tensor("logit_bias", logit_bias, anchors)
    elif logit_bias is not None:
        if isinstance(logit_bias, bool) or not isinstance(logit_bias, numbers.Real):
            raise TypeError(f"logit_bias must be None, a real number or a 1-element tensor, got {logit_bias!r}")
        if not math.isfinite(logit_bias):
            raise ValueError(f"logit_bias must be finite, got {logit_bias}")
    v.anchor_weight(anchor_weight, n, "anchors", anchors)
    v.optional_mask("candidate_mask", candidate_mask, (n,), "one flag per candidate", "anchors", anchors)
    if candidate_ids is not None:
        v.tensor("candidate_ids", candidate_ids, dtypes=v.INDEX_DTYPES, allow_empty=True)
        v.shape("candidate_ids", candidate_ids, (n,), "one id per candidate")
        v.same_device("candidate_ids", candidate_ids, "anchors", anchors)
    if candidate_logq is not None:
        v.tensor("candidate_logq", candidate_logq, allow_empty=True)
        v.shape("candidate_logq", candidate_logq, (n,), "one log probability per candidate")
        v.same_device("candidate_logq", candidate_logq, "anchors", anchors)
        v.finite("candidate_logq", candidate_logq)
    for name, flag in (("normalize", normalize), ("symmetric", symmetric), ("ring", ring)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    v.choice("reduction", reduction, ("mean", "sum", "none"))
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if group is not None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialized")
    if capacity is not None and v.positive_int("capacity", capacity) < n:
        raise ValueError(f"capacity must be >= the rows of anchors on every rank; got {capacity} with "
                         f"{n} rows here")
    v.finite("anchors", anchors)
    v.finite("candidates", candidates)


def _scalar_tensor(name, t, anchors):
    """A 1-element float tensor on the anchors' device, finite (a data check: it reads the value)."""
    _validate.tensor(name, t, allow_empty=True)
    if t.numel() != 1:
        raise ValueError(f"{name} must have exactly one element (a scalar), got shape {tuple(t.shape)}")
    _validate.same_device(name, t, "anchors", anchors)
    _validate.finite(name, t)


def _terms_from_lse(lse, lse_backward, widen=True, row_lse_with_grad=None):
    """Per-anchor terms from a backend's masked-LSE op (same contract as the reference).
    lse_backward is the op's backward, used directly by the ring exchange; widen: the
    ring may hand it 16-bit inputs as fp32 (see distributed._RingLSE.backward). The op's row
    direction subtracts y_logq; its columns never do (see the reference for why).
    row_lse_with_grad: optionally, the row LSE that computes its gradient in the same pass for
    an upstream gradient proportional to row_weight (compiled.contrastive_row_lse_with_grad),
    used on one process, one direction, where row_weight is given (a mean or sum reduction)."""

    def terms(anchors, candidates, all_candidates, all_anchors, all_mask, scale, normalize,
              symmetric, info, bias, *, single_process, row_weight=None):
        positive = positive_logits(anchors, candidates, scale, normalize)
        forward_positive = positive if info.logq is None else positive - info.logq
        if row_lse_with_grad is not None and row_weight is not None and single_process and not symmetric:
            row = row_lse_with_grad(anchors, candidates, all_mask, info.logq, info.ids, scale, normalize, row_weight)
            if row is not None:
                return _term(row, forward_positive, bias)
        if symmetric and single_process:  # one pass gives both directions: rows and columns
            row, col = lse(anchors, candidates, all_mask, all_mask, info.logq, info.ids, info.ids, 0,
                           scale, normalize, True)
            return 0.5 * (_term(row, forward_positive, bias) + _term(col, positive, bias))
        row, _ = lse(anchors, all_candidates, None, all_mask, info.all_logq, info.ids, info.all_ids,
                     info.offset, scale, normalize, False)
        terms = _term(row, forward_positive, bias)
        if not symmetric:
            return terms
        rev, _ = lse(candidates, all_anchors, None, all_mask, None, info.ids, info.all_ids, info.offset,
                     scale, normalize, False)
        return 0.5 * (terms + _term(rev, positive, bias))

    terms.lse_ops = (lse, lse_backward, widen)
    return terms


def _reference_terms(*args, single_process, row_weight=None):  # the dense reference needs no fused path
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
def _cuda_supports(anchors, candidates, **_):
    """auto's `cuda` backend computes in fp32 (fp32 copies of the inputs, fp32 cuBLAS GEMMs), so a
    bf16 / fp16 call goes to the Triton kernels instead (16-bit tensor-core MMA with fp32
    accumulation, no fp32 copy) wherever they can run it and have passed the self-check on the
    call's device; otherwise `cuda` takes it. Asked for by name, `cuda` runs any dtype."""
    if anchors.dtype not in (torch.bfloat16, torch.float16):
        return True
    triton = dispatch.implementations(OP).get("triton")
    if triton is None or not dispatch.backends()["triton"][0] or anchors.device.type not in triton.devices:
        return True
    if triton.supports is not None and not triton.supports(anchors=anchors, candidates=candidates):
        return True
    return not dispatch.validated(OP, "triton", anchors.device)


if _extension.loaded():
    _compiled = _terms_from_lse(_ops.contrastive_lse, torch.ops.courier_fast.contrastive_lse_backward)
    dispatch.register(OP, "cpu", _terms_from_lse(_ops.contrastive_lse, torch.ops.courier_fast.contrastive_lse_backward,
                                                 row_lse_with_grad=_ops.contrastive_row_lse_with_grad),
                      devices=("cpu",), validate=False,
                      note="C++ online-LSE op (2-D tiles, a worker thread per share of columns; one "
                           "direction under a mean or sum: row blocks with the gradient in the same pass)")
    if _extension.cuda_compiled():
        dispatch.register(OP, "cuda", _compiled, devices=("cuda",), supports=_cuda_supports,
                          note="cuBLAS row tiles + fused CUDA epilogues (auto sends 16-bit inputs to "
                               "triton once it passed the self-check)")
if importlib.util.find_spec("triton") is not None:
    from courier_fast.ops.backends import triton as _triton_ops

    dispatch.register(OP, "triton", _terms_from_lse(_triton_ops.contrastive_lse,  # fp32 inputs: d <= 64 on a GPU
                                                    _triton_ops.contrastive_lse_backward, widen=False),
                      devices=("cuda", "cpu") if _triton_ops.INTERPRET else ("cuda",),
                      supports=_triton_ops.contrastive_supports,
                      note="fused Triton kernels (normalise, mask, online LSE, atomics-free "
                           "backward, 16-bit MMA for 16-bit inputs)")
