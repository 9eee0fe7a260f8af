"""courier_fast.training.loop: train(config) (exported as courier_fast.train), resumable, optionally distributed pre-training.

    cfg = TrainConfig(data="world", out="runs/courier", steps=2000)
    summary = courier_fast.train(cfg)          # or: courier-fast train --data world --out runs/courier

Writes into `out`: config.json, metrics.jsonl (one JSON line every `log_every` steps: losses,
lr, images/s, the fraction of time spent waiting for data), checkpoint.pt, replaced
atomically every `checkpoint_every` steps and at the end, and encoder.safetensors (the encoder
alone, at the end; see courier_fast.models.checkpoint). `resume=True` continues from
checkpoint.pt to the same result as an uninterrupted run (bitwise on CPU; on a GPU bitwise only
with deterministic=True, docs/training.md): the data order is a function of (seed, epoch),
augmentation draws from a generator seeded by (seed, step, rank), and model, optimiser and
scaler states and every rank's CPU / CUDA RNG state (dropout, drop path) are restored. Launched
by torchrun (WORLD_SIZE > 1) it joins the process group (NCCL on GPUs, bound to cuda:LOCAL_RANK;
gloo on CPU; timeout `dist_timeout`), shards the rows, wraps the model in DDP and uses every
rank's items as negatives; ranks draw their own random numbers (the rank is folded into the
seeds), agree on one backend per op (courier_fast.ops.selfcheck.check.agree_across_ranks) and on the resume step. AdamW with linear warm-up to `lr`, then constant, cosine or
linear decay to 0 at the last step (`lr_schedule`), optional gradient-norm clipping.

A step (train_step) reads nothing back from the device: losses are materialised and checked for
NaN/Inf every `log_every` steps and before each checkpoint (a non-finite loss is reported with
the step it first appeared at and nothing after it is saved), the ops' data checks are off
while training (courier_fast.set_input_checks), the contrastive losses gather every rank's
batch padded to `batch_size` rows (courier_fast.ops.distributed: no rank needs another's sizes) and,
across ranks, image counts are summed at those points too. Two exceptions: under a `max_images`
budget, which every rank must see reached at the same step, the image count is summed and read
once per step; fp16 AMP's GradScaler reads its overflow flag.

`encoder_micro_batch=K` runs the encoder K images at a time in two passes (courier_fast.training.grad_cache,
GradCache): the encoder's activations are those of K images, the gradients the plain step's (for
encoders without batch-dependent layers; BatchNorm sees K-image batches). Under DDP the chunks'
gradients accumulate locally and are averaged once per step.
"""
import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from courier_fast import _validate
from courier_fast.ops import dispatch
from courier_fast.ops.distributed import setup_distributed
from courier_fast.ops.selfcheck import check as backend_check
from courier_fast.models.checkpoint import CHECKPOINT, ENCODER_FILE, load_checkpoint, save_checkpoint, save_encoder
from courier_fast.data import SessionLoader, load_dataset
from courier_fast.data.decode import ImageDecoder
from courier_fast.data.format import atomic_path
from courier_fast.training.grad_cache import GradCache, average_gradients
from courier_fast.models.methods import METHODS, build_method

METRICS = "metrics.jsonl"
CONTRASTIVE_METHODS = ("courier", "simclr", "clip_titles")  # the ones with an InfoNCE loss
TRAINED_METHODS = ("courier", "simclr", "category_supervised", "clip_titles")  # random_encoder is not
LOSS_WEIGHTS = ("contrastive_weight", "history_weight", "ctr_weight")  # CourierModel's
LR_SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    data: str
    out: str
    method: str = "courier"          # one of courier_fast.models.methods.METHODS
    encoder: str = "resnet18"        # a timm model name
    embed_dim: int = 256
    num_heads: int = 4
    query: str = "learned"           # CourierModel's query mode: learned | target | target_image
    pretrained: str = None           # local backbone weights (all of the backbone's tensors)
    image_size: int = 224            # resize the shorter side and centre-crop (0 or None: the stored size)
    history_len: int = 5             # newest history clicks per row (the paper's 5)
    pv_len: int = None               # page-view slots per row (None: the longest page in the data)
    batch_size: int = 64             # request rows per process and step
    steps: int = None                # optimiser steps (None: `epochs` passes over the pretrain rows)
    epochs: int = 1
    max_images: int = None           # stop once this many encoder image passes are done (a budget)
    lr: float = 1e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 50
    lr_schedule: str = "constant"    # after warm-up: constant | cosine | linear (decay to 0 at the last step)
    grad_clip: float = None          # clip the global gradient norm to this (None: no clipping)
    temperature: float = None        # InfoNCE temperature of courier / simclr / clip_titles (None: the method's)
    contrastive_weight: float = None # courier's loss weights (None: CourierModel's, 1 each)
    history_weight: float = None
    ctr_weight: float = None
    backend: str = "auto"            # contrastive loss / attention backend (courier_fast.backends())
    ring: bool = False               # across ranks, pass negatives around a ring instead of all-gathering
    logq: bool = False               # courier: logQ correction from the items' page-view frequencies
    amp: str = "auto"                # auto (bf16 on a GPU, off on CPU) | bf16 | fp16 | off
    grad_checkpointing: bool = False
    encoder_micro_batch: int = None  # images per encoder forward, exact gradients in two passes (None: one pass)
    freeze_backbone: bool = False
    channels_last: bool = True
    checkpoint_every: int = 200
    log_every: int = 10
    resume: bool = False
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    decoder: str = "auto"            # ImageDecoder backend
    on_error: str = "raise"          # a corrupt image: raise | skip (its slots become padding)
    progress: bool = True
    deterministic: bool = False      # cuDNN / torch deterministic algorithms, fixed cuBLAS workspace (set_deterministic)
    dist_timeout: float = None       # seconds a collective may wait across ranks (None: torch's default)
    method_options: dict = field(default_factory=dict)  # e.g. {"temperature": 0.1}

    def validate(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("batch_size", "embed_dim", "num_heads", "epochs", "checkpoint_every", "log_every",
                     "history_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("pv_len", "temperature", "grad_clip", "dist_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or > 0, got {value}")
        for name in LOSS_WEIGHTS:
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be None or >= 0, got {value}")
        self._only_for(("temperature", "backend", "ring"), CONTRASTIVE_METHODS)
        self._only_for(LOSS_WEIGHTS + ("logq",), ("courier",))
        self._only_for(("encoder_micro_batch",), TRAINED_METHODS)
        if self.encoder_micro_batch is not None:
            _validate.positive_int("encoder_micro_batch", self.encoder_micro_batch)
        choices = {"amp": ("auto", "bf16", "fp16", "off"), "device": ("auto", "cpu", "cuda"),
                   "on_error": ("raise", "skip"), "lr_schedule": LR_SCHEDULES,
                   "backend": ("auto",) + dispatch.BACKENDS}
        for name, options in choices.items():
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {', '.join(options)}; got {getattr(self, name)!r}")
        for name in ("steps", "max_images", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and weight_decay, warmup_steps >= 0")
        if not os.path.isdir(self.data):
            raise FileNotFoundError(f"data: {self.data} is not a directory")

    def _only_for(self, names, methods):
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in names:
            if self.method not in methods and getattr(self, name) != defaults[name]:
                raise ValueError(f"{name} applies to method {' / '.join(methods)}, not {self.method!r}")

    def method_kwargs(self):
        """Arguments of build_method(): the encoder's, the model's, the loss options (those left
        at None take the method's defaults) and method_options."""
        kw = {"encoder": self.encoder, "embed_dim": self.embed_dim, "pretrained": self.pretrained,
              "grad_checkpointing": self.grad_checkpointing, "freeze_backbone": self.freeze_backbone,
              "channels_last": self.channels_last}
        if self.method in CONTRASTIVE_METHODS:
            kw["backend"] = self.backend
            kw["batch_rows"] = self.batch_size  # every rank's batch: its loss gathers without a host read
            if self.temperature is not None:
                kw["temperature"] = self.temperature
        if self.method == "courier":
            kw.update(num_heads=self.num_heads, query=self.query, gather="ring" if self.ring else True)
            kw.update({name: getattr(self, name) for name in LOSS_WEIGHTS if getattr(self, name) is not None})
        elif self.method in CONTRASTIVE_METHODS:
            kw["ring"] = self.ring
        kw.update(self.method_options)
        return kw


def item_log_frequencies(pretrain):
    """(ids (T,) int64 sorted, log frequencies (T,) float32) of the items among every page-view
    slot of the pretrain table: log(count / slots), the sampling probability of an in-batch
    negative (CourierModel's item_logq)."""
    import numpy as np

    shown = pretrain.column("pv_items").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    ids, counts = np.unique(shown.astype(np.int64), return_counts=True)
    return torch.from_numpy(ids), torch.from_numpy(np.log(counts / counts.sum()).astype(np.float32))


def lr_at(cfg, step, total_steps):
    """Learning rate of optimiser step `step` (0-based) of `total_steps`: linear warm-up to cfg.lr
    over cfg.warmup_steps, then constant, or cosine / linear decay towards 0 at total_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.lr * (0.5 * (1 + math.cos(math.pi * t)) if cfg.lr_schedule == "cosine" else 1 - t)


class _ImageCounter:
    """Encoder image passes over every rank: `seen` (exact after flush()) and the current logging
    window's count. With world > 1 each rank's count is summed across ranks at flush() (logs,
    checkpoints), or every step when `every_step` (a max_images budget must stop all ranks at once)."""

    def __init__(self, seen, world, device, every_step):
        self.seen, self.window, self._pending = seen, 0, 0
        self.world, self.device, self.every_step = world, device, every_step

    def add(self, n):
        self._pending += n
        if self.world == 1 or self.every_step:
            self.flush()

    def flush(self):
        n, self._pending = self._pending, 0
        if self.world > 1:
            count = torch.tensor([n], device=self.device)
            dist.all_reduce(count)
            n = int(count)
        self.seen += n
        self.window += n

    def take_window(self):
        self.flush()
        n, self.window = self.window, 0
        return n


def _atomic_write_text(text, path):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _amp_dtype(cfg, device):
    """None (off) or the autocast dtype: amp="auto" is bf16 on GPUs of compute capability >= 8.0
    and fp16 (with the GradScaler) on older ones (V100, T4: no bf16 tensor cores), off on CPU."""
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "auto":
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    if cfg.amp == "fp16":
        return torch.float16
    return torch.bfloat16


def set_deterministic(on=True):
    """Bitwise-repeatable GPU kernels (TrainConfig.deterministic): cuDNN's deterministic
    algorithms without benchmarking, torch.use_deterministic_algorithms, and cuBLAS's fixed
    workspace (CUBLAS_WORKSPACE_CONFIG, unless already set; it must be set before cuBLAS starts).
    Slower; an op without a deterministic kernel raises."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False if on else torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(on)


_RANK_STRIDE = 1 << 22  # torch's CPU generator keeps 32 bits of a seed: 4M steps for each of 1024 ranks


def _step_generator(seed, step, rank=0):
    """The CPU generator of one step's augmentation on `rank`: a function of (seed, step, rank),
    so ranks draw different augmentations and a resumed run draws what it would have drawn.
    The seeds of one run are distinct for steps < 2**22 and ranks < 1024 (the CPU generator
    (mt19937) uses the low 32 bits of a seed)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step + rank * _RANK_STRIDE) % (1 << 32))


def _rank_seed(seed, rank):
    """torch's global seed of `rank` once the model is built (dropout, drop path): rank 0 keeps
    `seed`, others a different one, so ranks draw different masks; a run stays reproducible for a
    given (seed, world size)."""
    return seed if rank == 0 else (seed + rank * 0x9E3779B9) % (1 << 32)  # mt19937 keeps 32 bits


def rng_state(device):
    """This process's RNG state: {"cpu": ByteTensor, "cuda": ByteTensor of `device` or None}."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(device, world):
    """Every rank's rng_state, in rank order (a collective when world > 1: every rank calls it)."""
    mine = rng_state(device)
    if world == 1:
        return [mine]
    states = [None] * world
    dist.all_gather_object(states, mine)
    return [{k: None if v is None else v.cpu() for k, v in s.items()} for s in states]


def _agree_on_step(step, device, world):
    """Every rank's resume step must be the same (e.g. no rank without the shared checkpoint)."""
    if world == 1:
        return
    t = torch.tensor([step, -step], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    hi, lo = int(t[0]), -int(t[1])
    if hi != lo:
        raise RuntimeError(f"resume: the ranks found checkpoints of different steps ({lo} .. {hi}); "
                           f"every rank must read the same checkpoint.pt")


def _truncate_metrics(path, step):
    """Keep the metric lines up to `step` (a resumed run rewrites what came after)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    _atomic_write_text("".join(keep), path)


def make_loader(cfg, data, device, rank=0, world=1):
    """The SessionLoader of `cfg` over data["pretrain"]; it decodes on `device` itself (cuda:k for
    local rank k), not on the default GPU, and pins its batches on CUDA (non-blocking copies)."""
    decoder = ImageDecoder(backend=cfg.decoder, device=device, size=cfg.image_size or None, on_error=cfg.on_error)
    return SessionLoader(data["items"], data["pretrain"], batch_size=cfg.batch_size, history_len=cfg.history_len,
                         pv_len=cfg.pv_len, decoder=decoder, seed=cfg.seed, rank=rank, world_size=world,
                         drop_last=world > 1, pin_memory=device.type == "cuda")


def train_step(model, batch, generator, optimizer, scaler, amp_dtype=None, grad_clip=None, encoder_micro_batch=None):
    """One optimiser step of `model` (a method of courier_fast.models.methods, or its DDP wrapper) on
    `batch` (a SessionBatch on the model's device): forward under autocast in amp_dtype (None:
    off), backward through `scaler` (a torch.amp.GradScaler, enabled for fp16 only), clipping of
    the global gradient norm to grad_clip (None: none), then the optimiser's step.
    encoder_micro_batch: None, or the most images per encoder forward (int > 0): the two passes of
    courier_fast.training.grad_cache (the second under the same autocast, from the scaled loss's embedding
    gradients); under DDP every backward runs in no_sync() and the gradients are averaged once.

    Returns (losses: the method's dict of 0-d tensors, grad_norm: a 0-d tensor or None). Reads
    nothing back from the device, except fp16's GradScaler, which reads its overflow flag."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    cache = None if encoder_micro_batch is None else GradCache(encoder_micro_batch)
    local = model.no_sync() if ddp and cache is not None else contextlib.nullcontext()
    attached = contextlib.nullcontext() if cache is None else cache.attached(model.module if ddp else model)
    autocast = torch.autocast(batch.images.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)
    with local:
        with autocast, attached:
            losses = model(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["loss"]).backward()
        if cache is not None:
            cache.backward()
    if ddp and cache is not None:
        average_gradients(model.parameters(), model.process_group)
    grad_norm = None
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                   grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return losses, grad_norm


def train(config):
    """Pre-train `config.method` on `config.data`/pretrain.parquet; returns a summary dict."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    cfg.validate()
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    if cfg.deterministic:
        set_deterministic(True)
    rank, world = setup_distributed(device.type, cfg.dist_timeout)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and cfg.method in CONTRASTIVE_METHODS and cfg.backend == "auto":
        backend_check.agree_across_ranks(device)  # one backend per op on every rank (the ring needs it)
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, CHECKPOINT)
    metrics_path = os.path.join(cfg.out, METRICS)

    data = load_dataset(cfg.data, tables=("pretrain",))
    items = data["items"]
    loader = make_loader(cfg, data, device, rank, world)
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError(f"data: {cfg.data}/pretrain.parquet has fewer rows than one batch per rank")
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch

    torch.manual_seed(cfg.seed)  # the same initial model on every rank
    extra = {"item_logq": item_log_frequencies(data["pretrain"])} if cfg.logq else {}
    method = build_method(cfg.method, items, **cfg.method_kwargs(), **extra).to(device)
    if rank:
        torch.manual_seed(_rank_seed(cfg.seed, rank))  # this rank's own dropout / drop-path masks
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, images_seen, saved_rng = 0, 0, None
    if cfg.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["method"] != cfg.method:
            raise ValueError(f"resume: {ckpt_path} holds method {ckpt['method']!r}, not {cfg.method!r}")
        try:
            method.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise ValueError(f"resume: {ckpt_path} was trained with a different architecture ({exc})") from exc
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, images_seen = ckpt["step"], ckpt["images_seen"]
        saved_rng = ckpt.get("rng")
        if saved_rng is None or len(saved_rng) != world:
            warnings.warn(f"resume: {ckpt_path} holds no RNG state for {world} rank(s) (an older checkpoint or "
                          f"another world size): dropout and drop path will not repeat the uninterrupted run",
                          RuntimeWarning, stacklevel=2)
            saved_rng = None
        if rank == 0:
            _truncate_metrics(metrics_path, step)
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    if rank == 0:
        _atomic_write_text(json.dumps(dataclasses.asdict(cfg), indent=2), os.path.join(cfg.out, "config.json"))

    _agree_on_step(step, device, world)
    model = method
    if world > 1 and step < total_steps and cfg.method != "random_encoder":
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None)

    images = _ImageCounter(images_seen, world, device, every_step=cfg.max_images is not None)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with a non-finite loss

    def check_finite():  # on every rank together, so that all of them stop
        bad = first_bad
        if world > 1:
            never = torch.iinfo(torch.long).max
            bad = torch.where(bad < 0, never, bad)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            bad = torch.where(bad == never, -1, bad)
        bad = int(bad)
        if bad >= 0:
            raise FloatingPointError(f"loss became NaN or Inf at step {bad} (on some rank); "
                                     f"last checkpoint: {ckpt_path}")

    def save(complete):
        check_finite()
        images.flush()
        rng = gather_rng_states(device, world)  # every rank's, so that a resume draws what this run would
        if rank == 0:
            save_checkpoint({"method": cfg.method, "method_kwargs": cfg.method_kwargs(), "config": dataclasses.asdict(cfg),
                             "encoder": method.encoder.config, "step": step, "images_seen": images.seen,
                             "complete": complete, "model": method.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict(), "rng": rng}, ckpt_path)
            if complete:
                save_encoder(method.encoder, os.path.join(cfg.out, ENCODER_FILE), cfg.image_size or None)
        if world > 1:
            dist.barrier()

    done = lambda: step >= total_steps or (cfg.max_images is not None and images.seen >= cfg.max_images)  # noqa: E731
    if cfg.method == "random_encoder":
        total_steps = step = 0
    bar = None
    if cfg.progress and rank == 0 and not done():
        from tqdm.auto import tqdm
        # under an image budget the step count is not known ahead (the demo passes steps=10**9)
        bar = tqdm(total=None if cfg.max_images is not None else total_steps, initial=step,
                   desc=f"train {cfg.method}", unit="step", dynamic_ncols=True)
    if saved_rng is not None:
        set_rng_state(saved_rng[rank], device)
    method.train()
    window = {"start": time.perf_counter(), "wait": 0.0}
    last = {}
    with _validate.input_checks(False):  # each would read a tensor back every step
        while not done():
            epoch, start_batch = divmod(step, per_epoch)
            loader.set_epoch(epoch)
            batches = loader.batches(start=start_batch)
            while not done():
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                batch = batch.to(device, non_blocking=True)
                window["wait"] += time.perf_counter() - t0
                lr = lr_at(cfg, step, total_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                losses, grad_norm = train_step(model, batch, _step_generator(cfg.seed, step, rank), optimizer, scaler,
                                               amp_dtype, cfg.grad_clip, cfg.encoder_micro_batch)
                images.add(method.images_per_step(batch))
                step += 1
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(losses["loss"].detach()), step, first_bad)
                if step % cfg.log_every == 0 or done():
                    check_finite()
                    last = {k: float(v.detach()) for k, v in losses.items()}
                    if grad_norm is not None:
                        last["grad_norm"] = float(grad_norm)
                    window_images = images.take_window()
                    elapsed = time.perf_counter() - window["start"]
                    row = {"step": step, "epoch": epoch, **last, "lr": lr, "images_seen": images.seen,
                           "images_per_s": window_images / elapsed, "data_wait_fraction": window["wait"] / elapsed}
                    if rank == 0:
                        with open(metrics_path, "a") as f:
                            f.write(json.dumps(row) + "\n")
                    if bar is not None:
                        bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                    window = {"start": time.perf_counter(), "wait": 0.0}
                if bar is not None:
                    bar.update(1)
                if step % cfg.checkpoint_every == 0 and not done():
                    save(complete=False)
            batches.close()
    if bar is not None:
        bar.close()
    save(complete=True)
    images_seen = images.seen
    return {"step": step, "images_seen": images_seen, "checkpoint": ckpt_path, "last": last}
