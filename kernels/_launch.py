"""Launch helpers shared by the Triton wrappers in kernels/."""
import contextlib

import torch


def device_guard(t):
    """Context in which a Triton launch targets t's device (Triton launches on the *current*
    CUDA device, which need not be the one holding the tensors, e.g. cuda:1 under DDP when the
    process never called torch.cuda.set_device). A no-op for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
