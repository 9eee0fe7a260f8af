"""Contrastive loss: courier_fast backends side by side with peers, same inputs, one run.

Peers: naive (F.normalize + matmul + F.cross_entropy), official (COURIER's dense log_softmax
pattern with click-masked mean), inf_cl and memeff (pip, Triton: GPU only), open_clip's
ClipLoss (symmetric). Timing: median of several runs after warm-up (CUDA events on GPU).
Peak memory: on CUDA max_memory_allocated above the inputs; on CPU each row runs in a fresh
process and reports peak RSS above the inputs. Writes bench/results/<device>-contrastive.json.

    python bench/bench_contrastive.py --quick                 # small CPU run
    python bench/bench_contrastive.py --n 16384 --d 64        # the CPU target shape
"""
import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPERATURE = 0.05


# --------------------------------------------------------------------------- implementations
def naive(a, c):
    logits = F.normalize(a, dim=-1) @ F.normalize(c, dim=-1).T / TEMPERATURE
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device))


def official(a, c):
    """The public COURIER code's pattern: dense logits, log_softmax, diagonal, masked mean."""
    logits = F.normalize(a, dim=-1) @ F.normalize(c, dim=-1).T / TEMPERATURE
    log_prob = torch.log_softmax(logits, dim=1)
    clicked = torch.ones(a.shape[0], device=a.device)
    return -(log_prob.diagonal() * clicked).sum() / clicked.sum()


def courier(backend, symmetric=False):
    import courier_fast as cf

    def fn(a, c):
        return cf.contrastive_loss(a, c, temperature=TEMPERATURE, symmetric=symmetric, backend=backend)
    return fn


def inf_cl(a, c):
    """Inf-CL (one direction, like ours with symmetric=False)."""
    from inf_cl import cal_inf_loss
    scale = torch.tensor(1 / TEMPERATURE, device=a.device)
    head_dim = min(256, a.shape[1])
    return cal_inf_loss(F.normalize(a, dim=-1), F.normalize(c, dim=-1), scale=scale, head_dim=head_dim)


_MEMEFF = {}


def memeff(a, c):
    """memeff's bidirectional CLIP loss (compare with ours symmetric)."""
    if "loss" not in _MEMEFF:
        from memeff import MemoryEfficientCLIPLoss
        _MEMEFF["loss"] = MemoryEfficientCLIPLoss(temperature=TEMPERATURE, stable=False)
    return _MEMEFF["loss"](a, c)


def open_clip(a, c):
    """open_clip's ClipLoss: dense, bidirectional."""
    from open_clip.loss import ClipLoss
    return ClipLoss()(F.normalize(a, dim=-1), F.normalize(c, dim=-1), 1 / TEMPERATURE)


SYMMETRIC_PEERS = {"memeff", "open_clip"}


def implementations(device):
    """{key: fn}. Keys ending in ':symmetric' are our op with symmetric=True."""
    from courier_fast import dispatch
    impls = {"naive": naive, "official": official}
    for name, (ok, _) in dispatch.op_backends("contrastive_loss").items():
        impl = dispatch._REGISTRY["contrastive_loss"].get(name)
        if ok and impl and device in impl.devices:
            impls[f"courier_fast:{name}"] = courier(name)
            impls[f"courier_fast:{name}:symmetric"] = courier(name, symmetric=True)
    if device == "cuda":  # Triton peers need a GPU
        impls["inf_cl"], impls["memeff"] = inf_cl, memeff
    impls["open_clip"] = open_clip
    return impls


def row_identity(key):
    """JSON impl name and symmetric flag for an implementations() key."""
    if key.endswith(":symmetric"):
        return key[: -len(":symmetric")], True
    return key, key in SYMMETRIC_PEERS


# --------------------------------------------------------------------------- measurement
def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps):
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(impl_name, n, d, dtype, device, reps, seed=0):
    """One row: median fwd / fwd+bwd ms and peak extra memory (MB) above the inputs."""
    fn = implementations(device)[impl_name]
    if device == "cpu":  # import the peer's modules before the memory baseline
        try:
            fn(torch.randn(4, d, dtype=dtype, requires_grad=True), torch.randn(4, d, dtype=dtype)).backward()
        except Exception:
            pass
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    c = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # peak RSS of this fresh process so far: interpreter, imports and the inputs
        base = _rss_mb()
    try:
        fn(a, c).backward()  # warm-up (and peer import / compile); counted in the peak
    except Exception as exc:  # a peer that cannot run this shape/dtype is reported, not hidden
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    a.grad = c.grad = None

    def fwd():
        with torch.no_grad():
            fn(a, c)

    def fwd_bwd():
        a.grad = c.grad = None
        fn(a, c).backward()

    ms_fwd = _time(fwd, device, reps)
    ms_fwd_bwd = _time(fwd_bwd, device, reps)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else _rss_mb() - base
    return {"ms_fwd": round(ms_fwd, 3), "ms_fwd_bwd": round(ms_fwd_bwd, 3), "peak_mem_mb": round(peak, 1)}


def tensor_core_ceiling(device, dtype):
    """Measured matmul rate (FLOP/s) on this device: the floor's denominator."""
    n = 4096 if device == "cuda" else 1024
    x = torch.randn(n, n, device=device, dtype=dtype)
    x @ x
    ms = _time(lambda: x @ x, device, 10)
    return 2 * n**3 / (ms / 1e3)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="*", help="batch sizes N")
    p.add_argument("--d", type=int, nargs="*", help="feature dims d")
    p.add_argument("--dtype", nargs="*", default=None, help="float32 / bfloat16")
    p.add_argument("--impl", nargs="*", help="only these implementations")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes, few reps")
    p.add_argument("--out", help="JSON path (default bench/results/<device>-contrastive.json)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    if args.one:
        impl, n, d, dtype = args.one.rsplit(":", 3)
        print(json.dumps(measure(impl, int(n), int(d), getattr(torch, dtype), device, args.reps)))
        return

    if args.quick:
        ns, ds, dtypes, reps = args.n or [1024, 4096], args.d or [64], args.dtype or ["float32"], 3
    elif device == "cuda":
        ns = args.n or [4096, 16384, 65536, 262144, 1048576]
        ds, dtypes, reps = args.d or [256, 512], args.dtype or ["float32", "bfloat16"], args.reps
    else:
        ns, ds, dtypes, reps = args.n or [4096, 16384], args.d or [64, 256], args.dtype or ["float32"], args.reps
    names = args.impl or list(implementations(device))

    rows = []
    ceilings = {dt: tensor_core_ceiling(device, getattr(torch, dt)) for dt in dtypes}
    print(f"device={device} torch={torch.__version__} ceilings (TFLOP/s): "
          + ", ".join(f"{k}={v / 1e12:.2f}" for k, v in ceilings.items()))
    print(f"{'impl':<34}{'N':>9}{'d':>6}{'dtype':>10}{'fwd ms':>11}{'fwd+bwd ms':>12}{'peak MB':>10}{'floor':>8}")
    for dt in dtypes:
        for n in ns:
            for d in ds:
                for name in names:
                    if device == "cpu":  # fresh process per row: honest peak RSS
                        cmd = [sys.executable, __file__, "--one", f"{name}:{n}:{d}:{dt}", "--reps", str(reps)]
                        out = subprocess.run(cmd, capture_output=True, text=True)
                        res = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-300:]}
                    else:
                        res = measure(name, n, d, getattr(torch, dt), device, reps)
                        torch.cuda.empty_cache()
                    impl_name, symmetric = row_identity(name)
                    row = {"impl": impl_name, "symmetric": symmetric, "shape": {"N": n, "d": d}, "dtype": dt, **res}
                    if "ms_fwd_bwd" in res:
                        row["floor_fraction"] = round(8 * n * n * d / ceilings[dt] / (res["ms_fwd_bwd"] / 1e3), 4)
                        print(f"{name:<34}{n:>9}{d:>6}{dt:>10}{res['ms_fwd']:>11.2f}{res['ms_fwd_bwd']:>12.2f}"
                              f"{res['peak_mem_mb']:>10.1f}{row['floor_fraction']:>8.3f}")
                    else:
                        print(f"{name:<34}{n:>9}{d:>6}{dt:>10}  {res.get('error', '')[:80]}")
                    rows.append(row)

    dev_name = torch.cuda.get_device_name().replace(" ", "_") if device == "cuda" else "cpu"
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        git = None
    import importlib.metadata as md
    triton_v = None
    try:
        triton_v = md.version("triton")
    except md.PackageNotFoundError:
        pass
    result = {"bench": "contrastive", "device": dev_name, "cores": os.cpu_count(), "torch": torch.__version__,
              "triton": triton_v, "date": datetime.date.today().isoformat(), "git": git,
              "ceilings": {k: v for k, v in ceilings.items()}, "rows": rows}
    path = args.out or os.path.join(HERE, "results", f"{dev_name}-contrastive.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
