"""build_info() and the `courier-fast info` report (in the spirit of `python -m xformers.info`)."""
import platform

import torch

from courier_fast import _extension
from courier_fast._metadata import dist_version
from courier_fast.ops import dispatch


def _dali_version():
    for name in ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"):
        if dist_version(name):
            return dist_version(name)
    return None


def build_info() -> dict:
    """What was built and what runs here: extension, CUDA, and library versions."""
    return {
        "courier_fast": dist_version("courier_fast"),
        "extension_loaded": _extension.loaded(),
        "extension_error": _extension.LOAD_ERROR,
        "cuda_compiled": _extension.cuda_compiled(),
        "cuda_version": _extension.cuda_version(),
        "compiled_torch": _extension.compiled_torch_version(),
        "cuda_archs": _extension.BUILD.get("cuda_archs", []),
        "cuda_build_error": _extension.BUILD.get("cuda_build_error"),
        "cuda_skip_reason": _extension.BUILD.get("cuda_skip_reason"),
        "nvcc": _extension.BUILD.get("nvcc"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": dist_version("triton"),
        "dali": _dali_version(),
        "timm": dist_version("timm"),
        "python": platform.python_version(),
    }


# The GEMMs each backend runs for 16-bit (bf16 / fp16) inputs, from reading its code (none of the
# GPU rows has been measured on a GPU). The default CUDA path for the loss is AUTO_ORDER's first
# validated backend that supports the call: `triton` for 16-bit inputs once it passed the
# self-check (ops/contrastive._cuda_supports), else `cuda`.
GEMM_16BIT = {
    ("contrastive_loss", "cuda"): "fp32 cuBLAS GEMMs on fp32 copies of the inputs (no 16-bit tensor "
                                  "cores; TF32 only where torch.backends.cuda.matmul.allow_tf32); auto "
                                  "sends 16-bit calls to triton once it passed the self-check",
    ("contrastive_loss", "triton"): "16-bit tensor-core MMA, fp32 accumulation (no fp32 copies)",
    ("contrastive_loss", "cpu"): "fp32 ATen GEMMs on fp32 copies of the inputs",
    ("contrastive_loss", "chunked"): "fp32 ATen GEMMs on fp32 copies of the inputs",
    ("contrastive_loss", "reference"): "fp32 dense logits (fp32 copies)",
    ("reconstruction_attention", "cuda"): "fp32 CUDA-core dot products (no tensor cores)",
    ("reconstruction_attention", "triton"): "histories > 16 items: 16-bit tensor-core MMA, fp32 accumulation; "
                                            "<= 16 items: fp32 CUDA-core products",
    ("reconstruction_attention", "reference"): "ATen GEMMs in the inputs' dtype",
    ("reconstruction_attention", "cpu"): "ATen projection GEMMs in the inputs' dtype; the core on fp32 "
                                         "copies of Q, K, V (fp32 accumulation)",
}


def report() -> str:
    """Human-readable table of versions, backends and per-op implementations."""
    info = build_info()
    lines = ["courier_fast " + str(info["courier_fast"]), ""]
    for key in ("torch", "torch_cuda", "triton", "cuda_compiled", "cuda_version", "cuda_archs",
                "compiled_torch", "nvcc", "cuda_available", "gpu", "dali", "timm", "python"):
        value = info[key]
        if isinstance(value, list):
            value = " ".join(value) or None
        lines.append(f"  {key:<16} {'-' if value is None else value}")
    for key in ("extension_error", "cuda_build_error", "cuda_skip_reason"):
        if info[key]:
            lines.append(f"  {key:<16} {info[key]}")
    lines += ["", "backends:"]
    for name, (ok, reason) in dispatch.backends().items():
        lines.append(f"  {name:<10} {'available  ' if ok else 'unavailable'}  {reason}")
    verdicts = selftest_verdicts()
    for op in dispatch.ops():
        lines += ["", f"{op}:"]
        for name, (ok, reason) in dispatch.op_backends(op).items():
            lines.append(f"  {name:<10} {'yes' if ok else 'no '}  {reason}")
            if (op, name) in GEMM_16BIT and name in dispatch.implementations(op):
                lines.append(f"  {'':<10}      16-bit inputs: {GEMM_16BIT[op, name]}")
            for device, v in verdicts.get(op, {}).get(name, {}).items():
                lines.append(f"  {'':<10}      self-check on {device}: " + (
                    "not run yet (`courier-fast selftest`)" if v is None else
                    f"{'passed' if v['ok'] else 'FAILED'}, worst error {v['worst_error']:.3g} x allowed"))
    return "\n".join(lines)


def selftest_verdicts():
    """{op: {backend: {device: cached verdict or None}}} for this machine's devices; the checks
    themselves run on first use by backend='auto' or with `courier-fast selftest`."""
    from courier_fast.ops.selfcheck import check as backend_check

    devices = (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]
    out = {}
    for device in devices:
        for op, names in backend_check.registered(device).items():
            for name in names:
                out.setdefault(op, {}).setdefault(name, {})[device] = backend_check.cached_verdict(op, name, device)
    return out
