"""PEP 517 backend: setuptools plus the nvcc that matches the build's torch.

pip installs the static `build-system.requires` (torch among them) first and then asks
`get_requires_for_build_*`; at that point torch is importable, so we can ask for exactly
`nvidia-cuda-nvcc==<torch.version.cuda>.*`. That lets a CPU-only machine whose torch is a
CUDA build compile csrc/cuda/ with no CUDA toolkit installed by hand (DESIGN §6).
COURIER_FAST_BUILD_CUDA=0 skips it.
"""
import os
import platform

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (re-export the whole backend)


def _nvcc_requirement():
    if os.environ.get("COURIER_FAST_BUILD_CUDA", "").strip() == "0":
        return []
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.version.cuda:
        return []
    major, minor = torch.version.cuda.split(".")[:2]
    if int(major) < 13:
        # CUDA 12 wheels are named nvidia-cuda-nvcc-cu12; older ones are not on the registry.
        return [f"nvidia-cuda-nvcc-cu{major}=={major}.{minor}.*"] if major == "12" else []
    # nvcc's own dependencies (cicc in nvidia-nvvm, the crt headers) are not pinned by it: a
    # newer cicc emits PTX that this ptxas rejects, so pin the whole compiler to one version.
    return [f"{pkg}=={major}.{minor}.*" for pkg in ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt")]


def get_requires_for_build_wheel(config_settings=None):
    return _orig.get_requires_for_build_wheel(config_settings) + _nvcc_requirement()


def get_requires_for_build_editable(config_settings=None):
    return _orig.get_requires_for_build_editable(config_settings) + _nvcc_requirement()
