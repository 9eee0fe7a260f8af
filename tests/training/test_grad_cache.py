"""Encoder micro-batching (courier_fast.training.grad_cache through train_step's encoder_micro_batch): the
plain step's gradients in float64 for every trained method; with dropout and stochastic depth, and
with gradient checkpointing, those of a plain step whose encoder runs chunk by chunk with the same
random numbers; under bf16 / fp16 autocast (GradScaler) at most twice the plain step's error; no
host reads; BatchNorm running statistics updated once per chunk; validation, the CLI flag, resume,
and 2 gloo ranks (gathered and ring negatives) with one gradient all-reduce per step."""
import copy
import dataclasses
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from courier_fast.data import ImageDecoder, SessionLoader, load_dataset
from courier_fast.data.decode import imagenet_normalize
from courier_fast.training.grad_cache import chunk_sizes
from courier_fast.models.methods import build_method
from courier_fast.training.loop import TrainConfig, load_checkpoint, train, train_step

pytestmark = pytest.mark.usefixtures("one_thread")

K = 7  # images per encoder forward: the test batch's 40 images make chunks of 5, 7, ..., 7
VIT = {"encoder": "test_vit", "embed_dim": 16, "img_size": 16, "patch_size": 4}  # LayerNorm only
EFFICIENTNET = {"encoder": "test_efficientnet", "embed_dim": 16}  # BatchNorm
DROPOUT = {"drop_path_rate": 0.3, "proj_drop_rate": 0.3, "pos_drop_rate": 0.2}
LOSS_OPTIONS = {"courier": {"backend": "reference", "num_heads": 2}, "simclr": {"backend": "reference"},
                "clip_titles": {"backend": "reference"}, "category_supervised": {}}


def _batch(world, dtype=torch.float64, rank=0, world_size=1):
    """The first batch of 8 rows (40 distinct images of 16 px), ImageNet-normalised in dtype."""
    data = load_dataset(world, tables=("pretrain",))
    loader = SessionLoader(data["items"], data["pretrain"], batch_size=8, seed=0, prefetch=0, rank=rank,
                           world_size=world_size, drop_last=world_size > 1, decoder=ImageDecoder(backend="pil"))
    batch = next(iter(loader.batches()))
    return data["items"], dataclasses.replace(batch, images=imagenet_normalize(batch.images).to(dtype))


def _method(name, items, dtype=torch.float64, encoder=VIT, **kw):
    torch.manual_seed(0)
    return build_method(name, items, **{**encoder, **LOSS_OPTIONS[name], **kw}).to(dtype)


def _step(method, batch, micro_batch, seed=1, amp_dtype=None, scaler=None):
    """(losses, {name: grad}, the stepped copy) of one train_step of a copy of `method`."""
    return _run_step(copy.deepcopy(method), batch, micro_batch, seed, amp_dtype, scaler)


def _run_step(method, batch, micro_batch, seed=1, amp_dtype=None, scaler=None):
    """(losses, {name: grad}, method) of one train_step of `method` (SGD with lr 0), torch seeded
    with `seed`; the step's augmentation draws from a fixed generator."""
    torch.manual_seed(seed)
    scaler = torch.amp.GradScaler("cpu", enabled=False) if scaler is None else scaler
    optimizer = torch.optim.SGD(method.parameters(), lr=0.0)
    losses, _ = train_step(method, batch, torch.Generator().manual_seed(5), optimizer, scaler, amp_dtype,
                           encoder_micro_batch=micro_batch)
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads, method


def _chunked(method, k=K):
    """A copy of `method` whose encoder runs k images at a time with a graph (one plain step
    then draws dropout masks chunk by chunk, as the micro-batched one does). Not to be copied
    again: the copy's forward would still call this one's encoder."""
    method = copy.deepcopy(method)
    forward = method.encoder.forward
    method.encoder.forward = lambda x: torch.cat([forward(c) for c in x.split(chunk_sizes(len(x), k))])
    return method


def _assert_same_grads(got, want, rel):
    assert got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=0, atol=rel * float(g.abs().max()), msg=name)


def _encoder_calls(method):
    """Record (images, output dtype, grad mode) of every encoder forward of `method` (a list,
    filled as it runs)."""
    calls, forward = [], method.encoder.forward

    def recording(x):
        out = forward(x)
        calls.append((x.shape[0], out.dtype, torch.is_grad_enabled()))
        return out

    method.encoder.forward = recording
    return calls


# ----------------------------------------------------------------------------- exact gradients
def test_chunk_sizes_put_the_partial_chunk_first():
    """The kept last chunk is a full one, so pass 2 re-encodes as few images as it can."""
    assert chunk_sizes(899, 256) == [131, 256, 256, 256]
    assert chunk_sizes(512, 256) == [256, 256]
    assert chunk_sizes(3, 256) == [3]
    for n in range(1, 60):
        for k in range(1, 12):
            sizes = chunk_sizes(n, k)
            assert sum(sizes) == n and all(1 <= m <= k for m in sizes) and sizes[1:] == [k] * (len(sizes) - 1)
            assert len(sizes) == math.ceil(n / k)


@pytest.mark.parametrize("name", ["courier", "simclr", "category_supervised", "clip_titles"])
def test_gradients_equal_the_plain_step(world, name):
    items, batch = _batch(world)
    method = _method(name, items)
    want_losses, want, _ = _step(method, batch, None)
    micro = copy.deepcopy(method)
    calls = _encoder_calls(micro)
    losses, got, _ = _run_step(micro, batch, K)
    _assert_same_grads(got, want, 1e-10)
    for k, v in want_losses.items():
        torch.testing.assert_close(losses[k], v, rtol=1e-12, atol=0)
    n = batch.images.shape[0] * (2 if name == "simclr" else 1)  # simclr encodes two views
    chunks = chunk_sizes(n, K)
    assert chunks[0] < K  # a partial chunk, first
    # pass 1: every chunk, the last with a graph (kept); pass 2: the others again, with graphs
    assert [(size, grad) for size, _, grad in calls] == ([(m, False) for m in chunks[:-1]] + [(chunks[-1], True)]
                                                         + [(m, True) for m in chunks[:-1]])


@pytest.mark.parametrize("name", ["courier", "simclr", "category_supervised", "clip_titles"])
def test_augmentation_is_applied_chunk_by_chunk(world, name, monkeypatch):
    """The batch's augmentation is drawn once and applied to each chunk in each pass: no call
    converts or augments more than K images, so the whole float batch never exists."""
    from courier_fast.models.augment import AugmentDraw

    items, batch = _batch(world, dtype=torch.float32)
    batch = dataclasses.replace(batch, images=torch.randint(0, 256, batch.images.shape, dtype=torch.uint8))
    method = _method(name, items, dtype=torch.float32)
    applied, draws, call, draw = [], [], AugmentDraw.__call__, type(method.augment).draw
    monkeypatch.setattr(AugmentDraw, "__call__", lambda self, x, start=0: applied.append((x.dtype, len(x), start))
                        or call(self, x, start))
    monkeypatch.setattr(type(method.augment), "draw", lambda self, n, g=None: draws.append(n) or draw(self, n, g))
    _run_step(method, batch, K)
    n = batch.images.shape[0] * (2 if name == "simclr" else 1)
    sizes = chunk_sizes(n, K)
    chunks = [(torch.float32, size, sum(sizes[:k])) for k, size in enumerate(sizes)]
    assert draws == [batch.images.shape[0]] * (2 if name == "simclr" else 1)
    assert applied == chunks + chunks[:-1]  # pass 2: all chunks but the kept last


@pytest.mark.parametrize("name", ["courier", "simclr"])
def test_dropout_and_stochastic_depth_replay_their_random_numbers(world, name):
    items, batch = _batch(world)
    method = _method(name, items, **DROPOUT)
    _, want, _ = _run_step(_chunked(method), batch, None)
    after_reference = torch.get_rng_state()
    _, got, _ = _step(method, batch, K)
    _assert_same_grads(got, want, 1e-10)
    assert torch.equal(torch.get_rng_state(), after_reference)  # the step leaves the RNG where a plain one does
    _, other, _ = _run_step(_chunked(method), batch, None, seed=2)  # the masks matter: other masks, other gradients
    assert max(float((other[n] - g).abs().max() / g.abs().max()) for n, g in want.items()) > 1e-3


def test_random_numbers_drawn_after_the_encoder_are_kept(world):
    """A loss that draws random numbers after the encoder (dropout in the head): pass 2 replays the
    encoder's and then puts the RNG back where the loss left it."""
    items, batch = _batch(world)
    method = _method("category_supervised", items, **DROPOUT)
    method.classifier = torch.nn.Sequential(torch.nn.Dropout(0.5), method.classifier)
    _, want, _ = _run_step(_chunked(method), batch, None)
    after_reference = torch.get_rng_state()
    _, got, _ = _step(method, batch, K)
    _assert_same_grads(got, want, 1e-10)
    assert torch.equal(torch.get_rng_state(), after_reference)


def test_gradient_checkpointing(world):
    items, batch = _batch(world)
    plain = _method("courier", items, **DROPOUT)
    _, want, _ = _run_step(_chunked(plain), batch, None)
    checkpointed = copy.deepcopy(plain)
    checkpointed.encoder.backbone.set_grad_checkpointing(True)
    _, got, _ = _step(checkpointed, batch, K)
    _assert_same_grads(got, want, 1e-10)


def _error(got, want):
    """max over parameters of max |got - want| / max |want|."""
    return max(float((got[n].double() - w).abs().max() / w.abs().max()) for n, w in want.items())


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16])
def test_autocast_and_grad_scaler(world, amp):
    """Pass 2 runs under pass 1's autocast, and fp16's scaled loss scales the chunks' gradients
    (the step unscales them all): against the float64 step, the micro-batched step's error is at
    most twice the plain step's (both round to amp's precision, in other places)."""
    items, batch = _batch(world, torch.float32)
    method = _method("courier", items, torch.float32)
    _, exact, _ = _step(copy.deepcopy(method).double(), dataclasses.replace(batch, images=batch.images.double()), None)

    def scaler():
        return torch.amp.GradScaler("cpu", init_scale=2.0 ** 6, enabled=amp == torch.float16)

    _, plain, _ = _step(method, batch, None, amp_dtype=amp, scaler=scaler())
    micro = copy.deepcopy(method)
    calls = _encoder_calls(micro)
    _, got, _ = _run_step(micro, batch, K, amp_dtype=amp, scaler=scaler())
    assert all(bool(g.isfinite().all()) for g in got.values())
    assert 0 < _error(got, exact) <= 2 * _error(plain, exact), (_error(got, exact), _error(plain, exact))
    assert {(dtype, grad) for _, dtype, grad in calls} == {(amp, False), (amp, True)}  # both passes autocast


def test_a_micro_batched_step_reads_nothing_back(world):
    from courier_fast._validate import input_checks
    from host_reads import HostReads

    items, batch = _batch(world)
    method = _method("courier", items, **DROPOUT)
    with input_checks(False), HostReads() as reads:  # train()'s setting
        _step(method, batch, K)
    assert reads.reads == [], reads.reads[:3]


# ----------------------------------------------------------------------------- BatchNorm
@pytest.mark.parametrize("checkpointing", [False, True])
def test_batchnorm_running_statistics_updated_once_per_chunk(world, checkpointing):
    items, batch = _batch(world)
    method = _method("courier", items, encoder=EFFICIENTNET, grad_checkpointing=checkpointing)
    before = copy.deepcopy(method.encoder)
    _, want, reference = _run_step(_chunked(method), batch, None)
    _, got, stepped = _step(method, batch, K)
    _assert_same_grads(got, want, 1e-10)  # per-chunk statistics: the chunked plain step's gradients
    images = method.augment(batch.images, torch.Generator().manual_seed(5))  # the step's augmentation
    with torch.no_grad():
        before.backbone.set_grad_checkpointing(False)
        for chunk in images.split(chunk_sizes(len(images), K)):
            before(chunk)
    chunks = math.ceil(batch.images.shape[0] / K)
    counts = [b for n, b in stepped.encoder.named_buffers() if n.endswith("num_batches_tracked")]
    assert counts and all(int(c) == chunks for c in counts)
    for (name, manual), b in zip(before.named_buffers(), stepped.encoder.buffers()):
        torch.testing.assert_close(b, manual, rtol=1e-12, atol=0, msg=name)
    if not checkpointing:  # (a checkpointed plain step's recompute updates the statistics once more)
        for (name, ref), b in zip(reference.encoder.named_buffers(), stepped.encoder.buffers()):
            torch.testing.assert_close(b, ref, rtol=1e-12, atol=0, msg=name)


# ----------------------------------------------------------------------------- config, CLI, train()
SMALL = {"encoder": "test_efficientnet", "embed_dim": 32, "num_heads": 4, "batch_size": 8, "progress": False,
         "image_size": 0}


@pytest.mark.parametrize("value,error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_micro_batch_validation_names_the_argument(world, tmp_path, value, error):
    with pytest.raises(error, match="encoder_micro_batch"):
        TrainConfig(data=world, out=str(tmp_path / "run"), encoder_micro_batch=value).validate()
    items, batch = _batch(world)
    with pytest.raises(error, match="encoder_micro_batch"):
        _step(_method("category_supervised", items), batch, value)
    with pytest.raises(ValueError, match="encoder_micro_batch"):
        TrainConfig(data=world, out=str(tmp_path / "run"), method="random_encoder", encoder_micro_batch=4).validate()


def test_cli_flag(world, tmp_path, monkeypatch, capsys):
    import courier_fast.training.loop as training
    from courier_fast.cli import main

    seen = []
    monkeypatch.setattr(training, "train", lambda cfg: seen.append(cfg) or {})
    assert main(["train", "--data", world, "--out", str(tmp_path / "a"), "--encoder-micro-batch", "16"]) == 0
    assert seen[0].encoder_micro_batch == 16
    assert main(["train", "--data", world, "--out", str(tmp_path / "b")]) == 0
    assert seen[1].encoder_micro_batch is None
    monkeypatch.undo()
    assert main(["train", "--data", world, "--out", str(tmp_path / "c"), "--encoder-micro-batch", "0"]) == 2
    assert "encoder_micro_batch must be > 0" in capsys.readouterr().err


def test_train_resumes_to_the_uninterrupted_run(world, tmp_path):
    """Micro-batching saves nothing new: pass 2 leaves the RNG and the buffers as pass 1 did."""
    cfg = dict(data=world, log_every=1, checkpoint_every=2, lr=1e-3, encoder_micro_batch=10, **SMALL)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), steps=4, **cfg))
    train(TrainConfig(out=str(tmp_path / "parts"), steps=2, **cfg))
    parts = train(TrainConfig(out=str(tmp_path / "parts"), steps=4, resume=True, **cfg))
    a, b = load_checkpoint(whole["checkpoint"]), load_checkpoint(parts["checkpoint"])
    assert a["config"]["encoder_micro_batch"] == 10 and a["step"] == b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# ----------------------------------------------------------------------------- 2 gloo ranks
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank, port, world_dir, results):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        items, batch = _batch(world_dir, rank=rank, world_size=2)
        assert batch.images.shape[0] > 2 * K  # several chunks
        all_reduce, calls = dist.all_reduce, []

        def counting(*a, **k):
            calls.append(1)
            return all_reduce(*a, **k)

        dist.all_reduce = counting
        out = {}
        for gather, micro_batch in ((True, None), (True, K), ("ring", None), ("ring", K)):
            backend = "auto" if gather == "ring" else "reference"  # the ring needs a kernel backend
            method = _method("courier", items, batch_rows=8, gather=gather, backend=backend)
            model = torch.nn.parallel.DistributedDataParallel(method)
            calls.clear()
            _, grads, _ = _run_step(model, batch, micro_batch)
            out[gather, micro_batch] = (grads, len(calls))
        results[rank] = out
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_equal_plain_ddp_with_one_gradient_all_reduce(world):
    """Gathered or ring negatives: a micro-batched DDP step gives plain DDP's gradients, with one
    dist.all_reduce more than the plain step's (its loss's), not one per chunk."""
    results = mp.Manager().dict()
    mp.spawn(_ddp_rank, args=(_free_port(), world, results), nprocs=2)
    for rank in range(2):
        for gather in (True, "ring"):
            want, plain_calls = results[rank][gather, None]  # DDP's own all-reduce is no dist.all_reduce call
            got, calls = results[rank][gather, K]
            _assert_same_grads(got, want, 1e-10)
            assert calls == plain_calls + 1, (gather, calls, plain_calls)  # one all-reduce, not one per chunk
    _assert_same_grads(results[1][True, K][0], results[0][True, K][0], 0)  # the ranks agree
