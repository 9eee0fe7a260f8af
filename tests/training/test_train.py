"""courier_fast.training.loop (cf.train): outputs, exact resume (in process and after SIGKILL), budgets, validation, 2 ranks."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from courier_fast.data import ImageDecoder, SessionLoader, load_dataset
from courier_fast.training.loop import TrainConfig, load_checkpoint, train
from host_reads import HostReads

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"encoder": "test_efficientnet", "embed_dim": 32, "num_heads": 4, "batch_size": 8, "progress": False,
         "image_size": 0}  # the world's 16 px
TIMING = ("images_per_s", "data_wait_fraction")
# an encoder that draws from torch's RNG (stochastic depth): resume must restore the RNG state
DROP_PATH = {**SMALL, "encoder": "test_vit", "method_options": {"drop_path_rate": 0.3}}


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _assert_same_metrics(a, b):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k not in TIMING} == {k: v for k, v in rb.items() if k not in TIMING}


# ----------------------------------------------------------------------------- outputs
def test_tiny_run_writes_checkpoint_config_and_metrics(world, tmp_path):
    out = str(tmp_path / "run")
    summary = train(TrainConfig(data=world, out=out, steps=6, log_every=2, lr=1e-3, **SMALL))
    assert summary["step"] == 6 and summary["images_seen"] > 0
    for name in ("checkpoint.pt", "config.json", "metrics.jsonl"):
        assert os.path.exists(os.path.join(out, name)), name
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [2, 4, 6]
    for r in rows:
        for key in ("step", "loss", "images_per_s", "data_wait_fraction", "images_seen", "lr"):
            assert key in r, key
        assert np.isfinite(r["loss"]) and r["images_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1
    assert rows[-1]["images_seen"] == summary["images_seen"]
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt["step"] == 6 and ckpt["complete"] and ckpt["method"] == "courier"
    assert ckpt["images_seen"] == summary["images_seen"]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["steps"] == 6


# ----------------------------------------------------------------------------- exact resume
@pytest.fixture(scope="module")
def reference_run(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("reference"))
    train(TrainConfig(data=world, out=out, steps=10, log_every=1, checkpoint_every=4, lr=1e-3, **DROP_PATH))
    return out


@pytest.mark.parametrize("first", [4, 6])  # mid-epoch and at the epoch boundary (6 batches per epoch)
def test_resume_equals_uninterrupted_in_process(world, reference_run, tmp_path, first):
    out = str(tmp_path / "run")
    cfg = dict(data=world, out=out, log_every=1, checkpoint_every=4, lr=1e-3, **DROP_PATH)
    train(TrainConfig(steps=first, **cfg))
    summary = train(TrainConfig(steps=10, resume=True, **cfg))
    assert summary["step"] == 10
    ref, got = load_checkpoint(os.path.join(reference_run, "checkpoint.pt")), load_checkpoint(summary["checkpoint"])
    _assert_same_state(ref["model"], got["model"])
    assert ref["images_seen"] == got["images_seen"]
    for a, b in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
        _assert_same_state(a, b)
    _assert_same_metrics(_metrics(reference_run), _metrics(out))


def _cli(world, out, *extra):
    return [sys.executable, "-m", "courier_fast", "train", "--data", world, "--out", out, "--encoder",
            "test_efficientnet", "--embed-dim", "32", "--batch-size", "8", "--steps", "12", "--checkpoint-every", "4", "--image-size", "0",
            "--lr", "1e-3", "--log-every", "2", "--no-progress", *extra]


# The CLI run that dies: its training module is patched in the child to SIGKILL the process at
# a fixed point, so the kill never depends on timing (no test hook in the package).
_DIE = """
import os, signal, sys
from courier_fast.training import loop as training
from courier_fast.cli import main

point = sys.argv[1]
if point == "after_checkpoint":  # right after checkpoint.pt of step 4 is written
    save = training.save_checkpoint

    def save_checkpoint(state, path):
        save(state, path)
        if state["step"] == 4:
            os.kill(os.getpid(), signal.SIGKILL)

    training.save_checkpoint = save_checkpoint
else:  # "between_checkpoints": as step 7 starts, 2 steps (and a metrics line) past the last checkpoint
    step, done = training.train_step, []

    def train_step(*args, **kwargs):
        if len(done) == 6:
            os.kill(os.getpid(), signal.SIGKILL)
        done.append(1)
        return step(*args, **kwargs)

    training.train_step = train_step
sys.exit(main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def cli_reference(world, tmp_path_factory):
    """An uninterrupted CLI run of _cli's 12 steps."""
    out = str(tmp_path_factory.mktemp("cli_reference"))
    done = subprocess.run(_cli(world, out), env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.parametrize("point", ["after_checkpoint", "between_checkpoints"])
def test_resume_after_sigkill_equals_uninterrupted(world, cli_reference, tmp_path, point):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = str(tmp_path / "killed")
    killed = subprocess.run([sys.executable, "-c", _DIE, point, *_cli(world, out)[3:]], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ckpt["step"] == 4 and not ckpt["complete"]
    logged = [r["step"] for r in _metrics(out)]
    assert logged == ([2, 4] if point == "after_checkpoint" else [2, 4, 6])  # step 6 is logged, not saved
    resumed = subprocess.run(_cli(world, out, "--resume"), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["step"] == 12
    ref = load_checkpoint(os.path.join(cli_reference, "checkpoint.pt"))
    got = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert got["complete"] and got["step"] == 12
    _assert_same_state(ref["model"], got["model"])
    _assert_same_metrics(_metrics(cli_reference), _metrics(out))


# ----------------------------------------------------------------------------- budgets, methods
def test_max_images_budget_stops_training(world, tmp_path):
    out = str(tmp_path / "run")
    summary = train(TrainConfig(data=world, out=out, steps=100, max_images=100, log_every=1, **SMALL))
    assert summary["images_seen"] >= 100 and summary["step"] < 100
    rows = _metrics(out)
    assert rows[-1]["step"] == summary["step"] and rows[-1]["images_seen"] == summary["images_seen"]
    assert all(r["images_seen"] < 100 for r in rows[:-1])  # stopped at the first step reaching it
    assert load_checkpoint(summary["checkpoint"])["complete"]


def test_random_encoder_runs_zero_steps(world, tmp_path):
    out = str(tmp_path / "run")
    summary = train(TrainConfig(data=world, out=out, method="random_encoder", steps=5, **SMALL))
    assert summary["step"] == 0 and summary["images_seen"] == 0
    ckpt = load_checkpoint(summary["checkpoint"])
    assert ckpt["complete"] and ckpt["step"] == 0 and ckpt["method"] == "random_encoder"
    assert any(k.startswith("encoder.") for k in ckpt["model"])
    assert os.path.exists(os.path.join(out, "config.json"))


def test_resume_with_another_method_fails(world, tmp_path):
    out = str(tmp_path / "run")
    train(TrainConfig(data=world, out=out, method="random_encoder", **SMALL))
    with pytest.raises(ValueError, match="random_encoder"):
        train(TrainConfig(data=world, out=out, method="courier", steps=1, resume=True, **SMALL))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_courier_trains_with_amp(world, tmp_path, amp):
    summary = train(TrainConfig(data=world, out=str(tmp_path / "run"), steps=1, amp=amp, **SMALL))
    assert summary["step"] == 1 and np.isfinite(summary["last"]["loss"])


def test_baseline_trains_with_bf16_autocast(world, tmp_path):
    summary = train(TrainConfig(data=world, out=str(tmp_path / "run"), method="simclr", steps=1, amp="bf16", **SMALL))
    assert summary["step"] == 1 and np.isfinite(summary["last"]["loss"])

@pytest.mark.parametrize("field,value,error", [
    ("batch_size", 0, ValueError), ("embed_dim", -1, ValueError), ("method", "x", ValueError),
    ("amp", "fp8", ValueError), ("device", "tpu", ValueError), ("steps", -1, ValueError),
    ("max_images", -5, ValueError), ("data", "/nonexistent/courier/world", FileNotFoundError),
    ("history_len", 0, ValueError), ("pv_len", 0, ValueError), ("temperature", 0.0, ValueError),
    ("grad_clip", -1.0, ValueError), ("ctr_weight", -1.0, ValueError), ("on_error", "ignore", ValueError),
    ("lr_schedule", "step", ValueError), ("backend", "fast", ValueError),
])
def test_config_validation_names_the_field(world, tmp_path, field, value, error):
    kwargs = {"data": world, "out": str(tmp_path / "run"), field: value}
    with pytest.raises(error, match=field):
        TrainConfig(**kwargs).validate()
    with pytest.raises(error, match=field):
        train(kwargs)  # a dict works too
    assert not os.path.exists(tmp_path / "run")


# ----------------------------------------------------------------------------- 2 gloo processes
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_rank(rank, port, world, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    import importlib

    tr = importlib.import_module("courier_fast.training.loop")

    built = []
    build = tr.build_method
    tr.build_method = lambda *a, **k: built.append(build(*a, **k)) or built[-1]
    summary = tr.train(TrainConfig(data=world, out=out, steps=2, log_every=1, lr=1e-2, decoder="pil", **SMALL))
    params = {k: v.detach().clone() for k, v in built[0].named_parameters()}
    torch.save({"summary": summary, "params": params}, os.path.join(out, f"rank{rank}.pt"))


def _true_images(world, steps, ranks=2):
    """Encoder image passes of `steps` steps summed over every rank (distinct items per rank batch)."""
    data = load_dataset(world, tables=("pretrain",))
    total = 0
    for rank in range(ranks):
        loader = SessionLoader(data["items"], data["pretrain"], batch_size=8, seed=0, rank=rank, world_size=ranks,
                               drop_last=True, prefetch=0, decoder=ImageDecoder(backend="pil"))
        for _, b in zip(range(steps), loader.batches()):
            total += b.images.shape[0]
    return total


@pytest.fixture(scope="module")
def two_rank_run(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_train_rank, args=(_free_port(), world, out), nprocs=2)  # raises if a rank fails
    return out


@pytest.mark.distributed
def test_two_rank_training_keeps_ranks_in_sync(two_rank_run):
    out = two_rank_run
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ckpt["complete"] and ckpt["step"] == 2
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(2))
    assert r0["summary"]["step"] == r1["summary"]["step"] == 2
    _assert_same_state(r0["params"], r1["params"])
    for k, v in r0["params"].items():  # rank 0's parameters are the checkpoint's
        assert torch.equal(ckpt["model"][k], v), k
    assert [r["step"] for r in _metrics(out)] == [1, 2]


@pytest.mark.distributed
def test_two_rank_images_seen_counts_both_ranks(world, two_rank_run):
    ckpt = load_checkpoint(os.path.join(two_rank_run, "checkpoint.pt"))
    one_rank = _true_images(world, 2, ranks=2) // 2
    assert ckpt["images_seen"] > 1.5 * one_rank  # both ranks' images, not rank 0's alone


@pytest.mark.distributed
def test_two_rank_images_seen_is_exact(world, two_rank_run):
    ckpt = load_checkpoint(os.path.join(two_rank_run, "checkpoint.pt"))
    r0, r1 = (torch.load(os.path.join(two_rank_run, f"rank{r}.pt"), weights_only=False) for r in range(2))
    assert r0["summary"]["images_seen"] == r1["summary"]["images_seen"] == _true_images(world, 2)
    assert ckpt["images_seen"] == _true_images(world, 2)


def test_each_rank_decodes_on_its_own_gpu(world, tmp_path, monkeypatch):
    """Rank k's loader decodes on cuda:k (checked on CPU with a pretend GPU: nothing is decoded)."""
    from courier_fast.training.loop import make_loader
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = TrainConfig(data=world, out=str(tmp_path / "run"), decoder="pil", **SMALL)
    loader = make_loader(cfg, load_dataset(world, tables=("pretrain",)), torch.device("cuda", 1), rank=1, world=2)
    assert loader.decoder.device == torch.device("cuda", 1)


# ----------------------------------------------------------------------------- options
def _capture_method(monkeypatch):
    """Make train() record the method it builds (and its initial parameters)."""
    import importlib
    tr = importlib.import_module("courier_fast.training.loop")
    built = []
    build = tr.build_method

    def recording(*a, **k):
        m = build(*a, **k)
        built.append((m, {n: p.detach().clone() for n, p in m.named_parameters()}))
        return m

    monkeypatch.setattr(tr, "build_method", recording)
    return built


def test_courier_options_reach_the_loader_and_the_model(world, tmp_path, monkeypatch):
    import importlib
    tr = importlib.import_module("courier_fast.training.loop")
    built, loaders = _capture_method(monkeypatch), []
    make = tr.make_loader
    monkeypatch.setattr(tr, "make_loader", lambda *a, **k: loaders.append(make(*a, **k)) or loaders[-1])
    opts = dict(history_len=3, pv_len=4, temperature=0.2, contrastive_weight=0.5, history_weight=0.0,
                ctr_weight=2.0, backend="reference", ring=True, on_error="skip")
    summary = train(TrainConfig(data=world, out=str(tmp_path / "run"), steps=1, **SMALL, **opts))
    model = built[0][0].model
    assert model.infonce.temperature == 0.2 and model.infonce.gather == "ring"
    assert model.weights == {"contrastive": 0.5, "history": 0.0, "ctr": 2.0}
    assert model.attention.backend == "reference" and model.infonce.backend == "reference"
    loader = loaders[0]
    assert loader.history_len == 3 and loader.pv_len == 4 and loader.decoder.on_error == "skip"
    assert set(summary["last"]) == {"contrastive", "ctr", "loss"}  # history weight 0: not computed
    with open(tmp_path / "run" / "config.json") as f:
        saved = json.load(f)
    assert {k: saved[k] for k in opts} == opts


@pytest.mark.parametrize("method", ["simclr", "clip_titles"])
def test_baseline_loss_options(world, tmp_path, monkeypatch, method):
    built = _capture_method(monkeypatch)
    train(TrainConfig(data=world, out=str(tmp_path / "run"), method=method, steps=1, temperature=0.3,
                      backend="reference", **SMALL))
    m = built[0][0]
    assert m.temperature == 0.3 and m.loss_options == {"backend": "reference", "ring": False}


@pytest.mark.parametrize("field,value,method", [("temperature", 0.1, "category_supervised"),
                                                ("ctr_weight", 0.5, "simclr"), ("ring", True, "random_encoder"),
                                                ("backend", "cpu", "category_supervised")])
def test_option_of_another_method_is_an_error(world, tmp_path, field, value, method):
    with pytest.raises(ValueError, match=field):
        TrainConfig(data=world, out=str(tmp_path / "run"), method=method, **{field: value}).validate()


def test_image_size_defaults_to_224_and_0_keeps_the_stored_size(world, tmp_path):
    from courier_fast.training.loop import make_loader
    data = load_dataset(world, tables=("pretrain",))
    cfg = TrainConfig(data=world, out=str(tmp_path / "run"))
    assert make_loader(cfg, data, torch.device("cpu")).decoder.size == 224
    for stored in (0, None):
        cfg = TrainConfig(data=world, out=str(tmp_path / "run"), image_size=stored)
        assert make_loader(cfg, data, torch.device("cpu")).decoder.size is None


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_lr_schedule(world, tmp_path, schedule):
    import math
    from courier_fast.training.loop import lr_at
    cfg = TrainConfig(data=world, out=str(tmp_path / "run"), lr=1.0, warmup_steps=4, lr_schedule=schedule)
    total = 14
    lrs = [lr_at(cfg, s, total) for s in range(total)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    t = [(s - 4) / 10 for s in range(4, total)]
    want = {"constant": [1.0] * 10, "cosine": [0.5 * (1 + math.cos(math.pi * x)) for x in t],
            "linear": [1 - x for x in t]}[schedule]
    np.testing.assert_allclose(lrs[4:], want)
    assert all(lr > 0 for lr in lrs)
    out = str(tmp_path / "run")
    train(TrainConfig(data=world, out=out, steps=6, log_every=1, lr=1e-2, warmup_steps=2, lr_schedule=schedule,
                      **SMALL))
    cfg = TrainConfig(data=world, out=out, lr=1e-2, warmup_steps=2, lr_schedule=schedule)
    np.testing.assert_allclose([r["lr"] for r in _metrics(out)], [lr_at(cfg, s, 6) for s in range(6)])


def test_grad_clip_bounds_the_update(world, tmp_path, monkeypatch):
    """Adam's first update is lr * g / (|g| + eps): ~lr unclipped, ~lr * 1e-4 with |g| <= 1e-12."""
    built = _capture_method(monkeypatch)
    moved = {}
    for clip in (None, 1e-12):
        train(TrainConfig(data=world, out=str(tmp_path / f"run{clip}"), steps=1, lr=1e-2, warmup_steps=0,
                          grad_clip=clip, **SMALL))
        method, before = built[-1]
        moved[clip] = max((p.detach() - before[n]).abs().max().item() for n, p in method.named_parameters()
                          if p.requires_grad)
    assert moved[None] > 5e-3 and moved[1e-12] < 1e-5
    assert "grad_norm" in _metrics(str(tmp_path / "run1e-12"))[-1]


def test_a_step_reads_nothing_back_beyond_logging(world, tmp_path):
    """Host reads grow with the number of logs and checkpoints, not with the number of steps."""
    counts = {}
    for steps in (2, 6):
        cfg = TrainConfig(data=world, out=str(tmp_path / f"run{steps}"), steps=steps, log_every=steps,
                          checkpoint_every=1000, lr_schedule="cosine", grad_clip=1.0, **SMALL)
        with HostReads() as reads:
            train(cfg)
        counts[steps] = reads.reads
    extra = list(counts[6])
    for r in counts[2]:
        if r in extra:
            extra.remove(r)
    assert len(counts[6]) == len(counts[2]), f"per-step host reads: {extra[:5]}"


def test_non_finite_loss_is_reported_with_its_step_and_never_saved(world, tmp_path, monkeypatch):
    built = _capture_method(monkeypatch)
    import importlib
    tr = importlib.import_module("courier_fast.training.loop")
    build = tr.build_method

    def poisoned(*a, **k):  # the loss of the 3rd step is NaN
        m = build(*a, **k)
        forward, calls = m.forward, []

        def forward_nan(*args, **kwargs):
            out = forward(*args, **kwargs)
            calls.append(1)
            if len(calls) == 3:
                out["loss"] = out["loss"] * float("nan")
            return out

        m.forward = forward_nan
        return m

    monkeypatch.setattr(tr, "build_method", poisoned)
    out = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match="step 3"):
        train(TrainConfig(data=world, out=out, steps=8, log_every=4, checkpoint_every=2, **SMALL))
    assert built and load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 2  # not the NaN model
    assert not os.path.exists(os.path.join(out, "metrics.jsonl")) or _metrics(out) == []
