"""The contrastive losses as modules: InBatchContrastiveLoss (InfoNCE over the batch's
candidates, gathered or ring-passed across ranks) and ClipLoss (open_clip's ClipLoss, drop-in),
both computed by courier_fast.contrastive_loss."""
import torch
import torch.distributed as dist
from torch import nn

from courier_fast.ops.contrastive import contrastive_loss
from courier_fast.ops.distributed import grad_over_ranks, sum_over_ranks


class InBatchContrastiveLoss(nn.Module):
    """InfoNCE over all candidates of the batch; see courier_fast.contrastive_loss.

    gather=True uses every rank's candidates as negatives when torch.distributed is
    initialised with more than one process (group=None means the default group), by an
    all-gather with gradient; gather="ring" passes candidate blocks around a ring instead
    (never more than two ranks' candidates in memory; needs a kernel backend).
    forward(anchors (N, d), candidates (N, d), anchor_weight=None, candidate_mask=None,
    capacity=None, candidate_ids=None, candidate_logq=None): capacity is an int >= every rank's N,
    the same on every rank, with which the gather reads nothing back from the device (None: one
    device-to-host read per call); candidate_ids (N,) int64 (accidental hits leave the
    denominators) and candidate_logq (N,) float (logQ correction) as in contrastive_loss.
    """

    def __init__(self, temperature=0.05, symmetric=False, gather=True, normalize=True,
                 reduction="mean", group=None, backend="auto"):
        super().__init__()
        self.temperature, self.symmetric, self.gather = temperature, symmetric, gather
        self.normalize, self.reduction, self.group, self.backend = normalize, reduction, group, backend

    def _group(self):
        if self.gather not in (True, False, "ring"):
            raise ValueError(f"gather must be True, False or 'ring', got {self.gather!r}")
        if not self.gather or not (dist.is_available() and dist.is_initialized()):
            return None
        return self.group if self.group is not None else dist.group.WORLD

    def forward(self, anchors, candidates, anchor_weight=None, candidate_mask=None, capacity=None,
                candidate_ids=None, candidate_logq=None):
        return contrastive_loss(
            anchors, candidates, temperature=self.temperature, anchor_weight=anchor_weight,
            candidate_mask=candidate_mask, candidate_ids=candidate_ids, candidate_logq=candidate_logq,
            normalize=self.normalize, symmetric=self.symmetric, reduction=self.reduction, group=self._group(),
            backend=self.backend, ring=self.gather == "ring", capacity=capacity)

    def extra_repr(self):
        return f"temperature={self.temperature}, symmetric={self.symmetric}, gather={self.gather}"


class ClipLoss(nn.Module):
    """open_clip's ClipLoss (open_clip 3.3: `open_clip.loss.ClipLoss`) as a drop-in, computed by
    the fused loss: the same constructor, forward and return value, equal loss and gradients
    (features, logit_scale, logit_bias) on every rank, without the B x global-B logits (any
    backend but "reference").

    ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
    use_horovod=False, *, ring=False, backend="auto")
    forward(image_features (B, d), text_features (B, d), logit_scale, logit_bias=None,
    output_dict=False) -> the loss (0-d), or {"contrastive_loss": loss} with output_dict.

    The loss is CLIP's: with z_ji = logit_scale <img_j, txt_i> + logit_bias (features taken as
    given: open_clip's loss does not normalise them), the mean over image rows of the cross
    entropy of z_j. against its own text, and over text rows likewise, averaged. With
    world_size > 1 (torch.distributed initialised with that many ranks, this process being
    `rank`; every rank passes the same B, as open_clip's all_gather requires), the other ranks'
    features are candidates as in open_clip:
      local_loss=True: this rank's rows against every rank's candidates (the mean over local
        rows); gather_with_grad=True sends gradients to the other ranks' features (summed
        there), False treats the gathered features, this rank's positives included, as
        constants.
      local_loss=False: every rank returns the loss over the whole global batch;
        gather_with_grad=True gives each rank world_size x the global loss's gradient for its
        features (open_clip's all_gather with gradient sums the ranks' identical losses),
        False exactly the global gradient; the logit_scale gradient is the global one on
        every rank either way.
    logit_scale: a 1-element tensor (or a number) on the features' device; logit_bias: None, a
    1-element tensor or a number (it cancels in the cross entropy: its gradient is 0).
    cache_labels has no effect (no labels are built); use_horovod=True is a ValueError.
    ring=True (with world_size > 1) passes candidate blocks around a ring instead of
    all-gathering them (needs a kernel backend). backend: as courier_fast.contrastive_loss.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, ring=False, backend="auto"):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported by courier_fast.nn.ClipLoss: it gathers "
                             "with torch.distributed (initialise a process group instead)")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.ring, self.backend = ring, backend
        self.prev_num_logits, self.labels = 0, {}  # open_clip's label cache attributes (unused here)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = self._loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _group(self):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"world_size={self.world_size} needs torch.distributed initialised with that many ranks")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(f"rank={self.rank}, world_size={self.world_size} do not match torch.distributed "
                             f"(rank {dist.get_rank()} of {dist.get_world_size()})")
        return dist.group.WORLD

    def _loss(self, img, txt, logit_scale, logit_bias):
        if not isinstance(logit_scale, torch.Tensor):
            logit_scale = torch.full((), float(logit_scale), device=img.device)
        kw = dict(normalize=False, backend=self.backend)
        if self.world_size <= 1:
            return contrastive_loss(img, txt, logit_scale=logit_scale, logit_bias=logit_bias, symmetric=True, **kw)
        group = self._group()
        kw.update(group=group, ring=self.ring, capacity=img.shape[0])
        if self.local_loss and self.gather_with_grad:
            return contrastive_loss(img, txt, logit_scale=logit_scale, logit_bias=logit_bias, symmetric=True, **kw)
        if self.local_loss:  # the gathered features, this rank's positives too, are constants
            return 0.5 * (contrastive_loss(img, txt.detach(), logit_scale=logit_scale, logit_bias=logit_bias, **kw)
                          + contrastive_loss(txt, img.detach(), logit_scale=logit_scale, logit_bias=logit_bias,
                                             **kw))
        # The global loss on every rank: the ranks' shares (their mean is the global loss) summed.
        # The scale's gradient of a share is this rank's part: summed (averaged, where the share
        # receives world_size x the gradient) over the ranks it is the global one.
        world = dist.get_world_size(group)
        logit_scale = grad_over_ranks(logit_scale, group, mean=self.gather_with_grad)
        if isinstance(logit_bias, torch.Tensor):
            logit_bias = grad_over_ranks(logit_bias, group, mean=self.gather_with_grad)
        share = contrastive_loss(img, txt, logit_scale=logit_scale, logit_bias=logit_bias, symmetric=True, **kw)
        if self.gather_with_grad:  # every rank's share receives the gradient of every rank's loss
            return sum_over_ranks(share, group) / world
        others = sum_over_ranks(share.detach(), group) - share.detach()
        return (share + others) / world

    def extra_repr(self):
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, ring={self.ring}")
