"""Encoder micro-batching (courier_fast.training.grad_cache): peak memory and time per image as the batch grows.

For each request-row count R (--rows, default 64 512 4096) and each mode -- plain (one encoder
forward over the batch) and micro (--micro-batch K images per forward, two passes) -- one fresh
process runs train()'s own COURIER step (courier_fast.training.loop.train_step, float32, CPU) with a
tiny timm encoder at 32 px, fed batch by batch by SessionLoader (decode in the training thread:
prefetch 0, so decoding does not share the cores with the timed step), on a generated world with
enough items that a batch's images are mostly distinct. Per row:
  images_per_step      distinct items of the batch: images the plain step encodes once (the
                       micro-batched one forwards each twice: pass 1 without a graph, pass 2 with)
  candidates_per_step  valid page-view slots: the in-batch negatives of each InfoNCE row
  seconds_per_step     median train_step time over the timed steps (data loading not included;
                       max(--steps, 4096 // R) timed steps, at most 20, after --warmup)
  ms_per_image         seconds_per_step / images_per_step
  peak_rss_mb          the process's peak RSS (VmHWM, reset after imports), absolute
  step_peak_mb         peak RSS minus the RSS before the first batch was loaded: what loading
                       and stepping add on top of torch, the item table and the model
Each (R, mode) process runs --repeats times (default 2), the modes in ABBA order (plain, micro,
micro, plain, ...), because this machine's speed drifts by tens of percent over minutes: "runs"
keeps every process, "table" one row per (R, mode) with ms_per_image the mean over its repeats
and the peak RSS the largest. Summary (from the table): micro peak RSS at the largest R over the
smallest (the issue's target: <= 1.5), micro ms/image over plain ms/image at each R (target
<= 1.5), and the memory each extra image costs (slope of step_peak_mb between the smallest and
largest R) in either mode.

"swin_t_224_80gb" (arithmetic, not run on a GPU): the images and page-view candidates one step
can hold on one 80 GB GPU for Swin-T at 224 px in bf16, plain and micro-batched, from the
activation bytes autograd saves per image (counted here, on the CPU, with saved_tensors_hooks under
bf16 autocast), the 224 px image sizes, and the other per-image bytes the micro-batched rows here
kept for the whole batch (scaled from embed_dim 128 to the paper's 256).

    python bench/bench_micro_batch.py                      # the README's table (about 30 min, 2 cores)
    python bench/bench_micro_batch.py --rows 64 512 --steps 2 --quick
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ENCODER, IMAGE_SIZE, EMBED_DIM = "test_efficientnet", 32, 128


def steps_for(rows, steps):
    """Timed steps at `rows` rows: enough for small batches to time more than a blink."""
    return min(20, max(steps, 4096 // rows))


def world_config(row_counts, steps, warmup):
    """A world whose pretrain table holds every row count's batches and whose batches rarely
    repeat an item (about 25 items per pretrain row of the largest batch)."""
    from courier_fast.data.generate import WorldConfig

    need = max(r * (steps_for(r, steps) + warmup) for r in row_counts)
    users = max(64, -(-need * 2 // 16) + 32)  # half the requests are pretrain rows
    max_rows = max(row_counts)
    return WorldConfig(items=max(2000, 25 * max_rows), users=users, requests_per_user=16, image_size=IMAGE_SIZE)


def one(world, rows, mode, micro_batch, steps, warmup):
    """One (rows, mode) row as a dict: `warmup` untimed then `steps` timed train_steps (run in a
    fresh process: the peak RSS is the process's)."""
    import courier_fast as cf
    from courier_fast.data import SessionLoader, load_dataset
    from courier_fast.models.methods import build_method
    from courier_fast.training.loop import train_step

    torch.manual_seed(0)
    data = load_dataset(world, tables=("pretrain",))
    method = build_method("courier", data["items"], encoder=ENCODER, embed_dim=EMBED_DIM, batch_rows=rows)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loader = SessionLoader(data["items"], data["pretrain"], batch_size=rows, drop_last=True, seed=0, prefetch=0,
                           image_size=IMAGE_SIZE)
    generator = torch.Generator().manual_seed(0)
    harness.reset_peak_rss()
    base = harness.rss_mb()
    times, images, candidates = [], [], []
    batches = loader.batches()
    with cf._validate.input_checks(False):  # as train() does; restored after (tests call this in-process)
        for k in range(warmup + steps):
            batch = next(batches)
            t0 = time.perf_counter()
            train_step(method, batch, generator, opt, scaler,
                       encoder_micro_batch=micro_batch if mode == "micro" else None)
            t1 = time.perf_counter()
            if k >= warmup:
                times.append(t1 - t0)
                images.append(batch.images.shape[0])
                candidates.append(int((~batch.pv_pad).sum()))
            del batch
    peak = harness.peak_rss_mb()
    sec = statistics.median(times)
    per_step = statistics.mean(images)
    return {"rows": rows, "mode": mode, "micro_batch": micro_batch if mode == "micro" else None,
            "images_per_step": per_step, "candidates_per_step": statistics.mean(candidates),
            "seconds_per_step": round(sec, 3), "ms_per_image": round(1e3 * sec / per_step, 4),
            "peak_rss_mb": round(peak, 1), "step_peak_mb": round(peak - base, 1), "steps": len(times),
            "warmup": warmup, "encoder": ENCODER, "image_size": IMAGE_SIZE, "embed_dim": EMBED_DIM,
            "dtype": "float32"}


def saved_bytes(n, encoder="swin_tiny_patch4_window7_224", size=224, dtype=torch.bfloat16):
    """Bytes autograd saves for backward in a forward of n images through `encoder` (timm, no
    weights loaded) under CPU autocast in `dtype`, distinct storages counted once, parameters
    excluded; (that, parameter count, feature width)."""
    import timm

    model = timm.create_model(encoder, pretrained=False, num_classes=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.device.type == "cpu":
            seen[s.data_ptr()] = s.nbytes()
        return t

    x = torch.randn(n, 3, size, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=dtype):
        model(x)
    params_count = sum(p.numel() for p in model.parameters())
    return sum(seen.values()), params_count, model.num_features


def swin_estimate(other_bytes_per_image, measured_embed_dim=EMBED_DIM, gpu_gb=80, micro_batch=256, history=5,
                  page=10, embed_dim=256):
    """Arithmetic for one GPU (module docstring); every input is in the returned dict.

    other_bytes_per_image: what a micro-batched step kept per image on this CPU besides the
    uint8 image (its memory slope minus 3 x 32 x 32 bytes: embeddings, their gradients, the
    loss's and attention's per-candidate state, the decoder's buffers), at measured_embed_dim;
    scaled to embed_dim, since that state is O(d) per image."""
    two, params, features = saved_bytes(2)
    four, _, _ = saved_bytes(4)
    act = (four - two) / 2  # per image: what is saved once per forward (bf16 weight copies) cancels
    weights_and_adam = params * (4 + 4 + 8)        # fp32 weights, fp32 grads, AdamW's two fp32 moments
    reserve = 0.10 * gpu_gb * 2**30                # allocator fragmentation, cuDNN / cuBLAS workspaces, CUDA context
    budget = gpu_gb * 2**30 - weights_and_adam - reserve
    image_u8 = 3 * 224 * 224                        # the decoded batch (kept whole: pass 2 re-reads it)
    image_float = 2 * 3 * 224 * 224 * 4             # fp32 normalised + augmented copies of an image being encoded
    other = other_bytes_per_image * embed_dim / measured_embed_dim
    plain_images = budget / (act + image_u8 + image_float + other)  # everything for the whole batch at once
    micro_images = (budget - micro_batch * (act + image_float)) / (image_u8 + other)  # activations: one chunk
    share = page / (page + history)                # images of a step that are page-view candidates
    return {"unrun": True, "gpu_memory_gb": gpu_gb, "encoder": "swin_tiny_patch4_window7_224", "image_size": 224,
            "dtype": "bfloat16", "saved_activation_bytes_per_image": round(act), "encoder_params": params,
            "encoder_features": features, "embed_dim": embed_dim, "weights_grads_adam_bytes": weights_and_adam,
            "reserve_bytes": round(reserve), "micro_batch": micro_batch, "image_bytes_uint8": image_u8,
            "image_bytes_float_in_flight": image_float, "other_bytes_per_image": round(other),
            "history": history, "page_views": page,
            "plain_images_per_step": int(plain_images), "plain_candidates_per_step": int(plain_images * share),
            "micro_images_per_step": int(micro_images), "micro_candidates_per_step": int(micro_images * share),
            "paper_candidates_per_step": 48 * 64 * page}


def mode_order(repeats):
    """The (repeat, mode) processes of one row count, ABBA: plain, micro, micro, plain, ..."""
    return [(r, mode) for r in range(repeats) for mode in (("plain", "micro") if r % 2 == 0 else ("micro", "plain"))]


def table(runs):
    """One row per (rows, mode) of `runs` (error rows skipped): the first run's fields, with
    ms_per_image and seconds_per_step the mean over its repeats, peak_rss_mb and step_peak_mb the
    largest, and "repeats" / "ms_per_image_each"."""
    grouped = {}
    for run in runs:
        if "error" not in run:
            grouped.setdefault((run["rows"], run["mode"]), []).append(run)
    out = []
    for same in grouped.values():
        row = {k: v for k, v in same[0].items() if k != "repeat"}
        row.update(repeats=len(same), ms_per_image=round(statistics.mean(x["ms_per_image"] for x in same), 4),
                   seconds_per_step=round(statistics.mean(x["seconds_per_step"] for x in same), 3),
                   ms_per_image_each=[x["ms_per_image"] for x in same],
                   peak_rss_mb=max(x["peak_rss_mb"] for x in same), step_peak_mb=max(x["step_peak_mb"] for x in same))
        out.append(row)
    return out


def summarize(rows, row_counts, micro_batch):
    """The summary (module docstring) of table() rows."""
    ok = {(x["rows"], x["mode"]): x for x in rows}
    lo, hi = min(row_counts), max(row_counts)
    summary = {}
    if (lo, "micro") in ok and (hi, "micro") in ok:
        summary["micro_peak_ratio_largest_over_smallest"] = ok[hi, "micro"]["peak_rss_mb"] / ok[lo, "micro"]["peak_rss_mb"]
    summary["micro_over_plain_ms_per_image"] = {str(r): ok[r, "micro"]["ms_per_image"] / ok[r, "plain"]["ms_per_image"]
                                                for r in row_counts if (r, "micro") in ok and (r, "plain") in ok}
    for mode in ("plain", "micro"):
        if (lo, mode) in ok and (hi, mode) in ok and hi != lo:
            a, b = ok[lo, mode], ok[hi, mode]
            summary[f"{mode}_kb_per_extra_image"] = (1024 * (b["step_peak_mb"] - a["step_peak_mb"])
                                                     / (b["images_per_step"] - a["images_per_step"]))
    if "micro_kb_per_extra_image" in summary:
        other = max(0.0, 1024 * summary["micro_kb_per_extra_image"] - 3 * IMAGE_SIZE * IMAGE_SIZE)
        summary["swin_t_224_80gb"] = swin_estimate(other, micro_batch=micro_batch)
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 512, 4096])
    ap.add_argument("--micro-batch", type=int, default=256, help="images per encoder forward in micro mode")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="processes per (rows, mode), in ABBA order")
    ap.add_argument("--workdir", default="courier_bench_micro", help="where the generated world goes")
    ap.add_argument("--quick", action="store_true", help="write …-quick.json (not kept in git)")
    ap.add_argument("--one", nargs=2, metavar=("ROWS", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    world = os.path.join(args.workdir, "world")
    if args.one:
        print(json.dumps(one(world, int(args.one[0]), args.one[1], args.micro_batch, args.steps, args.warmup)))
        return
    from courier_fast.data.generate import generate

    cfg = world_config(args.rows, args.steps, args.warmup)
    stamp = os.path.join(world, "bench_world.json")
    if not (os.path.exists(stamp) and json.load(open(stamp)) == vars(cfg)):
        t = time.time()
        generate(world, seed=0, config=cfg)
        with open(stamp, "w") as f:
            json.dump(vars(cfg), f)
        print(f"world: {cfg} ({time.time() - t:.0f} s)")
    runs = []
    for r in args.rows:
        for repeat, mode in mode_order(args.repeats):
            cmd = [sys.executable, os.path.abspath(__file__), "--one", str(r), mode, "--micro-batch",
                   str(args.micro_batch), "--steps", str(steps_for(r, args.steps)), "--warmup", str(args.warmup),
                   "--workdir", args.workdir]
            out = subprocess.run(cmd, capture_output=True, text=True)
            row = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                   else {"rows": r, "mode": mode, "error": out.stderr.strip()[-400:]})
            row["repeat"] = repeat
            runs.append(row)
            print(json.dumps(row), flush=True)
    rows = table(runs)
    summary = summarize(rows, args.rows, args.micro_batch)
    print(json.dumps(summary, indent=1))
    print("wrote", harness.write_results("micro_batch", {}, {"runs": runs, "table": rows, "summary": summary}, quick=args.quick))


if __name__ == "__main__":
    main()
