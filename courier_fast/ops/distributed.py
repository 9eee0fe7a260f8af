"""Gathering the global batch across processes, with gradient and without reading the device.

Every rank's rows are gathered padded to one `capacity` (the most rows any rank holds): rank r's
rows sit at [r * capacity, r * capacity + n_r) of the gathered batch and the rest is padding,
carried as masked-out candidates instead of being trimmed. The loss over the padded batch is
the loss over the concatenated rows, and no rank needs another rank's row count on the host.
The capacity is the caller's when known up front (contrastive_loss(capacity=...), e.g. rows x
slots of a fixed batch geometry, the same int on every rank: no communication, no host read);
otherwise the ranks' largest row count is found by one all_reduce and read back to the host:
the one device-to-host read of such a call.

The gather's backward sums, over ranks, the gradients each rank computed for this rank's rows
(an all-reduce of the gathered gradient, then this rank's slice): exactly the chain rule for a
global loss, so that after DDP averages gradients they match one process on the whole batch.
"""
import os

import torch
import torch.distributed as dist


def world_size(group) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def largest_rows(n, group, device):
    """max over the ranks of `n` (an int): one all_reduce, then one device-to-host read."""
    rows = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=group)
    return int(rows.item())


def _padded(t, rows):
    """t with zero rows appended up to `rows` rows."""
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros((rows - t.shape[0],) + t.shape[1:])])


def _gather_padded(x, capacity, group):
    """(world * capacity, ...) every rank's x, each padded with zero rows to `capacity`."""
    padded = _padded(x, capacity).contiguous()
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, capacity, offset, group):
        ctx.group, ctx.offset, ctx.n = group, offset, x.shape[0]
        return _gather_padded(x, capacity, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.offset:ctx.offset + ctx.n], None, None, None


class GatheredBatch:
    """This rank's place in the padded global batch of a process group.

    n: this rank's rows; capacity: rows per rank in the gathered batch, >= n and the same on
    every rank (contrastive_loss checks n; None: largest_rows(), one host read); candidate_mask: None or (n,) bool, this rank's
    candidates. `local_keep` is (capacity,) uint8, 1 for this rank's candidate rows and 0 for
    masked or padded ones; keep() gathers it to (world * capacity,) bool, the mask of the
    gathered batch (uint8 on the wire: not every backend's all_gather takes bool).
    """

    def __init__(self, n, group, device, capacity=None, candidate_mask=None):
        self.group = group
        self.world = dist.get_world_size(group)
        self.capacity = largest_rows(n, group, device) if capacity is None else capacity
        self.offset = dist.get_rank(group) * self.capacity
        own = (torch.ones(n, dtype=torch.uint8, device=device) if candidate_mask is None
               else candidate_mask.to(torch.uint8))
        self.local_keep = _padded(own, self.capacity)

    def with_grad(self, x):
        """(world * capacity, d) every rank's x (n rows here) with gradient to this rank's rows."""
        return _AllGatherWithGrad.apply(x, self.capacity, self.offset, self.group)

    def keep(self):
        """(world * capacity,) bool: the gathered rows that are candidates (real and unmasked)."""
        return _gather_padded(self.local_keep, self.capacity, self.group).bool()

    def gather(self, x):
        """(world * capacity, ...) every rank's x (n rows here), without gradient: per-candidate
        data such as ids or logq. Padding rows are zeros (masked candidates: never read)."""
        return _gather_padded(x.detach(), self.capacity, self.group)

    def total(self, value):
        """Sum a scalar tensor over ranks (no gradient)."""
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.group)
        return value


class _SumOverRanks(torch.autograd.Function):
    """sum_r x_r on every rank; backward: each rank's x_r receives the sum of the ranks' upstream
    gradients (the chain rule for a value every rank uses)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def sum_over_ranks(x, group):
    """Differentiable sum of a tensor over the ranks of `group` (all ranks get the sum)."""
    return _SumOverRanks.apply(x, group)


class _GradOverRanks(torch.autograd.Function):
    """Identity forward; backward sums (mean=False) or averages (mean=True) the gradient over
    the ranks: a replicated parameter whose per-rank gradient must equal the global one."""

    @staticmethod
    def forward(ctx, x, group, mean):
        ctx.group, ctx.mean = group, mean
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return (grad / dist.get_world_size(ctx.group) if ctx.mean else grad), None, None


def grad_over_ranks(x, group, mean=False):
    """x, with its gradient summed (or averaged) over the ranks of `group` in the backward."""
    return _GradOverRanks.apply(x, group, mean)


def _ring_shift(tensors, group):
    """Send tensors to the next rank and receive the previous rank's (same shapes/dtypes).

    One grouped batch_isend_irecv per call, every receive listed before its send, waited on
    together: under NCCL the batch is one ncclGroupStart/End, so every send meets a posted
    receive (a send posted before its peer's receive cannot finish beyond NCCL's eager buffer,
    and with both ranks of a pair sending first neither does: NVIDIA/nccl#479). Backends
    without grouping run the list in order, receives first, which is enough even where a send
    blocks until it is received."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    prv = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.irecv, out, prv, group) for out in received]
    ops += [dist.P2POp(dist.isend, t.contiguous(), nxt, group) for t in tensors]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return received


class _RingLSE(torch.autograd.Function):
    """Row LSE of local x against every rank's y, passing y blocks around a ring (Inf-CL style):
    a rank never holds more than its own and one visiting block. Blocks are y padded to the
    batch's capacity, with batch.local_keep as their mask and the owner's ids and logq with
    them. Only the first step's block (this rank's own) holds x's positives (column j for row
    j); the op is told every other block holds none (id offset = the block's size). Backward
    passes the blocks around again with a gradient buffer that accumulates every rank's
    contribution and arrives back at the block's owner after a full turn; the scale's gradient
    is summed over the steps (this rank's rows only)."""

    @staticmethod
    def forward(ctx, x, y, scale, normalize, batch, lse_ops, ids, logq):
        fwd = lse_ops[0]
        lse = None
        for step, (blk, keep, blk_ids, blk_logq) in enumerate(_blocks(y, batch, ids, logq)):
            offset = 0 if step == 0 else blk.shape[0]
            row, _ = fwd(x, blk, None, keep.bool(), blk_logq, ids, blk_ids, offset, scale, normalize, False)
            lse = row if lse is None else torch.logaddexp(lse, row)
        ctx.save_for_backward(x, y, scale, lse, *([] if ids is None else [ids]), *([] if logq is None else [logq]))
        ctx.has = (ids is not None, logq is not None)
        ctx.normalize, ctx.batch, ctx.lse_ops = normalize, batch, lse_ops
        return lse

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, lse, *extra = ctx.saved_tensors
        ids = extra.pop(0) if ctx.has[0] else None
        logq = extra.pop(0) if ctx.has[1] else None
        bwd, widen = ctx.lse_ops[1], (ctx.lse_ops[2] if len(ctx.lse_ops) > 2 else True)
        # Round once: each step's shares are added up in at least fp32, the gradient buffer
        # travels the ring in fp32, and the sums are rounded to the embeddings' dtype at the end.
        # Where the op allows (widen: the cpu, cuda and chunked ops, which compute 16-bit inputs
        # in fp32 anyway) it is handed x and the block in fp32, so its shares come out unrounded;
        # the Triton op keeps its 16-bit MMA (fp32 inputs launch there only up to d = 64), and
        # rounds each share to the input dtype once.
        acc = torch.promote_types(x.dtype, torch.float32)
        xw = x.to(acc if widen else x.dtype)
        grad_x = torch.zeros_like(xw)
        grad_scale = torch.zeros_like(scale, dtype=torch.promote_types(scale.dtype, torch.float32))
        grad_blk = torch.zeros_like(_padded(y, ctx.batch.capacity), dtype=acc)
        empty = lse.new_empty(0)
        grad = grad.to(lse.dtype).contiguous()
        for step, (blk, keep, blk_ids, blk_logq) in enumerate(_blocks(y, ctx.batch, ids, logq)):
            if step:
                (grad_blk,) = _ring_shift([grad_blk], ctx.batch.group)
            offset = 0 if step == 0 else blk.shape[0]
            gx, gy, gs = bwd(grad, empty, xw, blk.to(xw.dtype), None, keep.bool(), blk_logq, ids, blk_ids, offset,
                             lse, empty, scale, ctx.normalize, False)
            grad_x += gx
            grad_blk += gy
            grad_scale += gs
        (grad_blk,) = _ring_shift([grad_blk], ctx.batch.group)  # home to the block's owner
        return (grad_x.to(x.dtype), grad_blk[:y.shape[0]].to(y.dtype), grad_scale.to(scale.dtype),
                None, None, None, None, None)


def _blocks(y, batch, ids, logq):
    """Yields (block, keep, ids, logq) of each rank in ring order, this rank's first: y padded
    to the capacity, its keep flags and, when given, its ids and logq (None otherwise)."""
    parts = [_padded(y, batch.capacity), batch.local_keep]
    parts += [_padded(t, batch.capacity) for t in (ids, logq) if t is not None]
    for step in range(batch.world):
        if step:
            parts = _ring_shift(parts, batch.group)
        blk, keep, *rest = parts
        yield blk, keep, rest.pop(0) if ids is not None else None, rest.pop(0) if logq is not None else None


def ring_lse(x, y, scale, normalize, batch, lse_ops, ids=None, logq=None):
    """(n,) LSE of x's rows (n, d) against every rank's y (this rank's: (m, d), m <= capacity),
    over the rows batch.local_keep marks on each rank; ring exchange. scale: 0-d tensor
    (differentiated); ids: None or (n,) int64, this rank's candidate ids (x's row j and y's row
    j share ids[j]): accidental hits leave each row's LSE; logq: None or (m,) float, subtracted
    from every logit of this rank's y rows."""
    return _RingLSE.apply(x, y, scale, normalize, batch, lse_ops, ids, logq)


def setup_distributed(device_type, timeout=None):
    """(rank, world) — joins the process group when launched by torchrun with WORLD_SIZE > 1:
    NCCL bound to this rank's GPU (cuda:LOCAL_RANK, init_process_group's device_id) on CUDA,
    gloo otherwise. timeout: seconds a collective may wait (None: torch's default, 10 minutes
    for NCCL, shorter than a large catalogue's k-means barrier)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        kwargs = {}
        if timeout is not None:
            import datetime
            kwargs["timeout"] = datetime.timedelta(seconds=timeout)
        if device_type == "cuda":
            kwargs["device_id"] = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", **kwargs)
    return dist.get_rank(), dist.get_world_size()
