"""Training's randomness and ranks (issue 31): exact resume with drop path (every rank's RNG
state in the checkpoint), each rank's own augmentation and dropout draws, ranks that agree on
one backend per op and on the resume step, AMP auto on GPUs older than compute capability 8.0,
init_process_group's device_id and timeout, set_deterministic."""
import dataclasses
import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from courier_fast.training import loop as training
from courier_fast.training.loop import TrainConfig, load_checkpoint, train

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"embed_dim": 16, "num_heads": 4, "batch_size": 8, "progress": False, "image_size": 0}
DROP_PATH = {"encoder": "test_vit", "method_options": {"drop_path_rate": 0.3}}  # draws from torch's RNG


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- 1. exact resume
def test_resume_is_exact_with_drop_path(world, tmp_path):
    """8 steps == 4 steps + resume to 8, bitwise, for an encoder with stochastic depth (the
    checkpoint had no RNG state and train() reseeded: 5.8e-4 apart)."""
    cfg = dict(data=world, log_every=1, checkpoint_every=4, lr=1e-3, **SMALL, **DROP_PATH)
    ref = train(TrainConfig(out=str(tmp_path / "ref"), steps=8, **cfg))
    train(TrainConfig(out=str(tmp_path / "run"), steps=4, **cfg))
    got = train(TrainConfig(out=str(tmp_path / "run"), steps=8, resume=True, **cfg))
    a, b = load_checkpoint(ref["checkpoint"]), load_checkpoint(got["checkpoint"])
    assert len(b["rng"]) == 1 and b["rng"][0]["cpu"].dtype == torch.uint8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert ref["last"] == got["last"]


def test_resume_from_a_checkpoint_without_rng_state_warns(world, tmp_path, monkeypatch):
    cfg = dict(data=world, out=str(tmp_path / "run"), lr=1e-3, **SMALL, encoder="test_efficientnet")
    train(TrainConfig(steps=1, **cfg))
    path = os.path.join(cfg["out"], "checkpoint.pt")
    ckpt = load_checkpoint(path)
    del ckpt["rng"]
    torch.save(ckpt, path)
    with pytest.warns(RuntimeWarning, match="no RNG state"):
        assert train(TrainConfig(steps=2, resume=True, **cfg))["step"] == 2


# ----------------------------------------------------------------------------- 2. ranks' draws
def _rank_env(rank, port):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))


def _draws_rank(rank, port, world, out):
    """Two identical 2-step runs; records every augmentation draw and torch's RNG state as each
    step starts (what dropout / drop path draw from)."""
    _rank_env(rank, port)
    from courier_fast.models import augment
    from courier_fast.training import loop as tr

    draws, states = [], []
    draw, step = augment.Augment.draw, tr.train_step

    def recording_draw(self, n, generator=None):
        d = draw(self, n, generator)
        draws.append({k: v.clone() for k, v in d.params.items()})
        return d

    def recording_step(*args, **kwargs):
        states.append(torch.get_rng_state().clone())
        return step(*args, **kwargs)

    augment.Augment.draw, tr.train_step = recording_draw, recording_step
    runs = []
    for name in ("a", "b"):
        tr.train(TrainConfig(data=world, out=os.path.join(out, name), steps=2, lr=1e-3, decoder="pil",
                             **SMALL, **DROP_PATH))
        runs.append((list(draws), list(states)))
        draws.clear()
        states.clear()
    torch.save(runs, os.path.join(out, f"draws{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_draw_their_own_randomness_and_repeat_it(world, tmp_path):
    mp.spawn(_draws_rank, args=(_free_port(), world, str(tmp_path)), nprocs=2)
    runs = [torch.load(tmp_path / f"draws{r}.pt", weights_only=False) for r in range(2)]
    for (draws_a, states_a), (draws_b, states_b) in runs:  # each rank repeats its own draws
        assert len(draws_a) == len(draws_b) == 2 and len(states_a) == 2
        for da, db in zip(draws_a, draws_b):
            for k in da:
                assert torch.equal(da[k], db[k]), k
        assert all(torch.equal(a, b) for a, b in zip(states_a, states_b))
    (draws0, states0), (draws1, states1) = runs[0][0], runs[1][0]
    for d0, d1 in zip(draws0, draws1):  # the ranks' draws differ at every step
        n = min(len(d0["cx"]), len(d1["cx"]))
        assert not torch.equal(d0["cx"][:n], d1["cx"][:n])
    for s0, s1 in zip(states0, states1):
        assert not torch.equal(s0, s1)


# ----------------------------------------------------------------------------- 5. ranks agree
def _agree_rank(rank, port, world, out, checkpoint_dir):
    """Rank 1's self-check fails the cpu and chunked backends (rank 0's passes everything)."""
    _rank_env(rank, port)
    from courier_fast.ops.selfcheck import check as backend_check
    from courier_fast.ops import dispatch
    from courier_fast.ops import registry
    from courier_fast.training import loop as tr

    def verdict(op, backend, device, force=False):
        ok = rank == 0 or backend not in ("cpu", "chunked")
        return {"ok": ok, "worst_error": 0.0 if ok else float("inf"), "reason": "synthetic"}

    backend_check.verdict = verdict
    for op in registry.ops():  # as GPU backends do, the CPU ones validate here
        for name, impl in registry._REGISTRY[op].items():
            if name in ("cpu", "chunked"):
                registry._REGISTRY[op][name] = dataclasses.replace(impl, validate=True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    result = {}
    # train() agrees first: ring=True on a rank left with `reference` raises, so must the other
    # rank, instead of entering the ring and waiting
    try:
        tr.train(TrainConfig(data=world, out=os.path.join(out, "ring"), steps=1, ring=True, decoder="pil",
                             dist_timeout=30, **SMALL, encoder="test_efficientnet"))
        result["ring"] = "trained"
    except Exception as exc:  # noqa: BLE001
        result["ring"] = f"{type(exc).__name__}: {exc}"
    result["agreed"] = backend_check.agree_across_ranks("cpu")
    chosen = {}
    for op in registry.ops():
        fn = dispatch.select(op, "auto", torch.device("cpu"))
        chosen[op] = next(n for n, impl in registry.implementations(op).items() if impl.fn is fn)
    result["chosen"] = chosen
    # a rank that sees another resume step than the others: every rank stops with the same error
    load = tr.load_checkpoint

    def off_by_one(path):
        ckpt = load(path)
        ckpt["step"] += rank
        return ckpt

    tr.load_checkpoint = off_by_one
    try:
        tr.train(TrainConfig(data=world, out=checkpoint_dir, steps=4, resume=True, decoder="pil", **SMALL,
                             encoder="test_efficientnet"))
        result["resume"] = "trained"
    except Exception as exc:  # noqa: BLE001
        result["resume"] = f"{type(exc).__name__}: {exc}"
    torch.save(result, os.path.join(out, f"agree{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_agree_on_backends_and_resume_step(world, tmp_path):
    ckpt_dir = str(tmp_path / "ckpt")
    train(TrainConfig(data=world, out=ckpt_dir, steps=1, **SMALL, encoder="test_efficientnet"))
    context = mp.spawn(_agree_rank, args=(_free_port(), world, str(tmp_path), ckpt_dir), nprocs=2, join=False)
    deadline = time.monotonic() + 300  # a rank left waiting in the ring would time out after 30 s
    while not context.join(timeout=10):  # True once every rank has exited (raises if one failed)
        assert time.monotonic() < deadline, "a rank hangs"
    results = [torch.load(tmp_path / f"agree{r}.pt", weights_only=False) for r in range(2)]
    for r in results:
        assert r["agreed"] == {op: "reference" for op in r["agreed"]}  # the first backend valid on both
        assert set(r["chosen"].values()) == {"reference"}
        assert r["ring"].startswith("ValueError") and "ring=True needs a kernel backend" in r["ring"], r["ring"]
        assert r["resume"].startswith("RuntimeError") and "different steps (1 .. 2)" in r["resume"], r["resume"]


def test_setup_distributed_passes_device_id_and_timeout(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    assert training.setup_distributed("cuda", timeout=5400) == (1, 2)
    (args, kwargs), = calls
    assert args == ("nccl",) and kwargs["device_id"] == torch.device("cuda", 1)
    assert kwargs["timeout"] == datetime.timedelta(seconds=5400)
    calls.clear()
    training.setup_distributed("cpu")
    assert calls == [(("gloo",), {})]  # torch's default timeout, no device


def test_dist_timeout_is_validated(world, tmp_path):
    with pytest.raises(ValueError, match="dist_timeout"):
        TrainConfig(data=world, out=str(tmp_path), dist_timeout=0).validate()


# ----------------------------------------------------------------------------- 4. AMP auto
@pytest.mark.parametrize("capability,dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                              ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_auto_is_fp16_before_compute_capability_8(world, tmp_path, monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cfg = TrainConfig(data=world, out=str(tmp_path))
    assert training._amp_dtype(cfg, torch.device("cuda", 0)) == dtype
    assert training._amp_dtype(cfg, torch.device("cpu")) is None
    cfg.amp = "bf16"
    assert training._amp_dtype(cfg, torch.device("cuda", 0)) == torch.bfloat16  # asked for: kept


# ----------------------------------------------------------------------------- 6. deterministic
def test_set_deterministic_sets_cudnn_torch_and_cublas(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())
    try:
        training.set_deterministic(True)
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[:2]
        torch.use_deterministic_algorithms(before[2])
