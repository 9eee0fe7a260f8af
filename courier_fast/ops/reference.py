"""Plain-PyTorch references: the ground truth every other backend is tested against.

These are written for clarity, not speed: the contrastive reference materialises the N x M
logits and the attention reference the (B, h, P, L) scores. Tests call them in float64.
"""
import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from courier_fast._validate import causal_mode
from courier_fast.ops.jagged import jagged_to_padded, lengths_to_offsets

NORM_EPS = 1e-12  # as torch.nn.functional.normalize; the C++ and Triton kernels use the same


def compute_dtype(dtype):
    """Accumulation dtype: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unit_rows(x, normalize):
    """x in the compute dtype, L2-normalised over the last dim when normalize."""
    x = x.to(compute_dtype(x.dtype))
    return F.normalize(x, dim=-1, eps=NORM_EPS) if normalize else x


def positive_logits(anchors, candidates, scale, normalize):
    """(N,) s * <r_j, e_j>: each anchor's logit for its own candidate (shared by all backends);
    scale is a float or a 0-d tensor (then differentiated). With normalize, <r, e> / (max(|r|, eps)
    max(|e|, eps)): the dot of the two F.normalize'd rows, but autograd keeps only the inputs and
    two (N,) norms, not two normalised (N, d) copies (rows with |r| |e| above ~3e38 overflow fp32)."""
    a, c = anchors.to(compute_dtype(anchors.dtype)), candidates.to(compute_dtype(candidates.dtype))
    dot = (a * c).sum(-1)
    if normalize:
        norms = torch.linalg.vector_norm(a, dim=-1).clamp_min(NORM_EPS) * \
            torch.linalg.vector_norm(c, dim=-1).clamp_min(NORM_EPS)
        dot = dot / norms
    return scale * dot


@dataclasses.dataclass(frozen=True)
class CandidateInfo:
    """What the loss knows of the candidates besides their embeddings (docs/design.md §3.1), for
    N local anchors against M candidates (the gathered batch; M = N on one process).

    ids (N,) int64: the local rows' candidate ids (row j's positive has ids[j]); all_ids (M,):
    every candidate's; offset: the column of local row 0's positive among the M (row j's is
    offset + j; 0 on one process). A column i != offset + j with all_ids[i] == ids[j] is an
    accidental hit of anchor j. logq (N,) / all_logq (M,) float: log sampling probability of
    the local / every candidate. None where not given.
    """
    ids: Optional[torch.Tensor] = None
    all_ids: Optional[torch.Tensor] = None
    offset: int = 0
    logq: Optional[torch.Tensor] = None
    all_logq: Optional[torch.Tensor] = None


def accidental_hits(ids, all_ids, offset):
    """(N, M) bool: True where candidate i shares anchor j's positive id, ids[j] == all_ids[i],
    but is not that positive (column offset + j)."""
    n, m = ids.shape[0], all_ids.shape[0]
    own = torch.arange(m, device=ids.device)[None, :] == offset + torch.arange(n, device=ids.device)[:, None]
    return (ids[:, None] == all_ids[None, :]) & ~own


def _masked_lse(logits, keep):
    """log sum_{i : keep[j, i]} exp(logits[j, i]) per row; keep (N, M) bool or None (all); -inf
    (with zero gradient) for a row that keeps nothing."""
    if keep is None:
        return torch.logsumexp(logits, dim=-1)
    some = keep.any(-1, keepdim=True)
    lse = torch.logsumexp(logits.masked_fill(~keep, float("-inf")).masked_fill(~some, 0.0), dim=-1)
    return lse.masked_fill(~some.squeeze(-1), float("-inf"))


def _keep(all_mask, info, n, m, device):
    """(N, M) bool: candidate i is in anchor j's denominator (mask, accidental hits); None: all."""
    keep = None if all_mask is None else all_mask[None, :].expand(n, m)
    if info.ids is not None:
        hits = accidental_hits(info.ids, info.all_ids, info.offset)
        keep = ~hits if keep is None else keep & ~hits
    return keep


def contrastive_terms_reference(anchors, candidates, all_candidates, all_anchors, all_mask,
                                scale, normalize, symmetric, info=None, bias=None):
    """Per-anchor InfoNCE terms from the dense N x M logits (docs/design.md §3.1).

    anchors/candidates (N, d) (row j of candidates is anchor j's positive), all_candidates /
    all_anchors (M, d) (the global batch; all_anchors only for symmetric), all_mask (M,) bool or
    None (True = item is a candidate); scale: float or 0-d tensor s; info: CandidateInfo (ids,
    logq) or None; bias: None, float or 0-d tensor b. Logits, literally:

        z_ji = s <r_j, e_i> + b - logq_i,   over the candidates i kept for anchor j
               (candidate_mask_i and not an accidental hit),
        term_j = logsumexp_i z_ji - z_jj.

    symmetric: the reverse direction is the transposed matrix, E_j as anchor over all_anchors
    with z'_ji = s <e_j, r_i> + b - logq_j (logq of the row's own candidate: constant along the
    row, so it cancels) and the same kept set transposed (the hit relation is symmetric); the
    two terms are averaged. Returns (N,) float32/float64; -inf for an anchor with no candidate
    at all (such anchors always have weight 0).
    """
    info = info or CandidateInfo()
    r, e = unit_rows(anchors, normalize), unit_rows(candidates, normalize)
    dt = r.dtype
    b = 0.0 if bias is None else bias
    n, m = r.shape[0], all_mask.shape[0] if all_mask is not None else all_candidates.shape[0]
    keep = _keep(all_mask, info, n, m, r.device)
    logq = None if info.logq is None else info.logq.to(dt)
    positive = positive_logits(anchors, candidates, scale, normalize) + b
    logits = scale * r @ unit_rows(all_candidates, normalize).T + b
    if logq is not None:
        logits = logits - info.all_logq.to(dt)[None, :]
    terms = _masked_lse(logits, keep) - (positive if logq is None else positive - logq)
    if symmetric:
        reverse = scale * e @ unit_rows(all_anchors, normalize).T + b
        own = positive
        if logq is not None:
            reverse, own = reverse - logq[:, None], positive - logq
        terms = 0.5 * (terms + _masked_lse(reverse, keep) - own)
    return terms


def effective_weight(anchor_weight, candidate_mask, n, like):
    """w_j: anchor_weight (None -> 1, bool -> 0/1) times [own candidate not masked]."""
    dtype = compute_dtype(like.dtype)
    w = torch.ones(n, dtype=dtype, device=like.device) if anchor_weight is None else anchor_weight.to(dtype)
    if candidate_mask is not None:
        w = w * candidate_mask.to(dtype)
    return w


def reduce_terms(terms, weight, reduction, weight_total=None, world_size=1):
    """Weight per-anchor terms and reduce them (the one place the reduction is defined).

    none: w_j * terms_j; sum: sum_j w_j terms_j; mean: that sum / sum_j w_j, exactly 0 (with
    zero gradients) when the weights sum to 0. Anchors with w_j = 0 never touch the result, even
    where their term is +inf or NaN. In a process group of world_size ranks, weight_total is
    the global weight sum and sum/mean are scaled by world_size so that the ranks' mean (what
    DDP's gradient averaging optimises) equals the single-process value on the whole batch.
    """
    weighted = weight * torch.where(weight > 0, terms, torch.zeros_like(terms))
    if reduction == "none":
        return weighted
    total = weighted.sum() * world_size
    if reduction == "sum":
        return total
    denom = weight.sum() if weight_total is None else weight_total
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


def contrastive_loss_reference(anchors, candidates, *, temperature=None, logit_scale=None, logit_bias=None,
                               anchor_weight=None, candidate_mask=None, candidate_ids=None,
                               candidate_logq=None, normalize=True, symmetric=False, reduction="mean"):
    """docs/design.md §3.1 contrastive loss on one process, dense. See courier_fast.contrastive_loss
    (s = logit_scale, else 1 / temperature, temperature 0.05 when neither is given)."""
    scale = logit_scale if logit_scale is not None else 1.0 / (0.05 if temperature is None else temperature)
    info = CandidateInfo(candidate_ids, candidate_ids, 0, candidate_logq, candidate_logq)
    terms = contrastive_terms_reference(anchors, candidates, candidates, anchors, candidate_mask,
                                        scale, normalize, symmetric, info, logit_bias)
    weight = effective_weight(anchor_weight, candidate_mask, anchors.shape[0], anchors)
    return reduce_terms(terms, weight, reduction)


def reconstruction_attention_reference(targets, history, in_proj_weight, in_proj_bias,
                                       out_proj_weight, out_proj_bias, num_heads, *,
                                       key_padding_mask=None, causal=False, history_index=None,
                                       history_offsets=None, target_offsets=None, max_history_len=None):
    """docs/design.md §3.2 reconstruction attention, in the inputs' dtype, every layout of
    courier_fast.ops.attention_layout: each is turned into the padded one (jagged rows padded,
    history_index targets grouped into their rows; copies of targets and history items, never a
    copy of a history row per target) and computed densely.

    Padded: targets (B, P, d) are the queries, history (B, L, d) the keys and values;
    key_padding_mask (B, L) bool, True = padding. causal needs P == L: True / "strict": target t
    attends to valid s < t; "inclusive": s <= t. A target with no valid history item gets
    attention weights 0, i.e. the output bias. history_index (T,): flat targets (T, d), target t
    over history row history_index[t]. history_offsets (B+1,): a jagged history (S, d),
    key_padding_mask then (S,). target_offsets (B+1,): jagged targets (T, d). Returns the
    targets' shape.
    """
    mode = causal_mode("causal", causal)
    if history_offsets is not None:  # jagged history -> (B, L, d) + padding
        width = max_history_len
        if width is None:
            width = _group_width(history_offsets[1:].long() - history_offsets[:-1].long())
        history, lengths = jagged_to_padded(history, history_offsets, width)
        pad = torch.arange(history.shape[1], device=history.device)[None, :] >= lengths[:, None]
        if key_padding_mask is not None:
            pad = pad | jagged_to_padded(key_padding_mask, history_offsets, history.shape[1], padding_value=True)[0]
        key_padding_mask = pad
    params = (in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads)
    if history_index is not None:  # targets grouped into their rows: copies of the targets, never of the history
        rows = history_index.long()
        counts = torch.bincount(rows, minlength=history.shape[0])
        order = torch.argsort(rows, stable=True)
        offsets = lengths_to_offsets(counts)
        grouped, _ = jagged_to_padded(targets[order], offsets, _group_width(counts))
        out = _padded_attention(grouped, history, *params, key_padding_mask, 0)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return out[rows, rank - offsets[rows]]  # target t's slot in its row: its rank there
    if target_offsets is not None:  # jagged targets -> (B, P, d), and back
        offsets = target_offsets.long()
        width = history.shape[1] if mode else _group_width(offsets[1:] - offsets[:-1])
        padded, _ = jagged_to_padded(targets, target_offsets, width)
        out = _padded_attention(padded, history, *params, key_padding_mask, mode)
        flat = torch.arange(targets.shape[0], device=targets.device)
        rows = torch.searchsorted(offsets, flat, right=True) - 1
        return out[rows, flat - offsets[rows]]
    return _padded_attention(targets, history, *params, key_padding_mask, mode)


def _group_width(counts):
    """The padded width for rows of `counts` items: the longest row (one host read; under
    torch.compile an unbacked size u) plus 2, so that the compiler can tell the width is not 1
    (inductor's bmm lowering guards on a size being 1, which it cannot decide for a
    data-dependent size: GuardOnDataDependentSymNode). The padding is never read back."""
    if not counts.numel():
        return 2
    longest = int(counts.max())
    torch._check(longest >= 0)
    return longest + 2


def _padded_attention(targets, history, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                      num_heads, key_padding_mask, mode):
    """Dense attention of targets (B, P, d) over history (B, L, d); mode 0 / 1 strict / 2 inclusive."""
    b, p, d = targets.shape
    length = history.shape[1]
    dh = d // num_heads
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None,) * 3
    q = F.linear(targets, w_q, b_q).view(b, p, num_heads, dh).transpose(1, 2)
    k = F.linear(history, w_k, b_k).view(b, length, num_heads, dh).transpose(1, 2)
    v = F.linear(history, w_v, b_v).view(b, length, num_heads, dh).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # (B, h, P, L)

    valid = torch.ones(b, 1, p, length, dtype=torch.bool, device=targets.device)
    if key_padding_mask is not None:
        valid = valid & ~key_padding_mask[:, None, None, :]
    if mode:  # strict: s < t (tril(-1)); inclusive: s <= t (tril(0))
        valid = valid & torch.ones(p, length, dtype=torch.bool, device=targets.device).tril(mode - 2)
    has_any = valid.any(-1, keepdim=True)
    # Rows without a valid key: scores 0 then weights * valid = 0 (no NaN in forward or backward).
    scores = scores.masked_fill(~valid, float("-inf")).masked_fill(~has_any, 0.0)
    weights = torch.softmax(scores, dim=-1) * valid
    out = (weights @ v).transpose(1, 2).reshape(b, p, d)
    return F.linear(out, out_proj_weight, out_proj_bias)
