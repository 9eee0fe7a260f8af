"""Builds courier_fast._C: the C++ ops always, the CUDA sources in csrc/cuda/ when they can be.

CUDA is compiled when torch is a CUDA build and an nvcc of torch's CUDA version is found
(the pip packages our build backend requests, CUDA_HOME, PATH or /usr/local/cuda). If the
CUDA sources cannot be compiled, the install does not fail: a CPU-only _C is built, one
warning is printed, and the compiler's first error line is recorded in the extension
(courier_fast.build_info()["cuda_build_error"], `courier-fast info`).

    COURIER_FAST_BUILD_CUDA=1   the CUDA build must succeed (a missing nvcc or a compile error fails)
    COURIER_FAST_BUILD_CUDA=0   skip CUDA: CPU-only _C
    TORCH_CUDA_ARCH_LIST        architectures (default: the visible GPUs; with none, every
                                architecture torch was built for that nvcc supports, +PTX
                                for the newest)
    COURIER_FAST_SANITIZE=1     add -fsanitize=address,undefined -fno-omit-frame-pointer -g to the
                                C++ compile and link (CPU-only builds; for .ci/sanitize.sh, which
                                runs the op tests with the gcc ASan runtime LD_PRELOADed)
    COURIER_FAST_DEVICE_ASSERTS=1  compile the CUDA kernels' index bound checks
                                (CUDA_KERNEL_ASSERT; a bad segment index then traps loudly)
"""
import contextlib
import glob
import json
import os
import shutil
import sys
import threading

from setuptools import setup

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "_build_backend"))
import cuda_toolchain as toolchain  # noqa: E402

MODE = os.environ.get("COURIER_FAST_BUILD_CUDA", "").strip()
if MODE not in ("", "0", "1"):
    sys.exit(f"COURIER_FAST_BUILD_CUDA must be 0, 1 or unset; got {MODE!r}")


def _log(msg):
    print(f"[courier_fast build] {msg}", file=sys.stderr, flush=True)


def plan_cuda():
    """(cuda_home, nvcc, skip_reason): where nvcc is and which, or why CUDA is not attempted."""
    if MODE == "0":
        return None, None, "COURIER_FAST_BUILD_CUDA=0"
    if not torch.version.cuda:
        return None, None, f"torch {torch.__version__} is a CPU-only build"
    home, reason = toolchain.find_cuda_home(torch.version.cuda)
    if home is None:
        return None, None, reason
    if int(torch.version.cuda.split(".")[0]) >= 13 and not toolchain.has_cccl(home, torch.version.cuda):
        mm = toolchain.major_minor(torch.version.cuda)
        return None, reason, (f"{reason}, but the CCCL headers (nv/target) are missing: "
                              f"pip install 'nvidia-cuda-cccl=={mm}.*'")
    return home, reason, None


def resolve_arch_list():
    """TORCH_CUDA_ARCH_LIST as given, or our default (cuda_toolchain.arch_list)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    torch_archs = torch.cuda.get_arch_list() or torch._C._cuda_getArchFlags().split()
    supported = toolchain.nvcc_archs(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    return toolchain.arch_list(torch_archs, visible, supported)


CUDA_HOME, NVCC, SKIP_REASON = plan_cuda()
if CUDA_HOME is None and MODE == "1":
    raise RuntimeError(f"COURIER_FAST_BUILD_CUDA=1 but the CUDA build is impossible: {SKIP_REASON}")
ARCHS = None
if CUDA_HOME:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = CUDA_HOME
    os.environ["PATH"] = os.path.join(CUDA_HOME, "bin") + os.pathsep + os.environ.get("PATH", "")
    ARCHS = os.environ["TORCH_CUDA_ARCH_LIST"] = resolve_arch_list()
    _log(f"CUDA build: {NVCC}; architectures {ARCHS}")
else:
    _log(f"CPU-only build: {SKIP_REASON}")

from torch.utils import cpp_extension  # noqa: E402  (after CUDA_HOME is set)

CXX_FLAGS = ["-O3"]  # the C++ standard comes from torch.utils.cpp_extension
LINK_FLAGS = []
SANITIZE = os.environ.get("COURIER_FAST_SANITIZE", "").strip() == "1"
if SANITIZE:
    if CUDA_HOME:
        raise RuntimeError("COURIER_FAST_SANITIZE=1 is for CPU-only builds: set COURIER_FAST_BUILD_CUDA=0")
    CXX_FLAGS = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    LINK_FLAGS = ["-fsanitize=address,undefined"]
    _log("sanitizer build: " + " ".join(CXX_FLAGS))
# at::parallel_for is a header template: without -fopenmp it runs its body on the calling thread
# alone, whatever torch.get_num_threads() says (torch's Linux wheels use OpenMP, and ship the
# libgomp.so.1 our module then shares). Every CPU kernel of ours splits its work with it.
OPENMP = sys.platform.startswith("linux") and "OpenMP" in torch.__config__.parallel_info()
if OPENMP:
    CXX_FLAGS.append("-fopenmp")
    LINK_FLAGS.append("-fopenmp")
DEVICE_ASSERTS = os.environ.get("COURIER_FAST_DEVICE_ASSERTS", "").strip() == "1"


def cpu_extension():
    return cpp_extension.CppExtension("courier_fast._C", sorted(glob.glob("csrc/*.cpp")),
                                      extra_compile_args={"cxx": list(CXX_FLAGS)},
                                      extra_link_args=list(LINK_FLAGS))


def cuda_extension():
    major = torch.version.cuda.split(".")[0]
    libdir = toolchain.runtime_lib_dir(CUDA_HOME, torch.version.cuda)
    ext = cpp_extension.CUDAExtension(
        "courier_fast._C",
        sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=toolchain.include_dirs(CUDA_HOME, torch.version.cuda),
        define_macros=[("COURIER_WITH_CUDA", None)] + ([("COURIER_DEVICE_ASSERTS", None)] if DEVICE_ASSERTS else []),
        extra_compile_args={"cxx": list(CXX_FLAGS), "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        library_dirs=[libdir] if libdir else [],
        extra_link_args=[f"-l:libcudart.so.{major}"] if libdir else [],
    )
    # CUDAExtension adds `-lcudart`, which needs an unversioned libcudart.so that pip's
    # runtime package lacks; we link the versioned file explicitly instead.
    if libdir:
        ext.libraries = [lib for lib in ext.libraries if lib != "cudart"]
    return ext


def build_info(cuda_compiled, cuda_build_error=None):
    """What the extension records about its own build (read back by courier_fast._extension,
    also from the file when the extension fails to load)."""
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_compiled": cuda_compiled,
        "nvcc": NVCC,
        "cuda_archs": ARCHS.split(";") if cuda_compiled else [],
        "cuda_build_error": cuda_build_error,
        "cuda_skip_reason": SKIP_REASON,
    }


def write_info_header(directory, info):
    """csrc/courier_fast.cpp includes this generated header: the build info as a C string."""
    os.makedirs(directory, exist_ok=True)
    text = json.dumps(info, sort_keys=True)
    literal = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    with open(os.path.join(directory, "courier_build_info.h"), "w") as f:
        f.write(f"#pragma once\n#define COURIER_BUILD_INFO_JSON {literal}\n")


def _printable(text, limit=500):
    return "".join(c if 32 <= ord(c) < 127 else " " for c in text)[:limit]


@contextlib.contextmanager
def tee_output(log):
    """Pass everything written to fds 1 and 2 (compiler subprocesses included) through to
    stderr while collecting it into log (a list of bytes), to find the first error line."""
    sys.stdout.flush()
    sys.stderr.flush()
    read_fd, write_fd = os.pipe()
    saved = (os.dup(1), os.dup(2))

    def pump():
        while True:
            data = os.read(read_fd, 1 << 16)
            if not data:
                return
            log.append(data)
            os.write(saved[1], data)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    os.dup2(write_fd, 1)
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        thread.join(timeout=30)
        for fd in (read_fd, *saved):
            os.close(fd)


BUILD_FIELDS = ("sources", "include_dirs", "define_macros", "library_dirs", "libraries",
                "runtime_library_dirs", "extra_compile_args", "extra_link_args", "language")


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension plus the build-info header and the CPU-only fallback."""

    def _build(self, info):
        generated = os.path.join(self.build_temp, "generated")
        write_info_header(generated, info)
        ext = self.extensions[0]
        ext.include_dirs = list(ext.include_dirs) + [os.path.abspath(generated)]
        super().build_extensions()

    def build_extensions(self):
        if not CUDA_HOME:
            return self._build(build_info(False))
        compiler, ext = self.compiler, self.extensions[0]
        saved = (compiler.compile, compiler._compile, list(compiler.src_extensions))
        log = []
        try:
            with tee_output(log):
                return self._build(build_info(True))
        except Exception as exc:  # a compiler error, a CUDA-version check, a link failure
            if MODE == "1":
                raise
            text = b"".join(log).decode(errors="replace")
            error = _printable(toolchain.first_error_line(text) or f"{type(exc).__name__}: {exc}")
        compiler.compile, compiler._compile, compiler.src_extensions = saved
        # setuptools has already finalised this Extension object: turn it into the CPU-only one
        # in place, and build it in a separate directory so that no CUDA object is reused.
        cpu = cpu_extension()
        for field in BUILD_FIELDS:
            setattr(ext, field, getattr(cpu, field))
        self.build_temp = os.path.join(self.build_temp, "cpu-only")
        _log("WARNING: the CUDA sources of courier_fast._C failed to compile, so this install "
             "has the CPU ops only (the cuda backend is unavailable; triton and the pure-PyTorch "
             f"backends are unaffected). First error: {error}  -- `courier-fast info` shows it "
             "again; COURIER_FAST_BUILD_CUDA=1 turns this into a build error, =0 skips CUDA.")
        self._build(build_info(False, cuda_build_error=error))


os.chdir(HERE)
setup(ext_modules=[cuda_extension() if CUDA_HOME else cpu_extension()],
      cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)})
