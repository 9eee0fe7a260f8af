"""JPEG decode + resize to 224: images/s of DALI (GPU `mixed`, CPU), torchvision
(decode_jpeg on the GPU, decode_image on CPU) and PIL in a torch DataLoader with 1/4/8/16
workers, for source images of 256 and 512 px. Writes bench/results/<device>-decode.json with
rows {"impl", "images_per_s", "source_px", "workers"}.

    python bench/bench_decode.py --quick
"""
import argparse
import io
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from courier_fast.data import ImageDecoder, dali_available  # noqa: E402

SIZE = 224


def make_jpegs(n, px, seed=0):
    """Photo-like JPEGs (smooth colour fields + blocky detail), quality 90."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, (px // 16, px // 16, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((px, px), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class _PilDataset(torch.utils.data.Dataset):
    def __init__(self, jpegs):
        self.jpegs, self.decoder = jpegs, None

    def __len__(self):
        return len(self.jpegs)

    def __getitem__(self, i):
        if self.decoder is None:
            self.decoder = ImageDecoder(backend="pil", size=SIZE)
        return self.decoder([self.jpegs[i]])[0]


def images_per_s(run, n, reps):
    run()  # warm-up (pipelines, workers, cuDNN/nvJPEG handles)
    best = float("inf")
    for _ in range(reps):
        harness._sync(harness.device_type())
        t0 = time.perf_counter()
        run()
        harness._sync(harness.device_type())
        best = min(best, time.perf_counter() - t0)
    return n / best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=512, help="images per measurement")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.quick:
        args.n, args.workers, args.reps = 128, [1, 2], 2
    gpu = torch.cuda.is_available()
    rows = []
    print(f"{'impl':<28}{'source px':>10}{'workers':>9}{'images/s':>12}")
    for px in (256, 512):
        jpegs = make_jpegs(args.n, px)
        batches = [jpegs[i:i + args.batch] for i in range(0, len(jpegs), args.batch)]
        impls = {}
        if dali_available():
            dec_cpu = ImageDecoder(backend="dali", size=SIZE, num_threads=os.cpu_count())
            impls["dali_cpu"] = (lambda d=dec_cpu: [d(b) for b in batches], os.cpu_count())
            if gpu:
                dec_gpu = ImageDecoder(backend="dali", device="cuda", size=SIZE, num_threads=4)
                impls["dali_gpu"] = (lambda d=dec_gpu: [d(b) for b in batches], 4)
        tv = ImageDecoder(backend="torchvision", device="cuda" if gpu else "cpu", size=SIZE)
        impls["torchvision_gpu" if gpu else "torchvision_cpu"] = (lambda d=tv: [d(b) for b in batches], 0)
        for w in args.workers:
            def run(w=w):
                dl = torch.utils.data.DataLoader(_PilDataset(jpegs), batch_size=args.batch, num_workers=w,
                                                 persistent_workers=False)
                for _ in dl:
                    pass
            impls[f"pil_dataloader_{w}w"] = (run, w)
        for name, (run, workers) in impls.items():
            try:
                rate = images_per_s(run, len(jpegs), args.reps)
            except Exception as exc:  # reported, not hidden
                print(f"{name:<28}{px:>10}{workers:>9}  {type(exc).__name__}: {str(exc)[:60]}")
                rows.append({"impl": name, "source_px": px, "workers": workers, "error": str(exc)[:200]})
                continue
            print(f"{name:<28}{px:>10}{workers:>9}{rate:>12.0f}")
            rows.append({"impl": name, "images_per_s": round(rate, 1), "source_px": px, "workers": workers})
    print("wrote", harness.write_results("decode", {}, rows, args.out, quick=args.quick))


if __name__ == "__main__":
    main()
