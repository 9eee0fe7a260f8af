"""Builds courier_fast._C.

C++ CPU ops are always built. The CUDA sources in csrc/cuda/ are built when torch is a CUDA
build and an nvcc whose version matches torch.version.cuda is found (the pip package
nvidia-cuda-nvcc that our build backend requests, CUDA_HOME, PATH or /usr/local/cuda).
COURIER_FAST_BUILD_CUDA=0 skips the CUDA build; =1 makes a missing nvcc an error.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[courier_fast build] {msg}", file=sys.stderr, flush=True)


def _nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _candidate_cuda_homes():
    """Yield directories that may hold bin/nvcc, most specific first."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield os.environ[var]
    major = torch.version.cuda.split(".")[0]
    # pip's nvidia-cuda-nvcc puts nvcc under site-packages/nvidia/cu<major>/ (CUDA >= 13)
    # or site-packages/nvidia/cuda_nvcc/ (CUDA 12); search every sys.path entry.
    for entry in sys.path:
        for sub in (f"nvidia/cu{major}", "nvidia/cuda_nvcc"):
            yield os.path.join(entry, sub)
    which = shutil.which("nvcc")
    if which:
        yield os.path.dirname(os.path.dirname(os.path.realpath(which)))
    yield "/usr/local/cuda"
    yield from sorted(glob.glob("/usr/local/cuda-*"), reverse=True)


def find_cuda_home():
    """Return (cuda_home, reason). cuda_home is None when no usable nvcc was found."""
    if not torch.version.cuda:
        return None, "torch is not a CUDA build"
    want = ".".join(torch.version.cuda.split(".")[:2])
    seen, same_major = set(), None
    for home in _candidate_cuda_homes():
        nvcc = os.path.join(home, "bin", "nvcc")
        if home in seen or not os.path.isfile(nvcc):
            continue
        seen.add(home)
        got = _nvcc_version(nvcc)
        if got == want:
            return home, f"nvcc {got} at {nvcc}"
        if got and got.split(".")[0] == want.split(".")[0] and same_major is None:
            same_major = (home, f"nvcc {got} at {nvcc} (torch wants {want}; same major)")
    if same_major:
        return same_major
    return None, f"no nvcc {want} found (torch.version.cuda = {torch.version.cuda}); looked in {sorted(seen) or 'CUDA_HOME, pip nvidia-cuda-nvcc, PATH, /usr/local/cuda'}"


def _runtime_lib_dir(cuda_home):
    """Directory with libcudart.so.<major> (pip's nvidia-cuda-runtime has no unversioned link)."""
    major = torch.version.cuda.split(".")[0]
    dirs = [os.path.join(cuda_home, d) for d in ("lib64", "lib")]
    dirs += [os.path.join(e, f"nvidia/cu{major}/lib") for e in sys.path]
    dirs += [os.path.join(e, "nvidia/cuda_runtime/lib") for e in sys.path]
    for d in dirs:
        if glob.glob(os.path.join(d, f"libcudart.so.{major}*")):
            return d
    return None


def _pip_cuda_include_dirs(cuda_home):
    """Header dirs of pip's CUDA packages that are not under cuda_home. In pip's isolated build
    env, nvcc (backend requirement) and the runtime/cuBLAS/cuSPARSE headers (torch's own
    dependencies) are installed into two different prefixes."""
    major = torch.version.cuda.split(".")[0]
    dirs = []
    for entry in sys.path:
        inc = os.path.join(entry, f"nvidia/cu{major}/include")
        if os.path.isdir(inc) and not os.path.realpath(inc).startswith(os.path.realpath(cuda_home)):
            dirs.append(inc)
            if os.path.isdir(os.path.join(inc, "cccl")):  # thrust / cub / libcu++ (CUDA >= 13)
                dirs.append(os.path.join(inc, "cccl"))
    return list(dict.fromkeys(dirs))


def build_extension():
    mode = os.environ.get("COURIER_FAST_BUILD_CUDA", "").strip()
    cuda_home, reason = (None, "COURIER_FAST_BUILD_CUDA=0") if mode == "0" else find_cuda_home()
    if cuda_home is None and mode == "1":
        raise RuntimeError(f"COURIER_FAST_BUILD_CUDA=1 but the CUDA build is impossible: {reason}")
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["PATH"] = os.path.join(cuda_home, "bin") + os.pathsep + os.environ.get("PATH", "")
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to ask: build for Hopper (our GPU machines) and embed PTX for newer ones.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
    _log(("CUDA build: " if cuda_home else "CPU-only build: ") + reason)

    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx_flags = ["-O3"]  # the C++ standard comes from torch.utils.cpp_extension (C++20 for torch >= 2.10)
    # The torch the extension is compiled against: a different torch at run time is reported.
    define_macros = [("COURIER_TORCH_VERSION", f'"{torch.__version__}"')]
    if cuda_home:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        major = torch.version.cuda.split(".")[0]
        libdir = _runtime_lib_dir(cuda_home)
        ext = cpp_extension.CUDAExtension(
            "courier_fast._C",
            sources,
            include_dirs=_pip_cuda_include_dirs(cuda_home),
            define_macros=define_macros + [("COURIER_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            libraries=[],  # cudart is linked by its versioned name below
            library_dirs=[libdir] if libdir else [],
            extra_link_args=[f"-l:libcudart.so.{major}"] if libdir else [],
        )
        # CUDAExtension adds `-lcudart`, which needs an unversioned libcudart.so that pip's
        # runtime package lacks; we link the versioned file explicitly instead.
        if libdir:
            ext.libraries = [lib for lib in ext.libraries if lib != "cudart"]
    else:
        ext = cpp_extension.CppExtension(
            "courier_fast._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
        )
    return ext, cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


os.chdir(HERE)
_ext, _build_ext = build_extension()
setup(ext_modules=[_ext], cmdclass={"build_ext": _build_ext})
