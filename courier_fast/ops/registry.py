"""What implementations exist: the registry of (op, backend) -> implementation, and which
backends can run on this machine.

Backends: `reference` (plain PyTorch, the ground truth), `cpu` (C++ in courier_fast._C),
`triton` (kernels/), `cuda` (C++/CUDA in courier_fast._C), `chunked` (ATen ops only, any
device, O(N d) memory). Op modules register their implementations with `register`;
courier_fast.ops.dispatch chooses among them and courier_fast.ops.selfcheck.check validates them (both
import this module; it imports neither).
"""
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from courier_fast import _extension

BACKENDS = ("reference", "cpu", "triton", "cuda", "chunked")
AUTO_ORDER = {"cuda": ("cuda", "triton", "chunked", "reference"),
              "cpu": ("cpu", "chunked", "reference")}


@dataclass
class Impl:
    fn: object
    devices: tuple  # device types it accepts: "cpu", "cuda"
    auto: bool = True  # False: runs only when asked for by name
    note: str = ""
    validate: bool = True  # auto picks it only after it passed the self-check on the device
    supports: Optional[Callable] = None  # supports(**probe) -> bool: auto skips it when False


_REGISTRY: dict = {}  # op name -> {backend name -> Impl}; read it through implementations()
_VALIDATOR = None  # validator(op, backend, device) -> bool: installed by courier_fast.ops.selfcheck


def set_validator(fn):
    """Install the function auto asks whether a validate=True backend may run on a device (the
    self-check installs its `trusted` here at import, so dispatch never imports it)."""
    global _VALIDATOR
    _VALIDATOR = fn


_VETOED: set = set()  # (op, backend, str(device)): unusable on some rank (selfcheck.check.agree_across_ranks)


def veto(op, backend, device):
    """Mark `backend` of `op` unusable on `device` for auto, because it failed on another rank."""
    _VETOED.add((op, backend, str(torch.device(device))))


def vetoed(op, backend, device):
    """Whether auto must skip `backend` of `op` on `device` (veto())."""
    return bool(_VETOED) and (op, backend, str(torch.device(device))) in _VETOED


def validated(op, backend, device):
    """Whether the installed validator trusts `backend` of `op` on `device`; False when none is
    installed (auto then takes only backends that need no validation)."""
    return _VALIDATOR is not None and bool(_VALIDATOR(op, backend, device))


def register(op, backend, fn, devices, auto=True, note="", validate=True, supports=None):
    """Register fn as `backend` of `op` on `devices`. validate=True (the default): auto uses it
    only once courier_fast.selftest has checked it against the float64 reference on that device.
    supports(**probe): optional predicate over the call (e.g. shapes) consulted by auto."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = Impl(fn, tuple(devices), auto, note, validate, supports)


def ops():
    return sorted(_REGISTRY)


def implementations(op):
    """{backend name: Impl} registered for op (the live mapping: tests may patch entries)."""
    return _REGISTRY.setdefault(op, {})


def _triton_interpreter() -> bool:
    from courier_fast.kernels._launch import INTERPRET  # the mode the kernels were defined in

    return INTERPRET


def backends():
    """{backend: (available, reason)} for this machine (independent of any one op)."""
    out = {"reference": (True, "plain PyTorch; always available (the ground truth)")}
    if _extension.loaded():
        note = _extension.torch_mismatch()
        out["cpu"] = (True, "C++ ops in courier_fast._C" + (f" (warning: {note})" if note else ""))
    else:
        out["cpu"] = (False, f"courier_fast._C is not loaded: {_extension.LOAD_ERROR}")

    if importlib.util.find_spec("triton") is None:
        out["triton"] = (False, "triton is not installed")
    elif torch.cuda.is_available():
        out["triton"] = (True, f"triton on {torch.cuda.get_device_name()}")
    elif _triton_interpreter():
        out["triton"] = (True, "TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter (slow; for tests)")
    else:
        out["triton"] = (False, "triton is installed but no CUDA GPU is visible (TRITON_INTERPRET=1 runs it on CPU)")

    if not _extension.loaded():
        out["cuda"] = (False, f"courier_fast._C is not loaded: {_extension.LOAD_ERROR}")
    elif not _extension.cuda_compiled():
        build = _extension.BUILD
        why = (f"the CUDA sources failed to compile at build time: {build['cuda_build_error']}"
               if build.get("cuda_build_error") else
               f"courier_fast._C was built without CUDA: {build.get('cuda_skip_reason') or 'unknown reason'}")
        out["cuda"] = (False, why)
    elif not torch.cuda.is_available():
        out["cuda"] = (False, f"compiled for CUDA {_extension.cuda_version()}, but no CUDA GPU is visible")
    else:
        out["cuda"] = (True, f"CUDA {_extension.cuda_version()} kernels on {torch.cuda.get_device_name()}")
    out["chunked"] = (True, "ATen ops only (row tiles, recomputed in backward); any device")
    return out


def op_backends(op):
    """{backend: (usable, reason)} for one op on this machine."""
    status, impls, out = backends(), _REGISTRY.get(op, {}), {}
    for name in BACKENDS:
        if name not in impls:
            out[name] = (False, f"{op} has no {name} implementation yet")
        elif not status[name][0]:
            out[name] = (False, status[name][1])
        else:
            impl = impls[name]
            extra = "" if impl.auto else " (not chosen by auto)"
            extra += " (auto after the self-check)" if impl.auto and impl.validate else ""
            out[name] = (True, (impl.note or status[name][1]) + extra)
    return out


def candidates(op, device, probe=None):
    """Backend names auto may consider for op on device, in order, before validation."""
    impls, status, dev = _REGISTRY.get(op, {}), backends(), device.type
    names = []
    for name in AUTO_ORDER.get(dev, ("reference",)):
        impl = impls.get(name)
        if not (impl and impl.auto and dev in impl.devices and status[name][0]):
            continue
        if probe is not None and impl.supports is not None and not impl.supports(**probe):
            continue
        names.append(name)
    return names
