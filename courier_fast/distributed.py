"""Gathering the global batch across processes, with gradient.

all_gather_with_grad(x, group) concatenates every rank's x (ranks may hold different numbers of
rows). Its backward sums, over ranks, the gradients each rank computed for this rank's rows
(an all-reduce of the gathered gradient, then this rank's slice): exactly the chain rule for a
global loss, so that after DDP averages gradients they match one process on the whole batch.
"""
import torch
import torch.distributed as dist


def world_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def _rank_sizes(n, group, device):
    local = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, local, group=group)
    return [int(s.item()) for s in sizes]


def _gather(x, sizes, group):
    """Concatenate every rank's x (first dim sizes[r]); pads to the largest for all_gather."""
    largest = max(sizes)
    padded = x if x.shape[0] == largest else torch.cat([x, x.new_zeros((largest - x.shape[0],) + x.shape[1:])])
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, offset, group):
        ctx.group, ctx.offset, ctx.n = group, offset, x.shape[0]
        return _gather(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.offset:ctx.offset + ctx.n], None, None, None


class GatheredBatch:
    """This rank's place in the global batch: sizes per rank and this rank's row offset."""

    def __init__(self, n, group, device):
        self.group = group
        self.sizes = _rank_sizes(n, group, device)
        self.offset = sum(self.sizes[:dist.get_rank(group)])

    def with_grad(self, x):
        return _AllGatherWithGrad.apply(x, self.sizes, self.offset, self.group)

    def no_grad(self, x):
        return _gather(x.detach(), self.sizes, self.group)

    def total(self, value):
        """Sum a scalar tensor over ranks (no gradient)."""
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.group)
        return value
