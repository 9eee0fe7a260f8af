"""PEP 517 backend: setuptools plus the CUDA compiler that matches the build's torch.

pip installs the static `build-system.requires` (torch among them) first and then asks
`get_requires_for_build_*`; at that point torch is importable, so we can ask for exactly the
nvcc / nvvm / crt / CCCL packages of `torch.version.cuda` (cuda_toolchain.pip_requirements).
That lets a machine without a CUDA toolkit, GPU or not, compile csrc/cuda/ (docs/install.md).
COURIER_FAST_BUILD_CUDA=0 asks for none of it. With --no-build-isolation these hooks only
report; the environment's own packages are used.
"""
import os
import sys

from setuptools import build_meta as _orig
from setuptools.build_meta import *  # noqa: F401,F403  (re-export the whole backend)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_toolchain  # noqa: E402


def _installed(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cuda_requirements():
    if os.environ.get("COURIER_FAST_BUILD_CUDA", "").strip() == "0":
        return []
    try:
        import torch
    except ImportError:
        return []
    # A package torch already brought (torch 2.15 pulls nvidia-cuda-cccl 13.3 for CUDA 13.2) is
    # not asked for again: a second, pinned version would make pip reject the build environment.
    # setup.py then checks the versions it finds (same CUDA major) and never fails the install.
    return [req for req in cuda_toolchain.pip_requirements(torch.version.cuda)
            if _installed(req.split("==")[0]) is None]


def get_requires_for_build_wheel(config_settings=None):
    return _orig.get_requires_for_build_wheel(config_settings) + _cuda_requirements()


def get_requires_for_build_editable(config_settings=None):
    return _orig.get_requires_for_build_editable(config_settings) + _cuda_requirements()
