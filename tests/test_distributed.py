"""Global negatives across 2 and 3 gloo processes (loopback): after DDP-style gradient averaging the
gradients, and the mean of the ranks' losses, equal one process on the concatenated batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import courier_fast as cf
from courier_fast.reference import contrastive_loss_reference

pytestmark = pytest.mark.distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, sizes, backend, gather, symmetric, data, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(sizes))
    try:
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        a = data["a"][sl].clone().requires_grad_()
        c = data["c"][sl].clone().requires_grad_()
        loss = cf.nn.InBatchContrastiveLoss(temperature=0.1, symmetric=symmetric, backend=backend,
                                            gather=gather)(
            a, c, anchor_weight=data["w"][sl], candidate_mask=data["m"][sl])
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[rank] = ((mean_loss / len(sizes)).item(), a.grad.clone(), c.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend,gather", [("reference", True), ("cpu", True), ("cpu", "ring")])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("sizes", [(6, 6), (5, 8), (4, 7, 5)])  # 3 ranks: a real ring
def test_two_process_gradients_equal_single_process(backend, gather, symmetric, sizes):
    n = sum(sizes)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    data = {"a": torch.randn(n, 5, generator=g, dtype=torch.float64),
            "c": torch.randn(n, 5, generator=g, dtype=torch.float64),
            "w": torch.rand(n, generator=g, dtype=torch.float64),
            "m": torch.rand(n, generator=g) < 0.8}
    results = mp.Manager().dict()
    world = len(sizes)
    mp.spawn(_worker, args=(_free_port(), sizes, backend, gather, symmetric, data, results), nprocs=world)

    a = data["a"].clone().requires_grad_()
    c = data["c"].clone().requires_grad_()
    ref = contrastive_loss_reference(a, c, temperature=0.1, anchor_weight=data["w"],
                                     candidate_mask=data["m"], symmetric=symmetric)
    ga, gc = torch.autograd.grad(ref, (a, c))
    # DDP averages parameter gradients over ranks, and each rank's rows feed the parameters only
    # through that rank: so rank r's gradient for its rows must be W x the global gradient there.
    start = 0
    for rank in range(world):
        loss, a_grad, c_grad = results[rank]
        assert abs(loss - ref.item()) < 1e-10
        sl = slice(start, start + sizes[rank])
        torch.testing.assert_close(a_grad / world, ga[sl])
        torch.testing.assert_close(c_grad / world, gc[sl])
        start += sizes[rank]
