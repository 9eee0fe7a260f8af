"""The CUDA toolchain for building courier_fast._C: which pip packages to ask for, which nvcc to
use, which header directories to add and which GPU architectures to compile for.

Used by the PEP 517 backend (courier_build.py: what pip installs into the build environment)
and by setup.py (what the compile uses). Nothing here imports torch: callers pass its
`torch.version.cuda` and arch list, so the build backend can ask for requirements cheaply.
"""
import glob
import os
import re
import shutil
import subprocess
import sys


def major_minor(version):
    """'13.0.96' -> '13.0'; None stays None."""
    return ".".join(str(version).split(".")[:2]) if version else None


def pip_requirements(torch_cuda, system=None, machine=None):
    """The pip packages that make up a CUDA compiler matching torch.version.cuda.

    nvcc's own pieces (cicc in nvidia-nvvm, the crt headers) and the CCCL headers (libcu++'s
    `nv/target`, which cuda_fp16.h includes) are separate packages that nvcc does not pin;
    a newer cicc emits PTX this ptxas rejects and torch <= 2.14 does not pull CCCL, so the
    whole compiler is pinned to torch's CUDA major.minor. [] where no wheels exist.
    """
    import platform

    system = system or platform.system()
    machine = machine or platform.machine()
    if not torch_cuda or system != "Linux" or machine not in ("x86_64", "aarch64"):
        return []
    mm = major_minor(torch_cuda)
    major = mm.split(".")[0]
    if int(major) >= 13:
        pkgs = ("nvidia-cuda-nvcc", "nvidia-nvvm", "nvidia-cuda-crt", "nvidia-cuda-cccl")
    elif major == "12":  # CUDA 12 wheels carry the major in their names
        pkgs = ("nvidia-cuda-nvcc-cu12", "nvidia-cuda-cccl-cu12")
    else:
        return []
    return [f"{pkg}=={mm}.*" for pkg in pkgs]


def nvcc_version(nvcc):
    """'13.0' for an nvcc executable, or None if it does not run."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def _real_home(nvcc):
    """The toolkit directory an nvcc really runs from: nvcc reports its own TOP under --dryrun,
    which sees through wrapper scripts such as /usr/local/bin/nvcc -> /usr/local/cuda-X/bin."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(m.group(1).strip()) if m else None


def _candidate_homes(torch_cuda):
    """Directories that may hold bin/nvcc, most specific first."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield os.environ[var]
    major = torch_cuda.split(".")[0]
    # pip's nvidia-cuda-nvcc puts nvcc under site-packages/nvidia/cu<major>/ (CUDA >= 13) or
    # site-packages/nvidia/cuda_nvcc/ (CUDA 12); search every sys.path entry.
    for entry in sys.path:
        for sub in (f"nvidia/cu{major}", "nvidia/cuda_nvcc"):
            yield os.path.join(entry, sub)
    which = shutil.which("nvcc")
    if which:
        yield os.path.dirname(os.path.dirname(os.path.realpath(which)))
    yield "/usr/local/cuda"
    yield from sorted(glob.glob("/usr/local/cuda-*"), reverse=True)


def find_cuda_home(torch_cuda):
    """(cuda_home, reason): the first nvcc of torch's CUDA major.minor, else one of the same
    major; cuda_home is None (and reason says where we looked) when there is none."""
    want = major_minor(torch_cuda)
    seen, same_major = [], None
    for home in _candidate_homes(torch_cuda):
        nvcc = os.path.join(home, "bin", "nvcc")
        if home in seen or not os.path.isfile(nvcc):
            continue
        seen.append(home)
        got = nvcc_version(nvcc)
        home = _real_home(nvcc) or home
        nvcc = os.path.join(home, "bin", "nvcc")
        if got == want:
            return home, f"nvcc {got} at {nvcc}"
        if got and got.split(".")[0] == want.split(".")[0] and same_major is None:
            same_major = (home, f"nvcc {got} at {nvcc} (torch wants {want}; same major)")
    if same_major:
        return same_major
    where = ", ".join(seen) if seen else "CUDA_HOME, pip's nvidia-cuda-nvcc, PATH, /usr/local/cuda"
    return None, f"no nvcc {want} found for torch's CUDA {torch_cuda} (looked in {where})"


def include_dirs(cuda_home, torch_cuda):
    """Header directories the compile needs beyond cuda_home/include: pip's CUDA packages are
    installed into several prefixes in pip's isolated build env (nvcc and CCCL among the
    build requirements, the runtime/cuBLAS headers with torch), and CCCL (thrust, cub,
    libcu++'s nv/target) lives in include/ or include/cccl depending on the release."""
    major = torch_cuda.split(".")[0]
    roots = [os.path.join(cuda_home, "include")]
    roots += [os.path.join(entry, f"nvidia/cu{major}/include") for entry in sys.path]
    roots += [os.path.join(entry, "nvidia/cuda_cccl/include") for entry in sys.path]  # CUDA 12
    dirs, own = [], os.path.realpath(os.path.join(cuda_home, "include"))
    for root in roots:
        if not os.path.isdir(root):
            continue
        if os.path.realpath(root) != own:  # torch's cpp_extension already adds cuda_home/include
            dirs.append(root)
        if os.path.isdir(os.path.join(root, "cccl")):
            dirs.append(os.path.join(root, "cccl"))
    seen, out = set(), []
    for d in dirs:
        real = os.path.realpath(d)
        if real not in seen:
            seen.add(real)
            out.append(d)
    return out


def has_cccl(cuda_home, torch_cuda):
    """Whether libcu++'s nv/target (needed by cuda_fp16.h since CUDA 13) is on the include path."""
    roots = [os.path.join(cuda_home, "include")] + include_dirs(cuda_home, torch_cuda)
    return any(os.path.isfile(os.path.join(r, "nv", "target")) for r in roots)


def runtime_lib_dir(cuda_home, torch_cuda):
    """Directory with libcudart.so.<major> (pip's nvidia-cuda-runtime has no unversioned link)."""
    major = torch_cuda.split(".")[0]
    dirs = [os.path.join(cuda_home, d) for d in ("lib64", "lib")]
    dirs += [os.path.join(e, f"nvidia/cu{major}/lib") for e in sys.path]
    dirs += [os.path.join(e, "nvidia/cuda_runtime/lib") for e in sys.path]
    for d in dirs:
        if glob.glob(os.path.join(d, f"libcudart.so.{major}*")):
            return d
    return None


def _sm_to_arch(sm):
    """'sm_90' -> '9.0', 'sm_100a' -> '10.0a', 'sm_120' -> '12.0'."""
    m = re.fullmatch(r"(?:sm|compute)_(\d+)(\d)([a-z]?)", sm)
    return f"{m.group(1)}.{m.group(2)}{m.group(3)}" if m else None


def _arch_key(arch):
    m = re.match(r"(\d+)\.(\d+)", arch)
    return (int(m.group(1)), int(m.group(2)), arch)


def nvcc_archs(nvcc):
    """The real architectures this nvcc can emit SASS for, as {'7.5', '8.0', ...}."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {a for a in (_sm_to_arch(tok) for tok in out.split()) if a}


def arch_list(torch_archs, visible_capabilities, supported):
    """TORCH_CUDA_ARCH_LIST to build for when the user set none.

    With GPUs visible: their capabilities. Without: every real architecture torch itself was
    built for (torch.cuda.get_arch_list()) that this nvcc supports, so that a wheel built in a
    GPU-less Docker build runs on A100 (8.0), L4 (8.9), H100 (9.0) and whatever else torch
    runs on. Either way the newest gets PTX too, for GPUs newer than the list.
    """
    if visible_capabilities:
        archs = {f"{a}.{b}" for a, b in visible_capabilities}
    else:
        archs = {a for a in (_sm_to_arch(s) for s in torch_archs if s.startswith("sm_")) if a}
    if supported:
        archs = {a for a in archs if a in supported}
    if not archs:  # torch reported nothing usable: Ampere, Ada and Hopper where nvcc allows
        archs = {a for a in ("8.0", "8.6", "8.9", "9.0") if not supported or a in supported}
    ordered = sorted(archs, key=_arch_key)
    return ";".join(ordered[:-1] + [ordered[-1] + "+PTX"]) if ordered else ""


def first_error_line(log):
    """The first line of a compiler log that reports an error (for build_info), or None."""
    for line in log.splitlines():
        text = line.strip()
        if re.search(r"\berror\b|\bfatal\b", text, re.IGNORECASE) and not text.startswith(("FAILED:", "ninja: build stopped")):
            return text
    return None
