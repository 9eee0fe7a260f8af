"""Training throughput: a full COURIER step vs an encoder-only step on the same images.

Rows (images/s counts encoder image passes, i.e. the batch's distinct items):
  encoder_only      the timm encoder + head, forward + backward + AdamW on resident tensors
                    (the same number of images, size and dtype as an average COURIER batch),
                    loss = mean squared embedding: the ceiling a COURIER step can approach;
  courier_resident  the full COURIER step (attention, both InfoNCE losses, CTR head) on
                    resident batches taken from the loader beforehand: train()'s own step
                    (courier_fast.training.loop.train_step), with the ops' data checks off as in train();
  courier_loader    the full step fed by SessionLoader (decode + prefetch thread), which adds
                    the time spent waiting for data.
Each row has "fraction_of_encoder_only" and "data_wait_fraction" (the share of step wall time
the training loop waited for the next batch). Writes bench/results/<device>-train_step.json.

    python bench/bench_train_step.py --quick          # CPU-sized: tiny CNN at 32 px
    python bench/bench_train_step.py                  # GPU: Swin-T at 224 px, bf16
"""
import argparse
import itertools
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import courier_fast as cf  # noqa: E402
from courier_fast.data import SessionLoader, load_dataset  # noqa: E402
from courier_fast.data.generate import WorldConfig, generate  # noqa: E402
from courier_fast.models.methods import build_method  # noqa: E402
from courier_fast.models.encoder import ImageEncoder  # noqa: E402
from courier_fast.training.loop import train_step  # noqa: E402


def timed_steps(step, batches, device, warmup):
    """Run step(batch) over `batches` (an iterator; step returns its image count) and time the
    steps after the first `warmup`: -> {"steps", "seconds", "waited", "images", "images_per_s",
    "images_per_step", "data_wait_fraction"}, every rate divided by the steps actually timed."""
    total = wait = 0.0
    images = steps = 0
    for k in itertools.count():
        t0 = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            break
        t1 = time.perf_counter()
        n = step(batch)
        harness._sync(device.type)
        t2 = time.perf_counter()
        if k >= warmup:
            total += t2 - t0
            wait += t1 - t0
            images += n
            steps += 1
    if steps == 0:
        raise ValueError(f"no step was timed: the iterator held no more than warmup={warmup} batches")
    return {"steps": steps, "seconds": total, "waited": wait, "images": images, "images_per_s": images / total,
            "images_per_step": images / steps, "data_wait_fraction": wait / total}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (tiny CNN, 32 px)")
    ap.add_argument("--encoder", help="timm model (default swin_tiny_patch4_window7_224; test_efficientnet with --quick)")
    ap.add_argument("--image-size", type=int, help="default 224 (32 with --quick)")
    ap.add_argument("--batch-size", type=int, default=64, help="request rows per step (64 = the paper's per-GPU batch)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 30, 8 with --quick)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"), help="auto: bf16 on a GPU")
    ap.add_argument("--workdir", help="where the generated world goes (default a temp dir)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = args.encoder or ("test_efficientnet" if args.quick else "swin_tiny_patch4_window7_224")
    size = args.image_size or (32 if args.quick else 224)
    steps = args.steps or (8 if args.quick else 30)
    amp = torch.bfloat16 if args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda") else None

    root = args.workdir or tempfile.mkdtemp(prefix="courier_bench_world_")
    cfg = WorldConfig(items=600 if args.quick else 2000, users=150 if args.quick else 400, requests_per_user=12,
                      image_size=size)
    if not os.path.exists(os.path.join(root, "pretrain.parquet")):
        generate(root, seed=0, config=cfg)
    data = load_dataset(root, tables=("pretrain",))
    n_batches = steps + args.warmup

    def loader():
        return SessionLoader(data["items"], data["pretrain"], batch_size=args.batch_size, device=device.type,
                             drop_last=True, seed=0)

    resident = [b.to(device) for _, b in zip(range(n_batches), loader())]
    n_images = round(sum(b.images.shape[0] for b in resident) / len(resident))
    autocast = dict(device_type=device.type, dtype=amp or torch.float32, enabled=amp is not None)

    torch.manual_seed(0)
    courier = build_method("courier", data["items"], encoder=encoder, batch_rows=args.batch_size).to(device)
    opt = torch.optim.AdamW(courier.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)  # bf16 or fp32: no loss scaling
    cf.set_input_checks(False)  # as train() does: each data check would read a tensor back

    def courier_step(batch):
        train_step(courier, batch, None, opt, scaler, amp)
        return batch.images.shape[0]

    enc = ImageEncoder(encoder).to(device)
    enc_opt = torch.optim.AdamW(enc.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (n_images, 3, size, size), dtype=torch.uint8, device=device)

    def encoder_step(images):
        with torch.autocast(**autocast):
            loss = enc(images).float().pow(2).mean()
        enc_opt.zero_grad(set_to_none=True)
        loss.backward()
        enc_opt.step()
        return images.shape[0]

    rows = []
    for impl, step, batches in (("encoder_only", encoder_step, iter([x] * n_batches)),
                                ("courier_resident", courier_step, iter(resident)),
                                ("courier_loader", courier_step, itertools.islice(loader().batches(), n_batches))):
        t = timed_steps(step, batches, device, args.warmup)
        rows.append({"impl": impl, "images_per_s": t["images_per_s"], "data_wait_fraction": t["data_wait_fraction"],
                     "encoder": encoder, "image_size": size, "batch_rows": args.batch_size, "steps": t["steps"],
                     "images_per_step": t["images_per_step"], "dtype": str(amp or torch.float32).replace("torch.", "")})
    for r in rows:
        r["fraction_of_encoder_only"] = r["images_per_s"] / rows[0]["images_per_s"]
    print(f"{'impl':<18}{'images/s':>10}{'of encoder-only':>17}{'data wait':>11}   ({encoder}, {size} px, "
          f"{args.batch_size} rows ~ {n_images} images/step, {rows[0]['dtype']}, {harness.device_name()})")
    for r in rows:
        print(f"{r['impl']:<18}{r['images_per_s']:>10.0f}{r['fraction_of_encoder_only']:>16.1%}{r['data_wait_fraction']:>11.1%}")
    print("wrote", harness.write_results("train_step", {}, rows, quick=args.quick))


if __name__ == "__main__":
    main()
