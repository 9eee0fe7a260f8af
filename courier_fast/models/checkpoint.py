"""Training checkpoints and encoder-only exports: what `train` writes and `embed` reads.

checkpoint.pt (train(), for resuming): a dict of tensors and plain Python values only, loaded
with torch.load(weights_only=True) (no pickled code runs):
    method, method_kwargs, config   the run's method name, build_method() arguments, TrainConfig
    encoder                         ImageEncoder's constructor arguments (encoder_config())
    step, images_seen, complete     progress
    model, optimizer, scaler        state_dicts
    rng                             every rank's RNG state, in rank order: [{"cpu": uint8 tensor,
                                    "cuda": uint8 tensor of its GPU or None}] (gathered at each save;
                                    on resume each rank restores its own, so dropout and drop path
                                    draw what the uninterrupted run would)
encoder.safetensors (save_encoder; train() writes one next to a complete checkpoint.pt): the
ImageEncoder's state_dict alone (backbone.* and head.*, float tensors as trained), with its
constructor arguments and the training image size as JSON in the safetensors metadata.

load_encoder(path) rebuilds only the ImageEncoder from either file: no CTR head, projector or
title vocabulary, nothing from the current item catalogue and no `pretrained` backbone file
(the checkpoint's weights replace it anyway).
"""
import json
import os

import torch

from courier_fast.data.format import atomic_path

CHECKPOINT = "checkpoint.pt"
ENCODER_FILE = "encoder.safetensors"
_PREFIX = "encoder."  # every method registers its ImageEncoder as `.encoder`


def save_checkpoint(state, path):
    """torch.save(state) to `path` atomically (a crash leaves the previous file whole)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path):
    """The dict train() saves (module docstring), read with weights_only=True."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (unpickling raises many types)
        raise ValueError(f"checkpoint: {path} is not a courier_fast checkpoint ({exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "method" not in ckpt:
        raise ValueError(f"checkpoint: {path} is not a courier_fast checkpoint (no model/method)")
    return ckpt


def encoder_config(ckpt):
    """ImageEncoder's constructor arguments of a checkpoint dict (older checkpoints without an
    "encoder" entry: the encoder name, embed_dim and channels_last of their method_kwargs)."""
    if "encoder" in ckpt:
        return dict(ckpt["encoder"])
    kw = ckpt["method_kwargs"]
    return {"encoder": kw["encoder"], "embed_dim": kw["embed_dim"], "channels_last": kw.get("channels_last", True)}


def encoder_state(ckpt):
    """The ImageEncoder's state_dict inside a checkpoint's model state_dict."""
    state = {k[len(_PREFIX):]: v for k, v in ckpt["model"].items() if k.startswith(_PREFIX)}
    if not state:
        raise ValueError(f"checkpoint holds no {_PREFIX}* tensors (method {ckpt.get('method')!r})")
    return state


def save_encoder(encoder, path, image_size=None):
    """An ImageEncoder's weights + constructor arguments + image size -> .safetensors, atomically."""
    from safetensors.torch import save_file

    if not str(path).endswith(".safetensors"):
        raise ValueError(f"encoder path must end with .safetensors, got {str(path)!r}")
    meta = {"format": "courier_fast.encoder/1", "encoder_config": json.dumps(encoder.config),
            "image_size": json.dumps(image_size)}
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata=meta)


def export_encoder(checkpoint, path):
    """checkpoint.pt -> encoder-only .safetensors (the encoder of `courier-fast train`'s run)."""
    encoder, image_size = load_encoder(checkpoint)
    save_encoder(encoder, path, image_size)
    return path


def load_encoder(path):
    """(ImageEncoder in eval mode on the CPU, training image size or None) from checkpoint.pt or
    encoder.safetensors."""
    from courier_fast.models.encoder import ImageEncoder

    path = str(path)
    if path.endswith(".safetensors"):
        config, state, image_size = _read_encoder_file(path)
    else:
        ckpt = load_checkpoint(path)
        config, state = encoder_config(ckpt), encoder_state(ckpt)
        image_size = ckpt.get("config", {}).get("image_size")
    encoder = ImageEncoder(**config)
    try:
        encoder.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"checkpoint: {path} does not fit ImageEncoder({config}) ({exc})") from exc
    return encoder.eval(), image_size or None


def _read_encoder_file(path):
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"encoder: {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own types)
        raise ValueError(f"encoder: {path} is not a safetensors file ({exc})") from exc
    if "encoder_config" not in meta:
        raise ValueError(f"encoder: {path} has no encoder_config metadata (not written by save_encoder)")
    return json.loads(meta["encoder_config"]), state, json.loads(meta.get("image_size", "null"))
