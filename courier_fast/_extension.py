"""Loads the compiled extension courier_fast._C, or records why it is missing.

The package imports without it: the pure-PyTorch backends always work, and the first import
warns once with the reason and the command that fixes it (also in `courier-fast info` and
build_info()). The extension carries its own build info (the torch it was compiled against,
CUDA architectures, why CUDA is missing) as a marked JSON string, read from the module when
it loads and from the file when it does not (e.g. built against another torch's ABI).
"""
import importlib.machinery
import json
import os
import warnings

import torch

MARKER = b"COURIER_FAST_BUILD_INFO="
REBUILD = "pip install --no-build-isolation --no-deps -e ."

_C = None
LOAD_ERROR = None
BUILD = {}  # the build info recorded in courier_fast._C ({} when there is no binary to read)


def extension_path():
    """The courier_fast._C binary next to this package, or None when it was never built."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(here, "_C" + suffix)
        if os.path.isfile(path):
            return path
    return None


def read_build_info(path):
    """The JSON build info embedded in an extension binary, without loading it ({} if absent)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        start = data.index(MARKER) + len(MARKER)
        return json.loads(data[start:data.index(b"\0", start)].decode())
    except (OSError, ValueError):
        return {}


def load_failure_message(error, build, running_torch, path):
    """The one warning for a missing or unloadable _C: what happened and how to fix it."""
    fallback = "only the pure-PyTorch backends (reference, chunked) are available"
    if path is None:
        return (f"courier_fast: the compiled extension courier_fast._C is not built ({error}); "
                f"{fallback}. Build it from the source checkout: `{REBUILD}` (README, 'Installing').")
    built = build.get("torch")
    if built and built != running_torch:
        return (f"courier_fast: courier_fast._C was compiled against torch {built} but torch "
                f"{running_torch} is running, and it fails to load ({error}); {fallback}. "
                f"Rebuild it against this torch, from the source checkout: `{REBUILD}`")
    return (f"courier_fast: the compiled extension courier_fast._C could not be loaded ({error}); "
            f"{fallback}. Rebuild it from the source checkout: `{REBUILD}`")


try:
    from courier_fast import _C  # noqa: F811  (registers the C++/CUDA ops as a side effect)
    BUILD = json.loads(getattr(_C, "build_info_json", "{}"))
except Exception as exc:  # ImportError, or OSError for an ABI / missing-library problem
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    _path = extension_path()
    BUILD = read_build_info(_path) if _path else {}
    warnings.warn(load_failure_message(LOAD_ERROR, BUILD, torch.__version__, _path),
                  RuntimeWarning, stacklevel=2)
else:
    if BUILD.get("torch") and BUILD["torch"] != torch.__version__:
        # It loaded, but torch's C++ ABI is not stable across releases: say so once.
        warnings.warn(f"courier_fast: courier_fast._C was compiled against torch {BUILD['torch']} but "
                      f"torch {torch.__version__} is running; it loaded, but may misbehave. Rebuild it "
                      f"against this torch, from the source checkout: `{REBUILD}`",
                      RuntimeWarning, stacklevel=2)
    if BUILD.get("cuda_build_error") and torch.cuda.is_available():
        warnings.warn("courier_fast: this install's CUDA sources failed to compile, so the `cuda` "
                      f"backend is unavailable on this GPU (first error: {BUILD['cuda_build_error']}). "
                      f"Rebuild with COURIER_FAST_BUILD_CUDA=1 {REBUILD} to see the whole error.",
                      RuntimeWarning, stacklevel=2)


def loaded() -> bool:
    return _C is not None


def cuda_compiled() -> bool:
    return bool(_C is not None and getattr(_C, "cuda_compiled", False))


def cuda_version():
    """CUDA version the extension was compiled with, as 'major.minor', or None."""
    v = getattr(_C, "cuda_version", None) if _C is not None else None
    return f"{v // 1000}.{(v % 1000) // 10}" if v else None


def compiled_torch_version():
    return BUILD.get("torch")


def torch_mismatch():
    """A message when the extension was built against another torch than the running one."""
    built = compiled_torch_version()
    if built and built != torch.__version__:
        return f"built against torch {built}, running torch {torch.__version__}"
    return None
