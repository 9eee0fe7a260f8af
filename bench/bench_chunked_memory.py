"""The memory-safe path, measured: contrastive loss forward + backward with the `chunked`
backend (ATen ops only) next to the `cpu` backend (C++) at N = 65536, d = 64.

Each backend runs in a fresh process (peak RSS above the inputs, after a small warm-up) and
saves its loss and gradients; this process compares them (fp32 tolerance) and relates the
extra peak memory to the dense N x N fp32 logits the reference would allocate.

    python bench/bench_chunked_memory.py                   # N = 65536, d = 64 (minutes)
    python bench/bench_chunked_memory.py --n 8192 --quick  # seconds; -quick.json (not kept)
Writes bench/results/<device>-chunked_memory.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

TEMPERATURE = 0.05


def one(backend, n, d, symmetric, out_path):
    """Runs in the child: loss + gradients of one backend, peak RSS above the inputs."""
    import courier_fast as cf

    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g).requires_grad_()
    c = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.rand(n, generator=g) < 0.3  # clicked anchors
    cf.contrastive_loss(a[:256], c[:256], backend=backend).backward()  # imports, allocator warm-up
    a.grad = c.grad = None
    harness.reset_peak_rss()  # the peak from here on (ru_maxrss would carry the parent's over)
    base = harness.rss_mb()
    t0 = time.perf_counter()
    loss = cf.contrastive_loss(a, c, temperature=TEMPERATURE, anchor_weight=w, symmetric=symmetric,
                               backend=backend)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak_mb = harness.peak_rss_mb() - base
    torch.save({"loss": loss.detach(), "ga": a.grad, "gc": c.grad}, out_path)
    print(json.dumps({"extra_peak_mb": round(peak_mb, 1), "s_fwd_bwd": round(seconds, 2)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # internal: backend, output path
    args = ap.parse_args()
    if args.one:
        one(args.one[0], args.n, args.d, args.symmetric, args.one[1])
        return
    dense_mb = args.n * args.n * 4 / 2**20
    rows, outputs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("chunked", "cpu"):
            path = os.path.join(tmp, f"{backend}.pt")
            cmd = [sys.executable, __file__, "--n", str(args.n), "--d", str(args.d), "--one", backend, path]
            cmd += ["--symmetric"] * args.symmetric
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"{backend} failed: {run.stderr[-2000:]}")
            res = json.loads(run.stdout.strip().splitlines()[-1])
            outputs[backend] = torch.load(path)
            rows.append({"impl": f"courier_fast:{backend}", "shape": {"N": args.n, "d": args.d},
                         "symmetric": args.symmetric, "dtype": "float32", **res,
                         "extra_peak_fraction_of_dense_logits": round(res["extra_peak_mb"] / dense_mb, 4)})
            print(f"{backend:<8} N={args.n} d={args.d}: extra peak {res['extra_peak_mb']:.0f} MB "
                  f"({100 * res['extra_peak_mb'] / dense_mb:.2f} % of the {dense_mb:.0f} MB dense logits), "
                  f"fwd+bwd {res['s_fwd_bwd']:.1f} s")
    ref, got = outputs["cpu"], outputs["chunked"]
    diffs = {}
    for key in ("loss", "ga", "gc"):
        scale = ref[key].abs().max().item()
        diffs[key] = (got[key] - ref[key]).abs().max().item() / (scale if scale > 0 else 1.0)
        torch.testing.assert_close(got[key], ref[key], rtol=2e-5, atol=2e-5 * max(scale, 1e-3))
    print("chunked vs cpu, max |diff| / max |cpu|:", {k: f"{v:.2e}" for k, v in diffs.items()})
    for row in rows:
        row["max_rel_diff_vs_cpu"] = {k: float(f"{v:.3g}") for k, v in diffs.items()}
    ceilings = {"dense_logits_mb": round(dense_mb, 1)}
    print("wrote", harness.write_results("chunked_memory", ceilings, rows, args.out, quick=args.quick))


if __name__ == "__main__":
    main()
