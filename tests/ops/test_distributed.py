"""Global negatives across 2 and 3 gloo processes (loopback): after DDP-style gradient averaging the
gradients, and the mean of the ranks' losses, equal one process on the concatenated batch, with a
gather capacity given up front (no host read) or exchanged (one read per call), also with a
learned scale and bias, candidate ids and logQ; a COURIER training step under DDP reads nothing
back from the device."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import courier_fast as cf
from courier_fast._validate import input_checks
from courier_fast.ops.reference import contrastive_loss_reference
from host_reads import HostReads

pytestmark = pytest.mark.distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CAPACITIES = (None, "largest + 3")  # exchanged (one host read), or given up front with padding


def _worker(rank, port, sizes, backend, gather, symmetric, data, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(sizes))
    try:
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        loss_fn = cf.nn.InBatchContrastiveLoss(temperature=0.1, symmetric=symmetric, backend=backend, gather=gather)
        out = {}
        for capacity in CAPACITIES:
            a = data["a"][sl].clone().requires_grad_()
            c = data["c"][sl].clone().requires_grad_()
            with input_checks(False), HostReads() as reads:  # as in training: no data checks
                loss = loss_fn(a, c, anchor_weight=data["w"][sl], candidate_mask=data["m"][sl],
                               capacity=None if capacity is None else max(sizes) + 3)
                loss.backward()
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            out[capacity] = ((mean_loss / len(sizes)).item(), a.grad.clone(), c.grad.clone(), reads.reads)
        results[rank] = out
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
        sl = slice(start, start + sizes[rank])
        for capacity in CAPACITIES:
            loss, a_grad, c_grad, reads = results[rank][capacity]
            assert abs(loss - ref.item()) < 1e-10, capacity
            torch.testing.assert_close(a_grad / world, ga[sl])
            torch.testing.assert_close(c_grad / world, gc[sl])
            if capacity is None:  # the documented read: the ranks' largest size, once per call
                assert len(reads) == 1 and "largest_rows" in reads[0], reads
            else:
                assert reads == [], reads
        start += sizes[rank]


def _extras_worker(rank, port, sizes, backend, ring, symmetric, data, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(sizes))
    try:
        start = sum(sizes[:rank])
        sl = slice(start, start + sizes[rank])
        a = data["a"][sl].clone().requires_grad_()
        c = data["c"][sl].clone().requires_grad_()
        s = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        with input_checks(False), HostReads() as reads:
            loss = cf.contrastive_loss(a, c, logit_scale=s, logit_bias=b, anchor_weight=data["w"][sl],
                                       candidate_mask=data["m"][sl], candidate_ids=data["ids"][sl],
                                       candidate_logq=data["logq"][sl], symmetric=symmetric, group=dist.group.WORLD,
                                       backend=backend, ring=ring, capacity=max(sizes) + 2)
            loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[rank] = ((mean_loss / len(sizes)).item(), a.grad.clone(), c.grad.clone(), s.grad.item(),
                         b.grad.item(), reads.reads)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend,ring,sizes", [("reference", False, (5, 8)), ("cpu", False, (4, 7, 5)),
                                                ("cpu", True, (4, 7, 5)), ("chunked", True, (5, 8))])
@pytest.mark.parametrize("symmetric", [False, True])
def test_scale_bias_ids_logq_across_ranks_equal_single_process(backend, ring, sizes, symmetric):
    """A learned scale and bias, candidate ids repeated across ranks (accidental hits on other
    ranks leave the denominators; in the ring, only the first block holds a row's positive) and
    logQ gathered with the candidates: the ranks' mean loss, DDP-averaged gradients of the
    embeddings and of the scale equal one process on the whole batch; the bias's gradient is 0;
    nothing is read back from the device."""
    n = sum(sizes)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    data = {"a": torch.randn(n, 5, generator=g, dtype=torch.float64),
            "c": torch.randn(n, 5, generator=g, dtype=torch.float64),
            "w": torch.rand(n, generator=g, dtype=torch.float64), "m": torch.rand(n, generator=g) < 0.8,
            "ids": torch.randint(0, n // 3, (n,), generator=g), "logq": torch.randn(n, generator=g, dtype=torch.float64)}
    results = mp.Manager().dict()
    mp.spawn(_extras_worker, args=(_free_port(), sizes, backend, ring, symmetric, data, results), nprocs=len(sizes))

    a, c = data["a"].clone().requires_grad_(), data["c"].clone().requires_grad_()
    s = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    ref = contrastive_loss_reference(a, c, logit_scale=s, logit_bias=1.5, anchor_weight=data["w"],
                                     candidate_mask=data["m"], candidate_ids=data["ids"], candidate_logq=data["logq"],
                                     symmetric=symmetric)
    ga, gc, gs = torch.autograd.grad(ref, (a, c, s))
    world, start, scale_grads = len(sizes), 0, []
    for rank, size in enumerate(sizes):
        loss, a_grad, c_grad, s_grad, b_grad, reads = results[rank]
        assert abs(loss - ref.item()) < 1e-10
        sl = slice(start, start + size)
        torch.testing.assert_close(a_grad / world, ga[sl])
        torch.testing.assert_close(c_grad / world, gc[sl])
        assert abs(b_grad) <= (1e-12 if backend == "reference" else 0.0)
        assert reads == [], reads
        scale_grads.append(s_grad)
        start += size
    assert sum(scale_grads) / world == pytest.approx(gs.item(), rel=1e-9, abs=1e-12)


def test_capacity_is_checked_without_a_group():
    a, c = torch.randn(5, 3), torch.randn(5, 3)
    assert torch.equal(cf.contrastive_loss(a, c, capacity=5), cf.contrastive_loss(a, c))
    for bad, error in ((4, ValueError), (0, ValueError), (5.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="capacity"):
            cf.contrastive_loss(a, c, capacity=bad)


# ----------------------------------------------------------------------------- a COURIER training step
STEP_CASES = (("all_gather", True, 8), ("ring", "ring", 8), ("exchanged", True, None))  # name, gather, batch_rows


def _courier_step_rank(rank, port, world_dir, results):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        from courier_fast.training import loop as training
        from courier_fast.data import load_dataset
        from courier_fast.models.methods import build_method

        cfg = training.TrainConfig(data=world_dir, out="unused", encoder="test_efficientnet", embed_dim=32,
                                   batch_size=8, image_size=0, decoder="pil", grad_clip=1.0)
        data = load_dataset(world_dir, tables=("pretrain",))
        batches = list(zip(range(3), training.make_loader(cfg, data, torch.device("cpu"), rank, 2).batches()))
        out = {}
        for name, gather, batch_rows in STEP_CASES:
            torch.manual_seed(0)
            kwargs = {**cfg.method_kwargs(), "gather": gather, "batch_rows": batch_rows}
            method = build_method("courier", data["items"], **kwargs)
            model = torch.nn.parallel.DistributedDataParallel(method)
            optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
            scaler = torch.amp.GradScaler("cpu", enabled=False)
            steps = []
            for step, batch in batches:
                with input_checks(False), HostReads() as reads:  # train()'s setting
                    losses, _ = training.train_step(model, batch, training._step_generator(0, step),
                                                    optimizer, scaler, None, cfg.grad_clip)
                steps.append((reads.reads, {k: v.item() for k, v in losses.items()}))
            out[name] = steps
        with HostReads() as reads:  # the counter counts
            torch.ones(2).sum().item()
        out["deliberate"] = reads.reads
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_courier_training_step_reads_nothing_back(world):
    """Two DDP ranks train CourierModel with train_step: with batch_rows (what train() passes)
    no step reads the device, all-gathered or ring; without it each of the two losses reads
    the ranks' largest size once; the losses are the same either way."""
    results = mp.Manager().dict()
    mp.spawn(_courier_step_rank, args=(_free_port(), world, results), nprocs=2)
    for rank in range(2):
        out = results[rank]
        assert len(out["deliberate"]) == 1 and "_local_scalar_dense" in out["deliberate"][0]
        for name in ("all_gather", "ring"):
            for step, (reads, _) in enumerate(out[name]):
                assert reads == [], f"rank {rank}, {name}, step {step}: {reads}"
        for reads, _ in out["exchanged"]:
            assert len(reads) == 2 and all("largest_rows" in r for r in reads), reads
        for name in ("ring", "exchanged"):  # padded or not, ring or not: the same losses
            for (_, got), (_, want) in zip(out[name], out["all_gather"]):
                assert got.keys() == want.keys() == {"contrastive", "history", "ctr", "loss"}
                for k in want:
                    assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (name, k)
