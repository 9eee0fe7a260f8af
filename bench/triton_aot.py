"""Ahead-of-time compilation of a Triton kernel for an NVIDIA architecture, with no GPU.

The one place that knows how the installed Triton spells it (3.6 - 3.9 checked by reading
their sources; 3.8 run here): triton.compile(ASTSource(fn, signature, constexprs, attrs),
target=GPUTarget("cuda", cc, 32), options={num_warps, num_stages}) gives PTX, TTGIR and a
cubin; Triton's own ptxas -v log (or, where this Triton cannot print it or the kernel came
from its cache, a rerun of its bundled ptxas with its flags) gives registers and spills; the
kernel's metadata gives the shared memory it launches with.
"""
import contextlib
import hashlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_90a": 90}  # A100; A10 / L4 class (8.6, 8.9: 99 KB smem); H100


@dataclass
class Compiled:
    ptx: str
    ttgir: str
    shared_bytes: int
    registers: int
    spill_bytes: int  # spill stores + spill loads reported by ptxas
    stack_bytes: int
    ptxas_log: str


def _ptxas():
    """Path of the ptxas Triton itself uses for sm_80 / sm_90."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        tool = get_ptxas(90)
        return tool.path if hasattr(tool, "path") else tool[0]
    except (ImportError, AttributeError, TypeError):
        here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
        return here


def _attrs(aligned):
    """tt.divisibility=16 on the given argument indices (pointers 16-byte aligned, ints % 16)."""
    return {(i,): [["tt.divisibility", 16]] for i in aligned}


def parse_ptxas(log):
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return (int(regs.group(1)) if regs else -1,
            int(spills.group(1)) + int(spills.group(2)) if spills else 0,
            int(stack.group(1)) if stack else 0)


def compile_kernel(fn, signature, constexprs, arch, num_warps, num_stages, aligned=()):
    """Compile a @triton.jit function (not an Autotuner) for arch ('sm_80' / 'sm_90a').

    signature: {arg name: Triton type ("*bf16", "i32", "fp32", "constexpr")} for every
    argument; constexprs: {name: value}; aligned: names specialised as 16-divisible."""
    index = {name: i for i, name in enumerate(fn.arg_names)}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                    attrs=_attrs(index[a] for a in aligned))
    kernel, log = _compile(src, GPUTarget("cuda", ARCHS[arch], 32),
                           {"num_warps": num_warps, "num_stages": num_stages})
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    if "Used" not in log:  # a Triton cache hit (no ptxas run), or no log knob in this version
        log = ptxas_log(ptx, arch)
    regs, spills, stack = parse_ptxas(log)
    meta = kernel.metadata
    shared = meta.shared if hasattr(meta, "shared") else meta["shared"]
    return Compiled(ptx, ttgir, int(shared), regs, spills, stack, log)


def _compile(src, target, options):
    """(compiled kernel, Triton's own ptxas -v log when this Triton can print it: knob
    triton.knobs.nvidia.dump_ptxas_log, 3.4+; else "")."""
    knobs = getattr(getattr(triton, "knobs", None), "nvidia", None)
    if knobs is None or not hasattr(knobs, "dump_ptxas_log"):
        return triton.compile(src, target=target, options=options), ""
    old, buf = knobs.dump_ptxas_log, io.StringIO()
    knobs.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(buf):
            kernel = triton.compile(src, target=target, options=options)
    finally:
        knobs.dump_ptxas_log = old
    return kernel, buf.getvalue()


def ptxas_log(ptx, arch):
    """ptxas -v output for the PTX (memoised on disk by the PTX's hash: Triton caches its own
    compilations, and re-running ptxas dominates a repeated report)."""
    key = hashlib.sha256((ptx + arch + _ptxas()).encode()).hexdigest()
    memo = os.path.join(tempfile.gettempdir(), "courier_fast_ptxas", key + ".log")
    if os.path.exists(memo):
        with open(memo) as f:
            return f.read()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([_ptxas(), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True)
        if run.returncode != 0:  # older ptxas without --regAllocOptLevel
            run = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "k.o")],
                                 capture_output=True, text=True, check=True)
    os.makedirs(os.path.dirname(memo), exist_ok=True)
    with open(memo + f".{os.getpid()}", "w") as f:
        f.write(run.stderr)
    os.replace(memo + f".{os.getpid()}", memo)
    return run.stderr


def triton_version():
    return triton.__version__
