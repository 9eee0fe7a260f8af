"""courier_fast.train(config): resumable, optionally distributed pre-training of any method.

    cfg = TrainConfig(data="world", out="runs/courier", steps=2000)
    summary = courier_fast.train(cfg)          # or: courier-fast train --data world --out runs/courier

Writes into `out`: config.json, metrics.jsonl (one JSON line every `log_every` steps: losses,
lr, images/s, the fraction of time spent waiting for data), checkpoint.pt, replaced
atomically every `checkpoint_every` steps and at the end, and encoder.safetensors (the encoder
alone, at the end; see courier_fast.checkpoint). `resume=True` continues from
checkpoint.pt to the same result as an uninterrupted run: the data order is a function of
(seed, epoch), augmentation draws from a generator seeded by (seed, step), and model,
optimiser and scaler states are restored. Launched by torchrun (WORLD_SIZE > 1) it joins the
process group (NCCL on GPUs, gloo on CPU), shards the rows, wraps the model in DDP and uses
every rank's items as negatives. AdamW with linear warm-up to `lr`, then constant.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from courier_fast.checkpoint import CHECKPOINT, ENCODER_FILE, load_checkpoint, save_checkpoint, save_encoder
from courier_fast.data import SessionLoader, load_dataset
from courier_fast.data.decode import ImageDecoder
from courier_fast.data.format import atomic_path
from courier_fast.methods import METHODS, build_method

METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    data: str
    out: str
    method: str = "courier"          # one of courier_fast.methods.METHODS
    encoder: str = "resnet18"        # a timm model name
    embed_dim: int = 256
    num_heads: int = 4
    query: str = "learned"           # CourierModel's query mode: learned | target | target_image
    pretrained: str = None           # local backbone weights
    image_size: int = None           # resize (None = the stored size)
    batch_size: int = 64             # request rows per process and step
    steps: int = None                # optimiser steps (None: `epochs` passes over the pretrain rows)
    epochs: int = 1
    max_images: int = None           # stop once this many encoder image passes are done (a budget)
    lr: float = 1e-4
    weight_decay: float = 1e-6
    warmup_steps: int = 50
    amp: str = "auto"                # auto (bf16 on a GPU, off on CPU) | bf16 | fp16 | off
    grad_checkpointing: bool = False
    freeze_backbone: bool = False
    channels_last: bool = True
    checkpoint_every: int = 200
    log_every: int = 10
    resume: bool = False
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    decoder: str = "auto"            # ImageDecoder backend
    progress: bool = True
    method_options: dict = field(default_factory=dict)  # e.g. {"temperature": 0.1}

    def validate(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("batch_size", "embed_dim", "num_heads", "epochs", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("steps", "max_images", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0 and weight_decay, warmup_steps >= 0")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not os.path.isdir(self.data):
            raise FileNotFoundError(f"data: {self.data} is not a directory")

    def method_kwargs(self):
        """Arguments of build_method(): the encoder's, the model's and method_options."""
        kw = {"encoder": self.encoder, "embed_dim": self.embed_dim, "pretrained": self.pretrained,
              "grad_checkpointing": self.grad_checkpointing, "freeze_backbone": self.freeze_backbone,
              "channels_last": self.channels_last}
        if self.method == "courier":
            kw.update(num_heads=self.num_heads, query=self.query)
        kw.update(self.method_options)
        return kw


def _atomic_write_text(text, path):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def _setup_distributed(device_type):
    """(rank, world) — joins the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _amp_dtype(cfg, device):
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16":
        return torch.float16
    return torch.bfloat16


def _step_generator(seed, step):
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _truncate_metrics(path, step):
    """Keep the metric lines up to `step` (a resumed run rewrites what came after)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    _atomic_write_text("".join(keep), path)


def make_loader(cfg, data, device, rank=0, world=1):
    """The SessionLoader of `cfg` over data["pretrain"]; it decodes on `device` itself (cuda:k for
    local rank k), not on the default GPU."""
    decoder = ImageDecoder(backend=cfg.decoder, device=device, size=cfg.image_size or None)
    return SessionLoader(data["items"], data["pretrain"], batch_size=cfg.batch_size, decoder=decoder, seed=cfg.seed,
                         rank=rank, world_size=world, drop_last=world > 1)


def train(config):
    """Pre-train `config.method` on `config.data`/pretrain.parquet; returns a summary dict."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**config)
    cfg.validate()
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg.device == "auto" else cfg.device)
    rank, world = _setup_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
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

    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method, items, **cfg.method_kwargs()).to(device)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    step, images_seen = 0, 0
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
        if rank == 0:
            _truncate_metrics(metrics_path, step)
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)
    if rank == 0:
        _atomic_write_text(json.dumps(dataclasses.asdict(cfg), indent=2), os.path.join(cfg.out, "config.json"))

    model = method
    if world > 1 and step < total_steps and cfg.method != "random_encoder":
        model = torch.nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None)

    def save(complete):
        if rank == 0:
            save_checkpoint({"method": cfg.method, "method_kwargs": cfg.method_kwargs(), "config": dataclasses.asdict(cfg),
                             "encoder": method.encoder.config, "step": step, "images_seen": images_seen,
                             "complete": complete, "model": method.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict()}, ckpt_path)
            if complete:
                save_encoder(method.encoder, os.path.join(cfg.out, ENCODER_FILE), cfg.image_size or None)
        if world > 1:
            dist.barrier()

    done = lambda: step >= total_steps or (cfg.max_images is not None and images_seen >= cfg.max_images)  # noqa: E731
    if cfg.method == "random_encoder":
        total_steps = step = 0
    bar = None
    if cfg.progress and rank == 0 and not done():
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.method}", unit="step", dynamic_ncols=True)
    method.train()
    window = {"start": time.perf_counter(), "wait": 0.0, "images": 0}
    last = {}
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
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                losses = model(batch, _step_generator(cfg.seed, step))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["loss"]).backward()
            scaler.step(optimizer)
            scaler.update()
            n_img = method.images_per_step(batch)
            if world > 1:  # every rank must stop at the same step: count the global images
                count = torch.tensor([n_img], device=device)
                dist.all_reduce(count)
                n_img = int(count)
            images_seen += n_img
            window["images"] += n_img
            step += 1
            last = {k: float(v.detach()) for k, v in losses.items()}
            if not torch.isfinite(torch.tensor(last["loss"])):
                raise FloatingPointError(f"loss became {last['loss']} at step {step}; last checkpoint: {ckpt_path}")
            if step % cfg.log_every == 0 or done():
                elapsed = time.perf_counter() - window["start"]
                row = {"step": step, "epoch": epoch, **last, "lr": lr, "images_seen": images_seen,
                       "images_per_s": window["images"] / elapsed, "data_wait_fraction": window["wait"] / elapsed}
                if rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                window = {"start": time.perf_counter(), "wait": 0.0, "images": 0}
            if bar is not None:
                bar.update(1)
            if step % cfg.checkpoint_every == 0 and not done():
                save(complete=False)
        batches.close()
    if bar is not None:
        bar.close()
    save(complete=True)
    return {"step": step, "images_seen": images_seen, "checkpoint": ckpt_path, "last": last}
