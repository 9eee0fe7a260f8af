"""On-disk cache of the opt-in timing autotuner's choices (COURIER_FAST_TRITON_AUTOTUNE=1,
kernels/contrastive_lse.launch), like the self-check verdicts (courier_fast/ops/selfcheck/check.py):
a kernel is timed once per device and software version, not once per process.

One JSON file per environment in the user cache directory (courier_fast.atomic.cache_dir):
{"environment": {...}, "configs": {key: [BLOCK_N, BLOCK_M, num_warps, num_stages]}}. The
environment is the device (name and compute capability; the CPU under the interpreter), torch,
triton, CUDA, the package's version and a hash of the kernel source; any change gives a new file,
so the kernels are timed again. Writes are atomic; a read-only cache only costs a re-tune.
"""
import hashlib
import json
import os
import platform
import warnings

import torch

from courier_fast._metadata import dist_version
from courier_fast.atomic import atomic_path, cache_dir, read_json

_MEMORY: dict = {}  # (cache file, key) -> config, for this process


def _source_hash(source_file):
    with open(source_file, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def environment(device, source_file):
    """What a timing depends on (the cache key)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        name, cap = torch.cuda.get_device_name(index), list(torch.cuda.get_device_capability(index))
    else:
        name, cap = platform.processor() or platform.machine(), None
    return {"device": name, "capability": cap, "torch": torch.__version__, "triton": dist_version("triton"),
            "cuda": torch.version.cuda, "courier_fast": dist_version("courier_fast"),
            "kernel": os.path.basename(source_file), "source": _source_hash(source_file)}


def cache_file(device, source_file):
    env = environment(device, source_file)
    key = hashlib.sha256(json.dumps(env, sort_keys=True).encode()).hexdigest()[:20]
    return os.path.join(cache_dir(), f"autotune-{key}.json"), env


def lookup(device, source_file, key):
    """The cached (BLOCK_N, BLOCK_M, num_warps, num_stages) for key on this device and software,
    or None when it has not been timed here."""
    path, _ = cache_file(device, source_file)
    if (path, key) not in _MEMORY:
        config = ((read_json(path) or {}).get("configs") or {}).get(key)
        if config is None:
            return None
        _MEMORY[(path, key)] = tuple(config)
    return _MEMORY[(path, key)]


def store(device, source_file, key, config):
    """Record the timed choice for key (merged into the environment's file, atomically)."""
    path, env = cache_file(device, source_file)
    _MEMORY[(path, key)] = tuple(config)
    data = read_json(path) or {"environment": env, "configs": {}}
    data.setdefault("configs", {})[key] = list(config)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
    except OSError as exc:
        warnings.warn(f"courier_fast: could not write the autotune cache {path}: {exc}", RuntimeWarning,
                      stacklevel=3)
