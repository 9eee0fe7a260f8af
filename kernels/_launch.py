"""Launch helpers shared by the Triton wrappers in kernels/ (host side; no Triton import)."""
import contextlib
import os

import torch

# Triton reads TRITON_INTERPRET when a kernel is defined, so the mode is fixed at import: the
# one place the package parses it (dispatch, the kernel files and their tests read this).
INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"


def device_guard(t):
    """Context in which a Triton launch targets t's device (Triton launches on the *current*
    CUDA device, which need not be the one holding the tensors, e.g. cuda:1 under DDP when the
    process never called torch.cuda.set_device). A no-op for CPU tensors (the interpreter)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
