"""CourierModel: timm image encoder -> linear head -> ReconstructionAttention -> COURIER's losses.

A batch is a courier_fast.data.SessionBatch: the batch's distinct item images are encoded once
and every history / page-view slot indexes their embeddings. Losses (docs/design.md §1):

* contrastive (weight `contrastive_weight`, temperature 0.2: on the demo's ten quick worlds 0.1
  beat the paper's 0.05 by 0.017 cold-item AUC and 0.2 beat 0.1 by 0.011, docs/training.md "The
  defaults on ten seeds"): each clicked page-view item's
  reconstruction r_j must pick out its own embedding e_j among every page-view item of the
  (global) batch, non-clicked items of the same page included. Non-clicked items are never
  anchors. An item shown several times (in several rows, on several ranks) would be a false
  negative with the positive's exact logit: with candidate_ids=True (the default) the item ids
  go to the loss as candidate_ids, so every copy other than the anchor's own slot leaves its
  denominator, on every rank; negatives count once per slot that shows them (the in-batch
  sampling distribution, which item_logq corrects). candidate_ids=False: the previous in-rank
  rule instead, one candidate per distinct item of the rank unless clicked in several rows,
  duplicates across ranks left in. item_logq (ids, log frequencies): the logQ correction, each
  page-view candidate's logit minus the log of its item's frequency (courier-fast train --logq).
* history (weight `history_weight`): causal self-reconstruction, each history click from the
  earlier ones, with the same attention layer and the same InfoNCE over the batch's history
  (accidental hits by item id as above; no logQ correction).
* ctr (weight `ctr_weight`): an MLP on [r_j ; e_j] with BCE on the click label of every valid slot.

Queries (`query=`):
* "learned" (default): one learned query pools the history, independent of the target. The
  best in our measurements (README, "Demo results").
* "target": the shown item queries the history through its *non-visual* features: a learned
  query plus a learned embedding of its category. Target-aware (which history items matter
  depends on what is shown) but leak-free: the query carries nothing of the target's pixels, so
  attention cannot interpolate history items towards the target's look (background,
  orientation) and win the contrastive task without the click signal. It does let the
  reconstruction carry the target's category, which the encoder can then match: a category
  shortcut that costs it on the full world.
* "target_image": the paper's literal form, the target's own image embedding as the query.
  Kept for reproduction; our measurements show it learns a shortcut (see the README).
"""
import torch
import torch.nn.functional as F
from torch import nn

from courier_fast._validate import positive_int
from courier_fast.models.encoder import ImageEncoder
from courier_fast.nn import InBatchContrastiveLoss, ReconstructionAttention

QUERIES = ("target", "learned", "target_image")


def candidate_mask(index, anchor, valid, num_items=None):
    """One candidate per distinct item: (K,) slots -> (K,) bool.

    index: item row of each slot (int64 in [0, num_items)); anchor: bool, the slot is an anchor;
    valid: bool. Keeps every anchor slot (each needs its own positive) and the first slot of each
    item no anchor uses. Give num_items to avoid reading index.max() back from the device.
    """
    k = index.numel()
    pos = torch.arange(k, device=index.device)
    size = num_items if num_items is not None else (int(index.max()) + 1 if k else 1)
    first = torch.full((size,), k, device=index.device).scatter_reduce(0, index, pos, "amin")
    anchored = torch.zeros(size, dtype=torch.long, device=index.device).scatter_reduce(
        0, index, anchor.long(), "amax").bool()  # no boolean indexing: that reads the mask back
    return valid & (anchor | ((pos == first[index]) & ~anchored[index]))


def lookup_logq(ids, table_ids, table_logq, floor):
    """(K,) log frequency of each id in `ids` (K,) int64 from a table sorted by id (table_ids
    (T,) int64, table_logq (T,) float); an id missing from the table (padding) gets `floor`
    (0-d). No host read."""
    pos = torch.searchsorted(table_ids, ids).clamp(max=table_ids.numel() - 1)
    return torch.where(table_ids[pos] == ids, table_logq[pos], floor)


def gather_capacity(batch_rows, rows, slots):
    """batch_rows x slots: the contrastive_loss capacity of a loss over `slots` entries per batch
    row when every rank's batch has at most batch_rows rows (None when batch_rows is None). This
    batch's `rows` above batch_rows is a ValueError."""
    if batch_rows is None:
        return None
    if rows > batch_rows:
        raise ValueError(f"batch has {rows} rows, more than batch_rows={batch_rows}")
    return batch_rows * slots


class CourierModel(nn.Module):
    """COURIER pre-training: CourierModel(...)(batch) -> dict of losses ("loss" is their weighted sum).

    encoder: a timm model name; embed_dim: e's size (256 in the paper); num_heads: attention
    heads; query: "learned" | "target" | "target_image" (module docstring); pretrained: local
    backbone weights or None; category_buckets: size of the category embedding table (ids are
    taken modulo it). Other options are ImageEncoder's and the loss weights / temperature.
    batch_rows: with negatives from several ranks (gather), the most rows of any rank's batch,
    the same int on every rank whose batches all have the same slot widths (SessionLoader: fixed
    history_len and pv_len; train() passes batch_size). The losses then gather every rank's
    B x P page-view and B x L history slots padded to batch_rows x P and batch_rows x L, with no
    device-to-host read. None: each of the two losses reads the ranks' largest size back once.
    candidate_ids: True: item ids are the losses' candidate_ids (accidental hits leave the
    denominators on every rank); False: the previous in-rank duplicate rule (module docstring).
    item_logq: None, or (ids (T,) int64 sorted, log frequencies (T,) float) of the items shown:
    the page-view loss subtracts each candidate's value from its logits (logQ correction).
    """

    def __init__(self, encoder="resnet18", embed_dim=256, num_heads=4, query="learned", pretrained=None,
                 temperature=0.2, contrastive_weight=1.0, history_weight=1.0, ctr_weight=1.0,
                 category_buckets=1024, grad_checkpointing=False, freeze_backbone=False, channels_last=True,
                 gather=True, backend="auto", batch_rows=None, candidate_ids=True, item_logq=None, **timm_kwargs):
        super().__init__()
        if not isinstance(candidate_ids, bool):
            raise TypeError(f"candidate_ids must be a bool, got {type(candidate_ids).__name__}")
        self.candidate_ids = candidate_ids
        self.logq = item_logq is not None
        if self.logq:  # not in the state_dict: derived from the data at every start
            ids, logq = (torch.as_tensor(t) for t in item_logq)
            if ids.dim() != 1 or ids.shape != logq.shape or ids.numel() == 0 or not logq.is_floating_point():
                raise ValueError("item_logq must be (ids (T,) int64, log frequencies (T,) float) with T > 0")
            if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
                raise ValueError("item_logq ids must be sorted and distinct")
            self.register_buffer("logq_ids", ids.to(torch.int64), persistent=False)
            self.register_buffer("logq_values", logq.float(), persistent=False)
            self.register_buffer("logq_floor", logq.float().min(), persistent=False)
        if query not in QUERIES:
            raise ValueError(f"query must be one of {QUERIES}, got {query!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.batch_rows = None if batch_rows is None else positive_int("batch_rows", batch_rows)
        weights = {"contrastive_weight": contrastive_weight, "history_weight": history_weight, "ctr_weight": ctr_weight}
        if min(weights.values()) < 0 or max(weights.values()) <= 0:
            raise ValueError(f"loss weights must be >= 0 with at least one > 0, got {weights}")
        self.encoder = ImageEncoder(encoder, embed_dim, pretrained, grad_checkpointing, freeze_backbone,
                                    channels_last, **timm_kwargs)
        self.query, self.embed_dim = query, embed_dim
        self.weights = {"contrastive": contrastive_weight, "history": history_weight, "ctr": ctr_weight}
        self.attention = ReconstructionAttention(embed_dim, num_heads, backend=backend)
        # unused (frozen, so DDP and the optimiser skip it) when the target's embedding is the query
        self.base_query = nn.Parameter(torch.randn(embed_dim) / embed_dim ** 0.5, requires_grad=query != "target_image")
        self.category_query = nn.Embedding(category_buckets, embed_dim) if query == "target" else None
        if self.category_query is not None:
            nn.init.zeros_(self.category_query.weight)  # starts as the learned query, learns per category
        self.ctr_head = (nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.ReLU(), nn.Linear(embed_dim, 1))
                         if ctr_weight else None)  # no unused parameters under DDP
        self.infonce = InBatchContrastiveLoss(temperature=temperature, gather=gather, backend=backend)

    def _candidates(self, index, anchor, valid, rows, ids):
        """(candidate_mask, candidate_ids) of a loss over slots with item rows `index` (B, K):
        every valid slot and the item ids, or (candidate_ids=False) the in-rank rule and None."""
        if self.candidate_ids:
            return valid.reshape(-1), ids
        return candidate_mask(index.reshape(-1), anchor.reshape(-1), valid.reshape(-1), rows), None

    def queries(self, emb, category):
        """Queries for targets with embeddings emb (B, K, d) and categories (B, K) (-1 = padding)."""
        if self.query == "target_image":
            return emb
        q = self.base_query.to(emb.dtype).expand_as(emb)
        if self.category_query is not None:
            cat = category.clamp(min=0) % self.category_query.num_embeddings
            q = q + self.category_query(cat.to(emb.device)).to(emb.dtype)
        return q

    def reconstruct(self, e, category, h, hist_pad):
        """Reconstructions r (B, P, d) of the page-view targets e (B, P, d) (categories (B, P)) from
        the history h (B, L, d) (hist_pad (B, L), True = padding). The learned query is the same
        for every target, so a row's P reconstructions are one: attention runs once per row (B, 1)
        and r is that row expanded over P (a view), P times less attention work and memory."""
        if self.query == "learned":
            return self.attention(self.queries(e[:, :1], None), h, key_padding_mask=hist_pad).expand_as(e)
        return self.attention(self.queries(e, category), h, key_padding_mask=hist_pad)

    def ctr_logits(self, r, e):
        """CTR head on [r ; e] per slot: (B, P, d) x 2 -> float32 logits (B, P). The first layer is
        applied to r and e separately (W [r ; e] = W_r r + W_e e), so no (B, P, 2d) concatenation is
        built or saved, and a row-shared r (reconstruct()'s expanded view) is multiplied once per row."""
        first, rest = self.ctr_head[0], self.ctr_head[1:]
        d = e.shape[-1]
        r_part = F.linear(r[:, :1] if r.stride(1) == 0 else r, first.weight[:, :d])
        hidden = F.linear(e, first.weight[:, d:], first.bias) + r_part
        return rest(hidden).squeeze(-1).float()

    def embed_batch(self, batch, images=None, embeddings=None):
        """(embeddings of the batch's distinct items with a zero row for padding: (U + 1, d)).
        `embeddings` (U, d) are used instead of encoding the images."""
        emb = self.encoder(batch.images if images is None else images) if embeddings is None else embeddings
        return torch.cat([emb, emb.new_zeros(1, emb.shape[1])])

    def forward(self, batch, images=None, *, embeddings=None):
        """Losses of one SessionBatch; `images` replaces batch.images (e.g. an augmented copy);
        `embeddings` (U, d), the distinct items' embeddings computed by the caller (e.g.
        courier_fast.models.methods' encode()), replace the encoder pass."""
        dev = self.attention.in_proj_weight.device
        emb = self.embed_batch(batch, images, embeddings)
        hist_idx, pv_idx = batch.history_index.to(dev), batch.pv_index.to(dev)
        hist_pad, pv_pad = batch.history_pad.to(dev), batch.pv_pad.to(dev)
        clicks = batch.clicks.to(dev)
        pv_capacity = gather_capacity(self.batch_rows, *pv_idx.shape)  # e's rows on the busiest rank
        history_capacity = gather_capacity(self.batch_rows, *hist_idx.shape)
        h, e = emb[hist_idx], emb[pv_idx]
        d = e.shape[-1]
        valid = ~pv_pad
        clicked = (clicks > 0) & valid
        r = self.reconstruct(e, batch.pv_category, h, hist_pad)
        out = {}
        w = self.weights
        rows = emb.shape[0]  # distinct items + the padding row: every index is below it
        if w["contrastive"]:
            pv_ids = batch.pv_ids.to(dev).reshape(-1)
            cand, ids = self._candidates(pv_idx, clicked, valid, rows, pv_ids)
            logq = None if not self.logq else lookup_logq(pv_ids, self.logq_ids, self.logq_values, self.logq_floor)
            out["contrastive"] = self.infonce(r.reshape(-1, d), e.reshape(-1, d), anchor_weight=clicked.reshape(-1),
                                              candidate_mask=cand, capacity=pv_capacity, candidate_ids=ids,
                                              candidate_logq=logq)
        if w["history"]:
            rh = self.attention(self.queries(h, batch.history_category), h, key_padding_mask=hist_pad, causal=True)
            hvalid = ~hist_pad
            # a position is an anchor when it and at least one earlier position are valid
            anchor = hvalid & (torch.cumsum(hvalid.int(), 1) > 1)
            cand, ids = self._candidates(hist_idx, anchor, hvalid, rows, batch.history_ids.to(dev).reshape(-1))
            out["history"] = self.infonce(rh.reshape(-1, d), h.reshape(-1, d), anchor_weight=anchor.reshape(-1),
                                          candidate_mask=cand, capacity=history_capacity, candidate_ids=ids)
        if w["ctr"]:
            logits = self.ctr_logits(r, e)
            bce = F.binary_cross_entropy_with_logits(logits, clicks, reduction="none")
            # mean over valid slots, 0 when there is none; no boolean indexing (a host sync)
            out["ctr"] = (bce * valid).sum() / valid.sum().clamp(min=1)
        out["loss"] = sum(w[k] * v for k, v in out.items())
        return out
