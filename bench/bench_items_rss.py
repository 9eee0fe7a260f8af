"""Resident memory with items by reference (image files on disk) vs image bytes in items.parquet.

Builds, in --workdir, a world of N items (160 px JPEG files, ~9 KB each; real catalogues are
~30 KB) and 20 k request rows,
once with items.parquet naming the files (image_path) and once holding the bytes, then in a
fresh process per (layout, N) measures VmRSS after: importing torch + courier_fast,
load_dataset, 100 SessionLoader batches (64 rows, resized to 32 px), and embedding the whole
catalogue with `embed_catalogue` (a random test_efficientnet encoder at 32 px, 32 k-means
clusters), plus the peak RSS and the size of the item table (the id index: ids, categories,
titles and, in path mode, the path strings).
Writes bench/results/<device>-items_rss.json (or --results PATH) after every row, so each
row in it is this script's own output: a row whose process failed holds {"error": its stderr's
tail}, the run goes on, and the exit status is 1.

    python bench/bench_items_rss.py --items 20000 200000
    python bench/bench_items_rss.py --items 20000 --layouts path --results /tmp/try.json  # a trial
"""
import argparse
import io
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _rss_mb(field="VmRSS"):
    """This process's resident MB now (VmRSS) or at its peak (VmHWM). Not ru_maxrss: Linux carries
    it over fork + exec, so a child would report the parent's peak (here, the world builder's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


SIDE = 160


def build(root, n, rows=20_000, seed=0):
    """root/path (items.parquet -> images/<id>.jpg) and root/bytes (items.parquet with the bytes)."""
    import pyarrow as pa
    from PIL import Image

    from courier_fast.data.format import ITEM_PATH_SCHEMA, ITEM_SCHEMA, SESSION_SCHEMA, write_table

    if os.path.exists(os.path.join(root, "bytes", "pretrain.parquet")):
        return
    rng = np.random.default_rng(seed)
    base = []
    for k in range(1000):  # distinct JPEGs, cycled over the catalogue
        lin = np.linspace(0, 1, SIDE)
        img = (np.outer(lin, rng.random(3))[:, None, :] * 255 + rng.integers(0, 64, (SIDE, SIDE, 3))).clip(0, 255)
        buf = io.BytesIO()
        Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG", quality=85)
        base.append(buf.getvalue())
    ids = np.arange(n, dtype=np.int64) * 3 + 11
    os.makedirs(os.path.join(root, "path", "images"), exist_ok=True)
    for k, i in enumerate(ids):
        with open(os.path.join(root, "path", "images", f"{i}.jpg"), "wb") as f:
            f.write(base[k % len(base)])
    cats = (ids % 17).astype(np.int64)
    titles = [f"item {i}" for i in ids]
    write_table(pa.table({"item_id": ids, "image_path": [f"images/{i}.jpg" for i in ids], "category": cats,
                          "title": titles}, schema=ITEM_PATH_SCHEMA), os.path.join(root, "path", "items.parquet"))
    os.makedirs(os.path.join(root, "bytes"), exist_ok=True)
    write_table(pa.table({"item_id": ids, "image": [base[k % len(base)] for k in range(n)], "category": cats,
                          "title": titles}, schema=ITEM_SCHEMA), os.path.join(root, "bytes", "items.parquet"))
    sessions = pa.table({"user_id": rng.integers(0, 5000, rows), "history": list(rng.choice(ids, (rows, 5))),
                         "pv_items": list(rng.choice(ids, (rows, 5))), "clicks": list(rng.integers(0, 2, (rows, 5)))},
                        schema=SESSION_SCHEMA)
    for layout in ("path", "bytes"):
        for name in ("pretrain", "ctr_train", "ctr_test"):
            write_table(sessions, os.path.join(root, layout, f"{name}.parquet"))


def one(data, checkpoint, out):
    """Measure one layout in this (fresh) process; prints a JSON line."""
    rss = {"start": _rss_mb()}
    import torch

    from courier_fast.pipeline.catalogue import embed_catalogue
    from courier_fast.data import ImageDecoder, SessionLoader, load_dataset
    torch.set_num_threads(2)
    rss["imports"] = _rss_mb()
    t0 = time.perf_counter()
    d = load_dataset(data, ("pretrain",))
    seconds = {"load_dataset": time.perf_counter() - t0}
    rss["after_load_dataset"] = _rss_mb()
    loader = SessionLoader(d["items"], d["pretrain"], batch_size=64, decoder=ImageDecoder(backend="pil", size=32),
                           seed=0)
    t0 = time.perf_counter()
    for _, batch in zip(range(100), loader):
        pass
    seconds["100_batches"] = time.perf_counter() - t0
    rss["after_100_batches"] = _rss_mb()
    n_items = d["items"].num_rows
    table_mb = d["items"].nbytes / 2**20
    del d, loader, batch
    t0 = time.perf_counter()
    manifest = embed_catalogue(checkpoint, data, out, clusters=32, batch_size=512, device="cpu")
    seconds["embed_catalogue"] = time.perf_counter() - t0
    rss["after_embed"] = _rss_mb()
    peak = _rss_mb("VmHWM")
    print(json.dumps({"items": n_items, "items_table_mb": round(table_mb, 1), "parts": len(manifest["parts"]),
                      "kmeans": manifest["kmeans"], "rss_mb": {k: round(v, 1) for k, v in rss.items()},
                      "peak_rss_mb": round(peak, 1), "seconds": {k: round(v, 1) for k, v in seconds.items()},
                      "embed_items_per_s": round(n_items / seconds["embed_catalogue"], 1)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--layouts", nargs="+", choices=("path", "bytes"), default=["path", "bytes"])
    ap.add_argument("--workdir", default="/tmp/courier_items_rss160")
    ap.add_argument("--results", help="the JSON to write (default bench/results/<device>-items_rss.json)")
    ap.add_argument("--one", nargs=3, metavar=("DATA", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(*args.one)
    import shutil

    import harness

    from courier_fast.training.loop import TrainConfig, train

    rows, failed = {}, False
    for n in args.items:
        root = os.path.join(args.workdir, str(n))
        t0 = time.perf_counter()
        build(root, n)
        print(f"{n} items built in {time.perf_counter() - t0:.0f} s", flush=True)
        images = os.path.join(root, "path", "images")
        jpeg_mb = sum(os.path.getsize(os.path.join(images, f)) for f in os.listdir(images)) / 2**20
        ckpt = train(TrainConfig(data=os.path.join(root, "bytes"), out=os.path.join(root, "run"),
                                 method="random_encoder", encoder="test_efficientnet", embed_dim=64,
                                 image_size=32, progress=False))["checkpoint"]
        for layout in args.layouts:
            out = os.path.join(root, f"emb-{layout}")
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--one", os.path.join(root, layout), ckpt, out],
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            if done.returncode == 0:
                row = json.loads(done.stdout.strip().splitlines()[-1])
                row["jpeg_mb_on_disk"] = round(jpeg_mb, 1)
            else:
                failed, row = True, {"error": done.stderr.strip()[-2000:]}
            row["wall_s"] = round(time.perf_counter() - t0, 1)
            rows[f"{layout}-{n}"] = row
            print(layout, n, row, flush=True)
            print("wrote", harness.write_results("items_rss", {}, rows, path=args.results), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
