"""The round trip: the quick world written as public files, imported, and the quick demo on it.

For each seed: `generate --layout files` (images/, items.csv, interactions.csv: clicks with
timestamps, no impressions), `import` it with the native split times and 9 negatives per click
sampled as of the request (pages of 10, as the native world shows; an import left in --workdir
by an importer with another sampling rule is redone, with the demo runs on it), run the quick
demo on the imported directory (the world's oracle.parquet copied in, for the ceiling) and on
the native world; merges AUCs side by side, COURIER's margin over the best generic baseline on
each, the import time and its report (rows, sampling rule, cold share) into
bench/results/<device>-import_roundtrip.json.

    python bench/import_roundtrip.py --seeds 0
"""
import argparse
import datetime
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import harness  # noqa: E402

from courier_fast.data.generate import EPOCH, WorldConfig, generate, split_days  # noqa: E402
from courier_fast.data.import_sessions import NEGATIVE_RULE  # noqa: E402
from courier_fast.data.importer import ImportConfig, import_dataset  # noqa: E402
from courier_fast.pipeline.demo import GENERIC, demo  # noqa: E402


def margin(report):
    res = report["results"]
    return res["courier"]["auc"] - max(res[m]["auc"] for m in GENERIC)


def _imported_rule(data):
    """The negative-sampling rule of the import in `data`, or None when there is none."""
    if not os.path.exists(os.path.join(data, "import.json")):
        return None
    with open(os.path.join(data, "import.json")) as f:
        return json.load(f).get("negative_sampling", {}).get("rule")


def run_seed(seed, workdir, negatives):
    files = os.path.join(workdir, f"files-seed{seed}")
    data = os.path.join(workdir, f"imported-seed{seed}", "data")
    if not os.path.exists(os.path.join(files, "interactions.csv")):
        generate(files, seed=seed, quick=True, layout="files")
    if _imported_rule(data) != NEGATIVE_RULE:  # not imported yet, or by an importer with another rule:
        shutil.rmtree(os.path.dirname(data), ignore_errors=True)  # then the demo's runs on it are stale too
        os.makedirs(os.path.dirname(data), exist_ok=True)
        cuts = tuple((EPOCH + datetime.timedelta(days=d)).date().isoformat() for d in split_days(WorldConfig.quick()))
        t0 = time.perf_counter()
        import_dataset(ImportConfig(interactions=os.path.join(files, "interactions.csv"),
                                    items=os.path.join(files, "items.csv"), images=os.path.join(files, "images"),
                                    out=data, split_times=cuts, negatives=negatives, seed=seed, progress=False))
        print(f"seed {seed}: imported in {time.perf_counter() - t0:.1f} s", flush=True)
        shutil.copy(os.path.join(files, "oracle.parquet"), os.path.join(data, "oracle.parquet"))
    with open(os.path.join(data, "import.json")) as f:
        imp = json.load(f)
    imported = demo(seed=seed, quick=True, workdir=os.path.join(workdir, f"imported-seed{seed}"), data=data,
                    progress=False)
    native = demo(seed=seed, quick=True, workdir=os.path.join(workdir, f"native-seed{seed}"), progress=False)
    return {"native": native["results"], "imported": imported["results"],
            "margin_over_best_generic": {"native": margin(native), "imported": margin(imported)},
            "demo_seconds": {"native": native["seconds"], "imported": imported["seconds"]},
            "import": {"seconds": imp["seconds"]["total"], "interactions": imp["interactions"], "rows": imp["rows"],
                       "negatives": negatives, "negative_sampling": imp["negative_sampling"]["rule"],
                       "rows_short_of_negatives": imp["rows_short_of_negatives"],
                       "cold_items_ctr_test": imp["cold_items_ctr_test"], "split_times": imp["split_times"]}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--negatives", type=int, default=9)
    ap.add_argument("--workdir", default="courier_demo/roundtrip")
    ap.add_argument("--results", help="the JSON to merge into (default bench/results/<device>-import_roundtrip.json)")
    args = ap.parse_args()
    path = args.results or os.path.join(HERE, "results", f"{harness.device_name()}-import_roundtrip.json")
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            rows = json.load(f).get("rows", {})
    for seed in args.seeds:
        rows[f"quick-seed{seed}"] = r = run_seed(seed, args.workdir, args.negatives)
        print(f"\nseed {seed}{'method':>20}{'native':>10}{'imported':>10}")
        for m in r["native"]:
            imp = r["imported"].get(m, {}).get("auc", float("nan"))
            print(f"{m:>27}{r['native'][m]['auc']:>10.4f}{imp:>10.4f}")
        print(f"courier - best generic: native {r['margin_over_best_generic']['native']:+.4f}, "
              f"imported {r['margin_over_best_generic']['imported']:+.4f}", flush=True)
    print("wrote", harness.write_results("import_roundtrip", {}, rows, path=path))


if __name__ == "__main__":
    main()
