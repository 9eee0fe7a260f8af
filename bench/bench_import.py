"""`courier-fast import` at scale: wall time and peak RSS for synthetic logs of 10^6 and 10^7
interactions over a 200 k-item catalogue with image files (bench_items_rss.py's world), each
import in a fresh process with DuckDB capped at --memory-limit (it spills past it).

The log: users with power-law activity, Zipf item popularity, times uniform over 90 days,
CSV (user_id, item_id, timestamp in unix seconds), no impressions; imported with the
defaults (5 history items, 4 negatives sampled as of each request from the newest 1/16 of its
split's earlier positives, 0.5/0.25/0.25 by time).
Writes bench/results/<device>-import.json.

    python bench/bench_import.py --interactions 1000000 10000000
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def write_log(path, n, items, users, seed=0):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    ranks = np.arange(1, len(items) + 1)
    p_item = 1.0 / ranks**0.9
    p_item /= p_item.sum()
    p_user = 1.0 / np.arange(1, users + 1) ** 0.7
    p_user /= p_user.sum()
    with pacsv.CSVWriter(path, pa.schema([("user_id", pa.int64()), ("item_id", pa.int64()),
                                          ("timestamp", pa.int64())])) as w:
        for start in range(0, n, 1_000_000):
            m = min(1_000_000, n - start)
            w.write_table(pa.table({"user_id": rng.choice(users, m, p=p_user),
                                    "item_id": items[rng.choice(len(items), m, p=p_item)],
                                    "timestamp": 1_700_000_000 + rng.integers(0, 90 * 86400, m)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interactions", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--items", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=200_000)
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/courier_items_rss")
    ap.add_argument("--results", help="the JSON to write (default bench/results/<device>-import.json)")
    args = ap.parse_args()
    import harness
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from bench_items_rss import build

    root = os.path.join(args.workdir, str(args.items))
    build(root, args.items)
    items_csv = os.path.join(root, "items.csv")
    if not os.path.exists(items_csv):
        t = pq.read_table(os.path.join(root, "path", "items.parquet"), columns=["item_id", "category", "title"])
        pacsv.write_csv(t, items_csv)
    ids = pq.read_table(items_csv.replace("items.csv", "path/items.parquet"), columns=["item_id"]).column(0).to_numpy()
    rows = {}
    for n in args.interactions:
        log = os.path.join(root, f"log-{n}.csv")
        if not os.path.exists(log):
            write_log(log, n, ids, args.users)
        out = os.path.join(root, f"imported-{n}")
        shutil.rmtree(out, ignore_errors=True)
        # the import in-process, so that the RSS before it (torch, imported by the package and the CLI)
        # can be told apart from the peak during it
        # (VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from this parent)
        peak_probe = ("import sys; from courier_fast.cli import main\n"
                      "def kb(f): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith(f))\n"
                      "print('BASE_KB', kb('VmHWM:')); rc = main(sys.argv[1:]); print('PEAK_KB', kb('VmHWM:')); "
                      "sys.exit(rc)")
        cmd = [sys.executable, "-c", peak_probe, "import", "--interactions", log, "--items", items_csv,
               "--images", os.path.join(root, "path", "images"), "--out", out, "--memory-limit", args.memory_limit,
               "--threads", str(args.threads), "--no-progress"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(done.stderr[-2000:])
        kb = {w.split()[0]: int(w.split()[1]) for w in done.stdout.splitlines() if w.endswith(tuple("0123456789"))
              and w.startswith(("BASE_KB", "PEAK_KB"))}
        with open(os.path.join(out, "import.json")) as f:
            rep = json.load(f)
        rows[f"{n}"] = {"interactions": n, "items": args.items, "log_mb": round(os.path.getsize(log) / 2**20, 1),
                        "wall_s": round(wall, 1), "import_s": rep["seconds"],
                        "rss_before_import_mb": round(kb["BASE_KB"] / 1024, 1),
                        "peak_rss_mb": round(kb["PEAK_KB"] / 1024, 1),
                        "memory_limit": args.memory_limit, "threads": args.threads, "rows": rep["rows"],
                        "negative_sampling": rep["negative_sampling"],
                        "rows_short_of_negatives": rep["rows_short_of_negatives"],
                        "cold_items_ctr_test": rep["cold_items_ctr_test"]}
        print(n, rows[f"{n}"], flush=True)
        shutil.rmtree(out)
    print("wrote", harness.write_results("import", {}, rows, path=args.results))


if __name__ == "__main__":
    main()
