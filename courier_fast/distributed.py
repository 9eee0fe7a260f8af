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


def _padded(t, rows):
    """t with zero rows appended up to `rows` rows."""
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros((rows - t.shape[0],) + t.shape[1:])])


def _gather(x, sizes, group):
    """Concatenate every rank's x (first dim sizes[r]); pads to the largest for all_gather."""
    padded = _padded(x, max(sizes))
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


def _ring_shift(tensors, group):
    """Send tensors to the next rank and receive the previous rank's (same shapes/dtypes)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    received = []
    for t in tensors:
        out = torch.empty_like(t)
        req = dist.isend(t.contiguous(), nxt, group=group)
        dist.recv(out, prv, group=group)
        req.wait()
        received.append(out)
    return received


class _RingLSE(torch.autograd.Function):
    """Row LSE of local x against every rank's y, passing y blocks around a ring (Inf-CL style):
    a rank never holds more than its own and one visiting block. Backward passes the blocks
    around again with a gradient buffer that accumulates every rank's contribution and arrives
    back at the block's owner after a full turn."""

    @staticmethod
    def forward(ctx, x, y, y_keep, scale, normalize, batch, lse_ops):
        fwd, _ = lse_ops
        rows = max(batch.sizes)  # blocks are padded (and masked) to the largest rank's size
        blk, keep = _padded(y, rows), _padded(y_keep, rows)
        lse = None
        for step in range(len(batch.sizes)):
            if step:
                blk, keep = _ring_shift([blk, keep], batch.group)
            row, _ = fwd(x, blk, None, keep.bool(), scale, normalize, False)
            lse = row if lse is None else torch.logaddexp(lse, row)
        ctx.save_for_backward(x, y, y_keep, lse)
        ctx.scale, ctx.normalize, ctx.batch, ctx.lse_ops = scale, normalize, batch, lse_ops
        return lse

    @staticmethod
    def backward(ctx, grad):
        x, y, y_keep, lse = ctx.saved_tensors
        _, bwd = ctx.lse_ops
        rows = max(ctx.batch.sizes)
        blk, keep = _padded(y, rows), _padded(y_keep, rows)
        grad_blk = torch.zeros_like(blk)
        grad_x = torch.zeros_like(x)
        empty = lse.new_empty(0)
        grad = grad.to(lse.dtype).contiguous()
        for step in range(len(ctx.batch.sizes)):
            if step:
                blk, keep, grad_blk = _ring_shift([blk, keep, grad_blk], ctx.batch.group)
            gx, gy = bwd(grad, empty, x, blk, None, keep.bool(), lse, empty,
                         ctx.scale, ctx.normalize, False)
            grad_x += gx
            grad_blk += gy
        (grad_blk,) = _ring_shift([grad_blk], ctx.batch.group)  # home to the block's owner
        return grad_x, grad_blk[:y.shape[0]], None, None, None, None, None


def ring_lse(x, y, y_mask, scale, normalize, batch, lse_ops):
    """(n,) LSE of x's rows against all ranks' y (masked by their y_mask), ring exchange."""
    keep = torch.ones(y.shape[0], dtype=torch.uint8, device=y.device) if y_mask is None else y_mask.to(torch.uint8)
    return _RingLSE.apply(x, y, keep, scale, normalize, batch, lse_ops)
