"""Contrastive loss: courier_fast backends side by side with peers, same inputs, one run.

courier_fast:auto is what backend="auto" picks here (on a GPU: the self-checked cuda, then
triton, then chunked). Peers: naive (F.normalize + matmul + F.cross_entropy), official (COURIER's dense log_softmax
pattern with click-masked mean), inf_cl and memeff (pip, Triton: GPU only), open_clip's
ClipLoss (symmetric). Timing: median of several runs after warm-up (CUDA events on GPU).
Peak memory: on CUDA max_memory_allocated above the inputs; on CPU each row runs in a fresh
process and reports peak RSS above the inputs. Writes bench/results/<device>-contrastive.json.

    python bench/bench_contrastive.py --quick                 # small CPU run
    python bench/bench_contrastive.py --n 16384 --d 64        # the CPU target shape
    python bench/bench_contrastive.py --clip                  # ClipLoss rows (below)
    python bench/bench_contrastive.py --floor                 # the cpu op against its GEMM floor

On CPU every row also reports its GEMM floor, measured in the row's own process: floor_ms is
the FLOP of three N x M x d GEMMs (the forward's logits and the backward's two gradients,
2 N M d each) at this machine's fp32 rate on a 2048^3 matmul (gemm_gflops: the median of runs
taken before and after the row), and floor_ratio = ms_fwd_bwd / floor_ms. A fused loss that
recomputes the logits in its backward runs four such GEMMs: 1.33x is its bound at the 2048^3
rate. --floor: the cpu backend (one direction and symmetric) at N = 8192 and 16384, d = 64.

--clip: open_clip's ClipLoss against courier_fast.nn.ClipLoss (auto and each backend), the
call a CLIP trainer makes (features as the model gives them, a logit_scale tensor with its
gradient), at N = 4096 ... 32768, d = 512 (CPU) or up to 2^20 (GPU); each row of ours reports its
time and peak memory as a ratio to open_clip's row at the same N. On CPU each row's process
may use at most --mem-limit-gb of address space (default 16): a row that needs more fails with
an allocation error, recorded as its error, instead of taking the machine's memory. Writes
bench/results/<device>-clip.json.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

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

CLIP_SCALE = 1 / 0.07  # open_clip's initial logit_scale.exp()


def clip_open_clip(a, c):
    """open_clip's ClipLoss as a CLIP trainer calls it (a learned logit_scale)."""
    from open_clip.loss import ClipLoss
    return ClipLoss()(a, c, _clip_scale(a))


def clip_courier(backend):
    import courier_fast as cf

    loss = cf.nn.ClipLoss(backend=backend)
    return lambda a, c: loss(a, c, _clip_scale(a))


_SCALE = {}


def _clip_scale(like):
    """One logit_scale leaf per process (its gradient is computed like a model parameter's)."""
    if like.device not in _SCALE:
        _SCALE[like.device] = torch.tensor(CLIP_SCALE, device=like.device, requires_grad=True)
    return _SCALE[like.device]


def clip_implementations(device):
    """{key: fn} of the --clip rows: open_clip's ClipLoss and ours (auto, then each backend)."""
    from courier_fast.ops import dispatch
    impls = {"clip:open_clip": clip_open_clip, "clip:courier_fast:auto": clip_courier("auto")}
    for name, (ok, _) in dispatch.op_backends("contrastive_loss").items():
        impl = dispatch.implementations("contrastive_loss").get(name)
        if ok and impl and device in impl.devices and name != "reference":
            impls[f"clip:courier_fast:{name}"] = clip_courier(name)
    return impls


def implementations(device):
    """{key: fn}. Keys ending in ':symmetric' are our op with symmetric=True."""
    from courier_fast.ops import dispatch
    impls = {"naive": naive, "official": official, "courier_fast:auto": courier("auto")}
    for name, (ok, _) in dispatch.op_backends("contrastive_loss").items():
        impl = dispatch.implementations("contrastive_loss").get(name)
        if ok and impl and device in impl.devices:
            impls[f"courier_fast:{name}"] = courier(name)
            impls[f"courier_fast:{name}:symmetric"] = courier(name, symmetric=True)
    if device == "cuda":  # Triton peers need a GPU
        impls["inf_cl"], impls["memeff"] = inf_cl, memeff
    impls["open_clip"] = open_clip
    return {**impls, **clip_implementations(device)}


def row_identity(key):
    """JSON impl name and symmetric flag for an implementations() key."""
    if key.endswith(":symmetric"):
        return key[: -len(":symmetric")], True
    return key, key in SYMMETRIC_PEERS or key.startswith("clip:")


MEM_LIMIT_ENV = "COURIER_BENCH_MEM_LIMIT_GB"  # set by the parent, applied by each --one child


def _limit_memory():
    """Cap this process's address space at $COURIER_BENCH_MEM_LIMIT_GB (if set): allocations past
    it fail (an error row) instead of swapping or waking the OOM killer."""
    limit = os.environ.get(MEM_LIMIT_ENV)
    if limit:
        import resource
        cap = int(float(limit) * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


# --------------------------------------------------------------------------- measurement
def measure_row(key, n, d, dtype, device, reps, seed=0):
    """One row on the same seeded inputs for every impl."""
    fn = implementations(device)[key]
    if key.startswith("clip:"):  # features as a CLIP model hands them over: unit rows
        scale_rows = lambda t: t / d ** 0.5
    else:
        scale_rows = lambda t: t
    if device == "cpu":  # import the peer's modules before the memory baseline
        try:
            fn(torch.randn(4, d, dtype=dtype, requires_grad=True), torch.randn(4, d, dtype=dtype)).backward()
        except Exception:
            pass
    g = torch.Generator().manual_seed(seed)
    a = scale_rows(torch.randn(n, d, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    c = scale_rows(torch.randn(n, d, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    if device != "cpu":
        return harness.measure(fn, [a, c], device, reps)
    before = gemm_rates(reps)  # the floor's rate in this process, around the row (load drifts)
    res = harness.measure(fn, [a, c], device, reps)
    if "ms_fwd_bwd" in res:
        rate = statistics.median(before + gemm_rates(reps))
        floor_ms = 3 * 2 * n * n * d / rate * 1e3
        res.update(gemm_gflops=round(rate / 1e9, 1), floor_ms=round(floor_ms, 3),
                   floor_ratio=round(res["ms_fwd_bwd"] / floor_ms, 3))
    return res


GEMM_N = 2048  # the floor's reference matmul: fp32 2048^3


def gemm_rates(reps):
    """FLOP/s of `reps` fp32 2048^3 matmuls (after one warm-up), one sample each."""
    x = torch.randn(GEMM_N, GEMM_N)
    x @ x
    rates = []
    for _ in range(max(3, reps)):
        t0 = time.perf_counter()
        x @ x
        rates.append(2 * GEMM_N**3 / (time.perf_counter() - t0))
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="*", help="batch sizes N")
    p.add_argument("--d", type=int, nargs="*", help="feature dims d")
    p.add_argument("--dtype", nargs="*", default=None, help="float32 / bfloat16")
    p.add_argument("--impl", nargs="*", help="only these implementations")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes, few reps")
    p.add_argument("--out", help="JSON path (default bench/results/<device>-contrastive.json, -clip.json)")
    p.add_argument("--clip", action="store_true", help="ClipLoss rows: open_clip's against ours")
    p.add_argument("--floor", action="store_true", help="the cpu op at N = 8192, 16384, d = 64 fp32 "
                                                        "against its GEMM floor")
    p.add_argument("--mem-limit-gb", type=float, help="CPU: address-space cap of each row's process "
                                                       "(default 16 with --clip, none otherwise)")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one row in this process
    args = p.parse_args()
    device = harness.device_type()

    if args.one:
        _limit_memory()
        key, n, d, dtype = args.one.rsplit(":", 3)
        print(json.dumps(measure_row(key, int(n), int(d), getattr(torch, dtype), device, args.reps)))
        return

    bench = "clip" if args.clip else "contrastive-floor" if args.floor else "contrastive"
    limit = args.mem_limit_gb if args.mem_limit_gb is not None else (16.0 if args.clip else None)
    if limit is not None and device == "cpu":
        os.environ[MEM_LIMIT_ENV] = str(limit)
    if args.clip:
        ns = args.n or ([4096, 8192] if args.quick else [4096, 8192, 16384, 32768] if device == "cpu"
                        else [4096, 16384, 65536, 262144, 1048576])
        ds, dtypes = args.d or [512], args.dtype or (["float32"] if device == "cpu" else ["float32", "bfloat16"])
        reps = 2 if args.quick else args.reps
    elif args.floor:
        ns, ds, dtypes, reps = args.n or [8192, 16384], args.d or [64], args.dtype or ["float32"], args.reps
    elif args.quick:
        ns, ds, dtypes, reps = args.n or [1024, 4096], args.d or [64], args.dtype or ["float32"], 3
    elif device == "cuda":
        ns = args.n or [4096, 16384, 65536, 262144, 1048576]
        ds, dtypes, reps = args.d or [256, 512], args.dtype or ["float32", "bfloat16"], args.reps
    else:
        ns, ds, dtypes, reps = args.n or [4096, 16384], args.d or [64, 256], args.dtype or ["float32"], args.reps
    keys = args.impl or (["courier_fast:cpu", "courier_fast:cpu:symmetric"] if args.floor else
                         list(clip_implementations(device) if args.clip
                              else {k: v for k, v in implementations(device).items() if not k.startswith("clip:")}))

    ceilings = {dt: harness.matmul_ceiling(device, getattr(torch, dt)) for dt in dtypes}
    print(f"device={device} torch={torch.__version__} matmul ceilings (TFLOP/s): "
          + ", ".join(f"{k}={v / 1e12:.2f}" for k, v in ceilings.items()))
    print(f"{'impl':<34}{'N':>9}{'d':>6}{'dtype':>10}{'fwd ms':>11}{'fwd+bwd ms':>12}{'peak MB':>10}{'floor':>8}"
          + (f"{'GEMM GF/s':>11}{'x floor':>9}" if device == "cpu" else "") + (f"{'x peer time':>13}{'x peer mem':>12}"
                                                                               if args.clip else ""))
    rows = []
    for dt in dtypes:
        for n in ns:
            for d in ds:
                for key in keys:
                    if device == "cpu":
                        res = harness.run_isolated(__file__, f"{key}:{n}:{d}:{dt}", reps)
                    else:
                        res = measure_row(key, n, d, getattr(torch, dt), device, reps)
                        torch.cuda.empty_cache()
                    impl_name, symmetric = row_identity(key)
                    row = {"impl": impl_name, "symmetric": symmetric, "shape": {"N": n, "d": d}, "dtype": dt,
                           **({"mem_limit_gb": limit} if limit is not None and device == "cpu" else {}), **res}
                    if "ms_fwd_bwd" in res:
                        row["floor_fraction"] = round(8 * n * n * d / ceilings[dt] / (res["ms_fwd_bwd"] / 1e3), 4)
                        peer = next((r for r in rows if r["impl"] == "clip:open_clip" and r["shape"] == row["shape"]
                                     and r["dtype"] == dt and "ms_fwd_bwd" in r), None)
                        if args.clip and peer is not None and key != "clip:open_clip":
                            row["vs_open_clip"] = {"time": round(res["ms_fwd_bwd"] / peer["ms_fwd_bwd"], 3),
                                                   "peak_mem": round(res["peak_mem_mb"] / max(peer["peak_mem_mb"], 1e-9), 4)}
                        print(f"{key:<34}{n:>9}{d:>6}{dt:>10}{res['ms_fwd']:>11.2f}{res['ms_fwd_bwd']:>12.2f}"
                              f"{res['peak_mem_mb']:>10.1f}{row['floor_fraction']:>8.3f}"
                              + (f"{res['gemm_gflops']:>11.1f}{res['floor_ratio']:>9.2f}" if 'floor_ratio' in res else "")
                              + (f"{row['vs_open_clip']['time']:>13.3f}{row['vs_open_clip']['peak_mem']:>12.4f}"
                                 if 'vs_open_clip' in row else ""))
                    else:
                        print(f"{key:<34}{n:>9}{d:>6}{dt:>10}  {res.get('error', '')[:80]}")
                    rows.append(row)
    print("wrote", harness.write_results(bench, ceilings, rows, args.out, quick=args.quick))


if __name__ == "__main__":
    main()
