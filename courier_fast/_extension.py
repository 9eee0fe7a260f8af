"""Loads the compiled extension courier_fast._C, or records why it is missing.

The package imports without it: the `reference` backend always works, and the first import
warns once with the reason (also shown by `courier-fast info` and build_info()).
"""
import warnings

import torch

_C = None
LOAD_ERROR = None

try:
    from courier_fast import _C  # noqa: F811  (registers the C++/CUDA ops as a side effect)
except Exception as exc:  # ImportError, or OSError for an ABI / missing-library problem
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "courier_fast: the compiled extension courier_fast._C could not be loaded "
        f"({LOAD_ERROR}); only the pure-PyTorch backends are available. "
        "Reinstall with `pip install -e .` (see README) to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def loaded() -> bool:
    return _C is not None


def cuda_compiled() -> bool:
    return bool(_C is not None and getattr(_C, "cuda_compiled", False))


def cuda_version():
    """CUDA version the extension was compiled with, as 'major.minor', or None."""
    v = getattr(_C, "cuda_version", None) if _C is not None else None
    return f"{v // 1000}.{(v % 1000) // 10}" if v else None


def compiled_torch_version():
    return getattr(_C, "torch_version", None) if _C is not None else None


def torch_mismatch():
    """A message when the extension was built against another torch than the running one."""
    built = compiled_torch_version()
    if built and built != torch.__version__:
        return f"built against torch {built}, running torch {torch.__version__}"
    return None
