"""Compile evidence and a work model for every GPU kernel of both ops, on a CPU machine.

    python bench/kernel_report.py [--out PATH] [--quick] [--no-cuda] [--jobs N]

Triton: every kernel of kernels/contrastive_lse.py and kernels/reconstruction_attention.py,
for every autotune config (contrastive: config_table() per feature-dim class and input kind) or
every block combination the host can launch (attention: block_options()), every constexpr flag,
bf16 / fp16 inputs and fp32 inputs where the host launches them (d <= FP32_MAX_D, head dim <=
FP32_MAX_HEAD_DIM), compiled ahead of time for sm_80, sm_86 and sm_90a (bench/triton_aot.py). Each row
records registers, spills and shared memory (ptxas -v; Triton's launch metadata), the MMA
instructions of the PTX and their input precision, and every tl.dot of the TTGIR (operand
dtype; whether it became tensor-core MMA).
CUDA: csrc/cuda/*.cu through nvcc -Xptxas -v for sm_80 and sm_90 (slow: minutes on 2 cores;
--no-cuda skips it).
Work model: executed MMA FLOP per forward + backward over the floor, and bytes requested by
the programs over the byte floor, per op and shape class (see work_rows()).

Writes bench/results/static-kernels.json. --quick: the CI subset of triton_tasks().
Nothing here runs a kernel: it is compile evidence, not a measurement.
"""
import argparse
import concurrent.futures
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "_build_backend"))
import cuda_toolchain  # noqa: E402  (the build's own nvcc discovery and header dirs)
import harness  # noqa: E402  (git state of the tree the report is compiled from)

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Opt-in shared memory per block: A100; A10 / A40 / L4 / L40 / RTX 30-40 (sm_86 and sm_89 both
# 99 KB; Triton compiles sm_89 like sm_86 for these kernels); H100.
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_90a": 227 * 1024, "sm_90": 227 * 1024}
TRITON_ARCHS = ("sm_90a", "sm_80", "sm_86")
MMA_DTYPE = {"bf16": "bf16", "f16": "fp16", "tf32": "tf32", "f32": "fp32", "e4m3": "fp8", "e5m2": "fp8"}


# ----------------------------------------------------------------------------- Triton rows
INT_ARGS = {"contrastive_loss": {"N", "M", "D"},
            "reconstruction_attention": {"H", "P", "L", "DH", "causal", "T", "S", "LS", "B", "MAXK", "CHUNK"}}
# the attention segment table and the dK/dV split's tables (kernels/attention_split.py), int64
INDEX_ARGS = {"TROW", "KROW", "TOFF", "KOFF", "ORDER", "PROW", "POFF", "WOFF"}


def _signature(fn, dtype, kind, op):
    """Triton signature of a kernel: input-dtype pointers, fp32 / u8 pointers, i32, fp32, constexpr."""
    el = DTYPES[dtype]
    inputs = {"X", "Y", "Q", "K", "V", "DO"}  # O (attention output) is fp32
    sig = {}
    for name in fn.arg_names:
        if name in kind:
            sig[name] = "constexpr"
        elif name in INT_ARGS[op] or name.startswith("stride_"):
            sig[name] = "i32"
        elif name in ("scale", "sm_scale"):
            sig[name] = "fp32"
        elif name == "id_offset":  # the loss's column of row 0's positive
            sig[name] = "i32"
        elif name in ("X_IDS", "Y_IDS"):  # the loss's candidate ids
            sig[name] = "*i64"
        elif name in inputs:
            sig[name] = f"*{el}"
        elif name == "MASK":
            sig[name] = "*u8"
        elif name in INDEX_ARGS:
            sig[name] = "*i64"
        else:  # norms, biases, LSEs, upstream gradients, fp32 outputs
            sig[name] = "*fp32"
    return sig


def _aligned(sig):
    """Arguments the JIT would specialise as 16-divisible for typical shapes (d % 16 == 0)."""
    ints = {"D", "DH", "stride_x", "stride_y"} | {n for n in sig if n.startswith("stride_") and n != "stride_mb"}
    return [n for n, t in sig.items() if t.startswith("*") or n in ints]


def triton_tasks(quick=False):
    """[(op, kernel name, dtype, constexprs, num_warps, num_stages, class label)]: every variant
    the host code can launch on a GPU. Contrastive: every d class, accidental-hit masking on and
    off (HAS_IDS) and, for the gradients, with and without column terms. quick: per kernel the
    largest feature classes with the first and the last config of each table and every option on
    (contrastive: d = 512 and 1024, the widest accumulator; the last config is the one that fits
    the 99 KB parts; attention: head dim 64 and 256, largest tiles), bf16 only: the subset
    tests/bench/test_kernel_report.py compiles in CI."""
    from courier_fast.kernels import contrastive_lse as lse
    from courier_fast.kernels import reconstruction_attention as attn

    dtypes = ("bfloat16",) if quick else tuple(DTYPES)
    tasks = []
    for cls in ((512, 1024) if quick else lse.D_CLASSES):
        d = 2048 if cls == "split" else cls
        for kernel in ("row_lse", "grad_x", "grad_y"):
            ids = (True,) if quick else (False, True)
            cols = (None,) if kernel == "row_lse" else (True,) if quick else (False, True)
            flags = [{"HAS_IDS": i} if c is None else {"HAS_COLS": c, "HAS_IDS": i} for c in cols for i in ids]
            base = lse.forward_constexprs(d) if kernel == "row_lse" else lse.grad_constexprs(d)
            for dt in dtypes:
                if dt == "float32" and (cls == "split" or cls > lse.FP32_MAX_D):
                    continue  # the host never launches these (kernels/contrastive_lse.py: FP32_MAX_D)
                table = lse.config_table(kernel, cls, fp32=dt == "float32")
                for bn, bm, warps, stages in (sorted(set([table[0], table[-1]]), key=table.index) if quick else table):
                    for flag in flags:
                        cx = {**base, **flag, "DOT_FP32": dt == "float32", "BLOCK_N": bn, "BLOCK_M": bm}
                        tasks.append(("contrastive_loss", kernel, dt, cx, warps, stages, f"d_class={cls}"))
    for block_dh in ((64, 256) if quick else (16, 32, 64, 128, 256)):
        for dt in dtypes:
            if dt == "float32" and block_dh > attn.FP32_MAX_HEAD_DIM:
                continue  # the host never launches these (FP32_MAX_HEAD_DIM)
            p_opts, l_opts = attn.block_options(block_dh, fp32=dt == "float32")
            combos = [(p, l) for p in p_opts for l in l_opts]
            for bp, bl in (combos[-1:] if quick else combos):
                for kernel in ("flash_fwd", "flash_bwd_dkdv", "flash_bwd_dq"):
                    cx = {"DOT_FP32": dt == "float32", "BLOCK_P": bp, "BLOCK_L": bl, "BLOCK_DH": block_dh}
                    warps = attn.num_warps(bp, bl, block_dh, fp32=dt == "float32")
                    tasks.append(("reconstruction_attention", kernel, dt, cx, warps, attn.NUM_STAGES,
                                  f"head_dim<={block_dh}"))
    tasks += short_attention_tasks(dtypes, quick)
    return tasks


def short_attention_tasks(dtypes, quick=False):
    """Every variant of the short-history attention kernels the host launches (short_blocks /
    short_dkdv_blocks over max_keys <= SHORT_MAX_KEYS, any target count, head dims <= 16 and
    above; fp32 at every head dim: these kernels have no MMA). quick: COURIER's shape (L = 5,
    P = 10, head dim 64). Their products are FMA by design (config "products": "fma")."""
    from courier_fast.kernels import attention_split
    from courier_fast.kernels import reconstruction_attention as attn

    keys = (5,) if quick else tuple(2 ** i for i in range(attn.SHORT_MAX_KEYS.bit_length()))
    targets = (10,) if quick else attn.SHORT_BLOCK_P
    dims = (64,) if quick else (16, 64, 256)  # 256: the widest dK/dV phase-2 tile
    tasks = []
    for dt in dtypes:
        seen = set()
        for dh in dims:
            for n in keys:
                bt, bl, bd = attn.short_blocks(n, dh)
                for kernel in ("short_fwd", "short_bwd_dq"):
                    seen.add((kernel, (("BLOCK_T", bt), ("BLOCK_L", bl), ("BLOCK_D", bd))))
            for n_keys in keys:
                for n in targets + (-1,):
                    bl, bp, bd = attn.short_dkdv_blocks(n_keys, n, attention_split.DKDV_MIN_CHUNK)
                    seen.add(("short_bwd_dkdv", (("BLOCK_L", bl), ("BLOCK_P", bp), ("BLOCK_D", bd))))
            bs, bdh = attn.reduce_blocks(dh)  # dK/dV phase 2 (fp32 partials; both families)
            seen.add(("dkdv_reduce", (("BLOCK_S", bs), ("BLOCK_DH", bdh))))
        for kernel, cx in sorted(seen):
            warps = {"short_bwd_dkdv": attn.SHORT_DKDV_WARPS, "dkdv_reduce": attn.REDUCE_WARPS}.get(kernel, attn.SHORT_WARPS)
            tasks.append(("reconstruction_attention", kernel, dt, {**dict(cx), "products": "fma"},
                          warps, attn.NUM_STAGES, "short history"))
    return tasks
    return tasks


def kernel_sources_hash():
    """sha256 of the Triton kernel sources the rows were compiled from."""
    import hashlib
    digest = hashlib.sha256()
    for name in ("contrastive_lse.py", "reconstruction_attention.py", "_mma.py"):
        with open(os.path.join(ROOT, "kernels", name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def _kernel_fn(op, kernel):
    from courier_fast.kernels import contrastive_lse as lse
    from courier_fast.kernels import reconstruction_attention as attn
    mod = lse if op == "contrastive_loss" else attn
    return getattr(mod, f"_{kernel}_kernel")


def mma_instructions(ptx):
    """{instruction shape: input precision} of the PTX's wgmma / mma.sync instructions."""
    found = {}
    for m in re.finditer(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.(\w+)\.(\w+)\.(\w+)", ptx):
        found[f"wgmma.{m.group(1)}.{m.group(3)}"] = MMA_DTYPE.get(m.group(3), m.group(3))
    for m in re.finditer(r"mma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.(\w+)\.(\w+)\.(\w+)\.(\w+)", ptx):
        found[f"mma.sync.{m.group(1)}.{m.group(3)}"] = MMA_DTYPE.get(m.group(3), m.group(3))
    return found


def ttgir_dots(ttgir):
    """[{"operands": dtype, "mma": bool}] for every dot op of the TTGIR."""
    dots = []
    for line in ttgir.splitlines():
        if not re.search(r"= (tt\.dot|ttng\.warp_group_dot) ", line):
            continue
        types = line.split(" : ", 1)[1]
        operand, result = types.split("->", 1)
        el = re.findall(r"\d+x\d+x(\w+)", operand)
        dots.append({"operands": MMA_DTYPE.get(el[0], el[0]) if el else "?", "mma": "#mma" in result})
    return dots


def compile_row(task, arch):
    """One report row (runs in a worker process)."""
    import triton_aot

    op, kernel, dtype, cx, warps, stages, label = task
    fn = _kernel_fn(op, kernel)
    cx_kernel = {k: v for k, v in cx.items() if k != "products"}  # "products": a label, not a constexpr
    sig = _signature(fn, dtype, cx_kernel, op)
    row = {"op": op, "kernel": kernel, "arch": arch, "dtype": dtype,
           "config": {**{k: v for k, v in cx.items()}, "num_warps": warps, "num_stages": stages, "class": label}}
    try:
        c = triton_aot.compile_kernel(fn, sig, cx_kernel, arch, warps, stages, aligned=_aligned(sig))
    except Exception as exc:  # a config that does not compile is a finding, not a crash
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:300]} ... {str(exc)[-300:]}"}
    mma = mma_instructions(c.ptx)
    return {**row, "registers": c.registers, "spills": c.spill_bytes, "stack_bytes": c.stack_bytes,
            "shared_bytes": c.shared_bytes, "mma_precisions": sorted(set(mma.values())),
            "mma_instructions": sorted(mma), "dots": ttgir_dots(c.ttgir)}


def _compile_archs(task):
    return [compile_row(task, arch) for arch in TRITON_ARCHS]


def triton_rows(quick=False, jobs=2):
    tasks = triton_tasks(quick)
    rows = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        for i, pair in enumerate(pool.map(_compile_archs, tasks, chunksize=4)):
            rows += pair
            if (i + 1) % 50 == 0:
                print(f"  compiled {i + 1}/{len(tasks)} kernel variants x {len(TRITON_ARCHS)} archs", flush=True)
    return rows


def problems(row):
    """Why a row (Triton or CUDA) fails the report's bar (empty when it passes)."""
    if "error" in row:
        return [row["error"]]
    out = []
    if row["shared_bytes"] > SMEM_LIMIT[row["arch"]]:
        out.append(f"shared memory {row['shared_bytes']} B > {SMEM_LIMIT[row['arch']]} B")
    if row["spills"]:
        out.append(f"{row['spills']} bytes of register spills")
    if row.get("config", {}).get("products") == "fma":  # CUDA-core products by design: no tl.dot at all
        if row.get("dots"):
            out.append(f"an FMA kernel with tl.dot: {row['dots']}")
    elif row["dtype"] in ("bfloat16", "float16") and row.get("dots") is not None:
        want = DTYPES[row["dtype"]]
        bad = [d for d in row["dots"] if not (d["mma"] and d["operands"] == want)]
        if bad or not row["dots"] or set(row["mma_precisions"]) != {want}:
            out.append(f"GEMMs outside {want} MMA: dots {row['dots']}, PTX MMA {row['mma_precisions']}")
    return out


def _autotune_group(row):
    """Rows among which the loss's autotuner chooses at launch (same kernel, arch, dtype, feature
    class and flags; BLOCK_N / BLOCK_M / warps / stages differ), or None for a kernel with fixed
    tiles (attention, CUDA)."""
    if row["op"] != "contrastive_loss" or row["config"].get("source"):
        return None
    flags = {k: v for k, v in row["config"].items() if k not in ("BLOCK_N", "BLOCK_M", "num_warps", "num_stages")}
    return row["kernel"], row["arch"], row["dtype"], json.dumps(flags, sort_keys=True)


def judge_rows(rows):
    """(failing, pruned_at_launch): every row, Triton and CUDA, against problems(). A loss row whose
    only problem is shared memory over its arch's limit is not a failure when another config of
    its autotune table fits there: Triton's autotuner skips a config that is out of resources
    (sm_86 / sm_89's 99 KB) and picks among the rest; such rows are listed as pruned. A kernel
    with fixed tiles over the limit, or a table with no fitting config, fails."""
    fits = {}
    for r in rows:
        group = _autotune_group(r)
        if group is not None and not problems(r):
            fits[group] = True
    failing, pruned = [], []
    for i, r in enumerate(rows):
        found = problems(r)
        if not found:
            continue
        smem_only = all(p.startswith("shared memory") for p in found)
        if smem_only and fits.get(_autotune_group(r)):
            pruned.append({"row": i, "arch": r["arch"], "kernel": r["kernel"], "problems": found})
        else:
            failing.append({"row": i, "problems": found})
    return failing, pruned


# ----------------------------------------------------------------------------- CUDA rows
CUDA_OPS = {"contrastive_lse_cuda": "contrastive_loss", "attention_core_cuda": "reconstruction_attention"}


def _nvcc():
    """(CUDA home or None, where it was found or looked for): setup.py's own discovery."""
    import torch

    return cuda_toolchain.find_cuda_home(torch.version.cuda or "13.0")


def _cuda_compile(path, home, nvcc):
    """ptxas -v output of one .cu for sm_80 and sm_90 (host code is not compiled further)."""
    import torch
    from torch.utils import cpp_extension

    try:
        includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6
        includes = cpp_extension.include_paths(cuda=True)
    # the build's header dirs: pip's CUDA headers (cuBLAS, cuSPARSE, ... come with torch) and CCCL
    includes = includes + cuda_toolchain.include_dirs(home, torch.version.cuda or "13.0")
    flags = ["-O3", "--expt-relaxed-constexpr", "-std=c++20", "-Xptxas", "-v", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1", *cpp_extension.COMMON_NVCC_FLAGS,
             "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.run([nvcc, *flags, *[f"-I{i}" for i in includes], "-c", path, "-o",
                              os.path.join(tmp, "k.o")], capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(run.stderr[-2000:])
    return run.stderr


def parse_nvcc_ptxas(log, op):
    """Rows from nvcc's ptxas -v log (entry functions only, names demangled)."""
    rows, current = [], None
    names = re.findall(r"Compiling entry function '(\w+)' for '(sm_\d+)'", log)
    demangled = subprocess.run(["c++filt"], input="\n".join(n for n, _ in names), capture_output=True,
                               text=True).stdout.splitlines() if names else []
    pretty = dict(zip((n for n, _ in names), demangled))
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line)
        if m:
            name = pretty.get(m.group(1), m.group(1))
            plain = name.replace("(anonymous namespace)::", "").split("<")[0].split("(")[0]
            kernel = plain.split("::")[-1].split()[-1] if plain.strip() else m.group(1)
            dtype = "float64" if "<double" in name else "float16" if "Half" in name else \
                "bfloat16" if "BFloat16" in name else "float32"
            current = {"op": op, "kernel": kernel, "arch": m.group(2), "dtype": dtype,
                       "config": {"source": "csrc/cuda", "signature": name[:160]},
                       "registers": None, "spills": 0, "shared_bytes": 0, "mma_precisions": []}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spills"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["shared_bytes"] = int(smem.group(1)) if smem else 0
    return rows


def cuda_rows():
    home, found = _nvcc()
    if home is None:
        return [], found
    nvcc = os.path.join(home, "bin", "nvcc")
    rows = []
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))):
        stem = os.path.splitext(os.path.basename(path))[0]
        rows += parse_nvcc_ptxas(_cuda_compile(path, home, nvcc), CUDA_OPS.get(stem, stem))
    return rows, f"nvcc at {nvcc}; GEMMs of the contrastive CUDA backend are cuBLAS calls in fp32 (inputs upcast), not in these rows"


# ----------------------------------------------------------------------------- work model
def _pad(n, block):
    return -(-n // block) * block


def _cdiv(a, b):
    return -(-a // b)


def contrastive_work(n, d, symmetric, elem_bytes=2):
    """Executed MMA FLOP and bytes the programs request (loads + stores, mostly L2 hits) of
    one forward + backward of the Triton loss at N = M = n, for the worst (most padded /
    most traffic) config each autotuner may pick. Floors: 8 N^2 d FLOP; reading x and y twice
    and writing their gradients once."""
    from courier_fast.kernels import contrastive_lse as lse

    cls, e = lse.d_class(d), elem_bytes
    fwd, grad = lse.forward_constexprs(d), lse.grad_constexprs(d)
    passes = 2 if symmetric else 1
    fwd_flop = fwd_bytes = 0
    k = _pad(d, fwd["BLOCK_K"])
    for bn, bm, _, _ in lse.config_table("row_lse", cls):
        programs, tiles = _cdiv(n, bn), _cdiv(n, bm)
        per_tile = bm * k * e + (0 if fwd["ONE_K"] else bn * k * e)
        fwd_flop = max(fwd_flop, passes * programs * tiles * 2 * bn * bm * k)
        fwd_bytes = max(fwd_bytes, passes * programs * (tiles * per_tile + (bn * k * e if fwd["ONE_K"] else 0) + bn * 4))
    # gradients: per column (row) tile, S over every feature (k) and the accumulator's group of
    # NUM_K chunks (dv); each of the groups (1 up to d = MAX_FUSED_D) recomputes S
    k, dv, groups = _pad(d, grad["BLOCK_K"]), grad["NUM_K"] * grad["BLOCK_K"], lse.feature_groups(d)
    bwd_flop = bwd_bytes = 0
    for kernel in ("grad_x", "grad_y"):  # grad_y: programs over column blocks, rows tiled
        flop = nbytes = 0
        for bn, bm, _, _ in lse.config_table(kernel, cls):
            mine, other = (bn, bm) if kernel == "grad_x" else (bm, bn)
            programs, tiles = _cdiv(n, mine) * groups, _cdiv(n, other)
            # ONE_K: the other's tile feeds both GEMMs; else S loads both operands' chunks and the
            # gradient GEMM loads the other's chunks again
            per_tile = other * k * e if grad["ONE_K"] else (mine + other) * k * e + other * dv * e
            own = mine * k * e if grad["ONE_K"] else 0
            flop = max(flop, programs * tiles * 2 * mine * other * (k + dv))
            nbytes = max(nbytes, programs * (tiles * per_tile + own + mine * dv * 4))
        bwd_flop, bwd_bytes = bwd_flop + flop, bwd_bytes + nbytes
    floor_flop, byte_floor = 8 * n * n * d, 2 * n * d * e * 3
    total, total_bytes = fwd_flop + bwd_flop, fwd_bytes + bwd_bytes
    return {"op": "contrastive_loss", "d": d, "symmetric": symmetric, "shape": {"N": n, "M": n},
            "executed_mma_flop": total, "floor_flop": floor_flop, "ratio": round(total / floor_flop, 4),
            "bytes_requested": total_bytes, "byte_floor": byte_floor,
            "byte_ratio": round(total_bytes / byte_floor, 1)}


def attention_work(b, p, length, d, h, elem_bytes=2):
    """Work of one forward + backward at B rows of P targets over L history items, reported for
    the parts separately: the Q/K/V and output projections (ATen GEMMs: executed = floor,
    3 x 2 B (P d^2 + 2 L d^2 + P d^2)) and the fused Triton core against its floor 12 B P L d
    (QK^T and PV forward, four products backward), as the host launches it:
      short rows (L <= SHORT_MAX_KEYS): the packed kernels' FMA products (counted like MMA FLOP):
        forward QK, PV and dQ pass QK, dO V, dS K over BLOCK_L key slots per target (B P targets
        padded to BLOCK_T), dK/dV pass P^T dO, dS^T Q over each key's row's P targets in BLOCK_P
        steps over BLOCK_L key slots per piece; head dims padded to BLOCK_D.
      longer rows: the flash kernels' MMA tiles (forward 2 GEMMs, backward 7: dK/dV kernel S,
        dV, dP, dK; dQ kernel S, dP, dQ) on targets and keys padded to the GPU's blocks.
      Both families' dK/dV pass runs per piece (a row's chunk of <= target_chunk(B P, B) targets,
      kernels/attention_split.py): each piece's targets padded to BLOCK_P (the phase-2 sum of
      partials, O(pieces L dh) adds, is not counted).
    cuda_core: the CUDA core (FMA on exactly the existing (target, key) pairs: forward 2, dQ 3,
    dK/dV 4 products; head dim padded to the lanes, 32 per value per lane)."""
    from courier_fast.kernels import attention_split
    from courier_fast.kernels import reconstruction_attention as attn

    dh = d // h
    chunk = attention_split.target_chunk(b * p, b)
    pieces = [min(chunk, p - c) for c in range(0, p, chunk)]  # each row's pieces (targets)
    if attn.short_history(length):
        bt, bl, bd = attn.short_blocks(length, dh)
        bl_kv, bp, bd_kv = attn.short_dkdv_blocks(length, p, chunk)
        per_slot = 2 * _pad(dh, bd)  # FLOP of one product for one (target, key slot) pair
        dkdv = b * sum(_pad(n, bp) for n in pieces) * bl_kv * 2 * 2 * _pad(dh, bd_kv)
        core = h * (5 * _pad(b * p, bt) * bl * per_slot + dkdv)
        blocks, products = {"BLOCK_T": bt, "BLOCK_L": bl, "BLOCK_D": bd, "BLOCK_P": bp}, "fma"
    else:
        bp, bl, bdh = attn.blocks(p, length, dh, gpu=True)
        dkdv = 4 * 2 * b * h * sum(_pad(n, bp) for n in pieces) * _pad(length, bl) * bdh
        core = 5 * 2 * b * h * _pad(p, bp) * _pad(length, bl) * bdh + dkdv
        blocks, products = {"BLOCK_P": bp, "BLOCK_L": bl, "BLOCK_DH": bdh}, "mma"
    proj = 3 * 2 * b * (p * d * d + length * 2 * d * d + p * d * d)
    core_floor = 12 * b * p * length * d
    cuda = 9 * 2 * b * h * p * length * 32 * -(-dh // 32)
    io = (b * p * d + b * length * d) * elem_bytes
    return {"op": "reconstruction_attention", "d": d, "symmetric": None,
            "shape": {"B": b, "P": p, "L": length, "h": h, "blocks": blocks},
            "core": {"products": products, "executed_flop": core, "floor_flop": core_floor,
                     "ratio": round(core / core_floor, 4)},
            "cuda_core": {"products": "fma", "executed_flop": cuda, "floor_flop": core_floor,
                          "ratio": round(cuda / core_floor, 4)},
            "projections": {"products": "mma", "executed_flop": proj, "floor_flop": proj, "ratio": 1.0},
            "executed_flop": core + proj, "floor_flop": core_floor + proj,
            "ratio": round((core + proj) / (core_floor + proj), 4),
            "bytes_requested": None, "byte_floor": 3 * io, "byte_ratio": None}


def official_pattern_work(b, p, length, d, h, elem_bytes=2):
    """The official COURIER call (each target's history row copied: mha(q, hist[idx], hist[idx]))
    against the same call with history_index, forward + backward, by arithmetic (the GPU side of
    the README's comparison; the CPU side is measured by bench_attention.py). Both run the same Q
    and output projections and core; the official call projects K and V on B P L copied rows
    instead of B L rows (3 x 2 x rows x d x 2d FLOP) and keeps the copies and their projections
    (4 B P L d elements) where ours keeps the projections once (2 B L d)."""
    t = b * p
    shared = 3 * 2 * t * d * d * 2 + 12 * t * length * d  # Q + out projections, core floor
    official = {"flop": shared + 3 * 2 * t * length * d * 2 * d, "kv_bytes": 4 * t * length * d * elem_bytes}
    ours = {"flop": shared + 3 * 2 * b * length * d * 2 * d, "kv_bytes": 2 * b * length * d * elem_bytes}
    return {"op": "reconstruction_attention", "d": d, "symmetric": None, "pattern": "official copies / history_index",
            "shape": {"B": b, "P": p, "L": length, "h": h}, "official": official, "history_index": ours,
            "ratio": round(official["flop"] / ours["flop"], 4),
            "kv_bytes_ratio": round(official["kv_bytes"] / ours["kv_bytes"], 4)}


def work_rows():
    rows = [contrastive_work(65536, d, sym) for d in (64, 128, 256, 384, 512, 768, 1024, 100, 2048)
            for sym in (False, True)]
    rows += [attention_work(64, 5, 5, 256, 4), attention_work(4096, 5, 5, 256, 4), attention_work(4096, 10, 5, 256, 4),
             attention_work(4096, 10, 50, 256, 4),
             attention_work(1024, 64, 1024, 256, 4), attention_work(1024, 64, 1024, 256, 2),
             official_pattern_work(4096, 10, 5, 256, 4), official_pattern_work(4096, 10, 50, 256, 4)]
    return rows


# ----------------------------------------------------------------------------- main
def report(quick=False, cuda=True, jobs=2):
    import torch
    import triton_aot

    start = harness.git_state()
    rows = triton_rows(quick, jobs)
    cuda_note = "skipped (--no-cuda)"
    if cuda:
        try:
            cuda_part, cuda_note = cuda_rows()
            rows += cuda_part
        except Exception as exc:
            cuda_note = f"nvcc failed: {type(exc).__name__}: {str(exc)[-500:]}"
    failing, pruned = judge_rows(rows)
    return {"triton": triton_aot.triton_version(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "quick": quick,
            "kernel_sources_sha256": kernel_sources_hash(), "git": start["commit"],
            "dirty": None if start["dirty"] is None else start["dirty"] or harness.git_state() != start,
            "smem_limits": SMEM_LIMIT, "cuda_sources": cuda_note, "failing": failing,
            "pruned_at_launch": pruned,
            "note": "compiled ahead of time on a CPU machine; nothing ran on a GPU",
            "rows": rows, "work": work_rows()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "static-kernels.json"))
    ap.add_argument("--quick", action="store_true", help="the CI subset: largest classes, bf16, first config")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernel_report: unset TRITON_INTERPRET (the interpreter replaces the compiler)")
    result = report(args.quick, not args.no_cuda, args.jobs)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, args.out)
    n_fail = len(result["failing"])
    print(f"wrote {args.out}: {len(result['rows'])} rows, {n_fail} failing the bar")
    for w in result["work"]:
        core = f" (core {w['core']['ratio']:.2f}x its floor)" if "core" in w else ""
        if "pattern" in w:
            core = f" ({w['pattern']}; K/V bytes {w['kv_bytes_ratio']:.0f}x)"
        print(f"  {w['op']:<26} d={w['d']:<5} symmetric={w['symmetric']!s:<5} executed/floor {w['ratio']:.3f}{core}")
    for f in result["failing"][:20]:
        r = result["rows"][f["row"]]
        print(f"  FAIL {r['op']} {r['kernel']} {r['arch']} {r['dtype']} {r['config']}: {f['problems']}")
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
