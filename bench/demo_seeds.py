"""The demo over several seeds: mean ± std AUC per method and issue 6's quality targets.

Runs `courier-fast demo` for each seed (resuming finished runs in <workdir>/<mode>-seed<S>),
prints per-seed AUCs, mean ± std, COURIER's margin over the best generic baseline and the
share of the no_image -> oracle gap it recovers, and merges the summary into
bench/results/<device>-demo.json under "quick" or "full", each with "run": the commit, dirty
flag, torch and date of the run that wrote it (the file's header is the last run's, and the two
modes are often run apart). `courier` is the default run
(courier_learned_query), listed once; "courier_query" names its query.

With --feature-forms each demo also scores every method's vector / simscore / cluster features
alone (courier_fast.pipeline.demo's feature_forms); the summary adds, per method and form, the AUC per
seed and its gain over "none" (ID / category features only), and names the best generic
baseline (highest mean AUC with all features) -- the table the README shows for it and COURIER.

With --runs NAME ... it trains, embeds and evaluates only those runs of courier_fast.pipeline.demo.RUNS
(e.g. courier_target_image, the paper's literal query, which the demo leaves out) on each seed's
world, with the demo's budget, and merges per-seed AUC / GAUC into
bench/results/<device>-demo_runs.json under "<mode>" / <run> (a file of its own: its header
names the torch and commit of these runs, not of the demo's).

    python bench/demo_seeds.py --quick --seeds 0 1 2 [--feature-forms]
    python bench/demo_seeds.py --quick --seeds 0 1 2 --runs courier_target_image
"""
import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from courier_fast.pipeline.demo import COURIER_QUERY, FORMS, GENERIC, ORDER, RUNS, _world, demo, label, run_method  # noqa: E402
from courier_fast.pipeline.evaluate import evaluate  # noqa: E402


def summarise(reports):
    per_seed = {m: [r["results"][m]["auc"] for r in reports] for m in ORDER}
    best_generic = np.max([per_seed[m] for m in GENERIC], axis=0)
    courier = np.array(per_seed["courier"])
    margin = courier - best_generic
    gap = np.array(per_seed["oracle_attributes"]) - np.array(per_seed["no_image"])
    recovered = (courier - np.array(per_seed["no_image"])) / gap
    return {"seeds": [r["seed"] for r in reports], "seconds": [r["seconds"] for r in reports],
            "courier_query": COURIER_QUERY,
            "auc": per_seed, "gauc": {m: [r["results"][m]["gauc"] for r in reports] for m in ORDER},
            "margin_over_best_generic": margin.tolist(), "gap_recovered": recovered.tolist(),
            "over_no_image": (courier - np.array(per_seed["no_image"])).tolist(),
            **(summarise_forms(reports) if "feature_forms" in reports[0] else {})}


def summarise_forms(reports):
    """{"feature_forms": {method: {form: {"auc": [per seed], "gain": [AUC - none's]}}}, "best_generic"}."""
    out = {}
    for m in reports[0]["feature_forms"]:
        rows = [r["feature_forms"][m] for r in reports]
        out[m] = {f: {"auc": [row[f]["auc"] for row in rows], "gain": [row[f]["auc"] - row["none"]["auc"] for row in rows]}
                  for f in ("none",) + FORMS + ("all",)}
    best = max(GENERIC, key=lambda m: np.mean(out[m]["all"]["auc"]))
    return {"feature_forms": out, "best_generic": best}


def print_forms(s):
    cols = FORMS + ("all",)
    print("\nAUC gain over ID / category features alone (mean ± std over seeds; paper: cluster > simscore > vector)")
    print(f"{'method':<24}" + "".join(f"{c:>18}" for c in cols))
    for m in ("courier", s["best_generic"], "oracle_attributes"):
        gains = [np.array(s["feature_forms"][m][c]["gain"]) for c in cols]
        print(f"{label(m):<24}" + "".join(f"{g.mean():>+11.4f} ± {g.std(ddof=1) if len(g) > 1 else 0:.4f}" for g in gains))


def seed_runs(names, seed, quick, workdir, log=print):
    """{run: {"auc", "gauc", "seconds"}} of `names` on seed's world at the demo's budget: runs of
    RUNS (trained, resuming, in <workdir>/<mode>-seed<S>/runs/<run>), "no_image" (ID / category
    features only) and "oracle_attributes" (the true attributes: the ceiling)."""
    from courier_fast.pipeline.demo import PRESETS
    from courier_fast.pipeline.evaluate import oracle_embeddings

    wd = os.path.join(workdir, f"{'quick' if quick else 'full'}-seed{seed}")
    world = _world(wd, seed, quick)
    out = {}
    for name in names:
        start = time.time()
        if name == "no_image":
            metrics = evaluate(world)
        elif name == "oracle_attributes":
            metrics = evaluate(world, oracle_embeddings(world, PRESETS[quick]["clusters"], seed))
        else:
            metrics = evaluate(world, run_method(name, world, wd, seed, quick, progress=False))
        out[name] = {"auc": metrics["auc"], "gauc": metrics["gauc"], "seconds": round(time.time() - start, 1)}
        log(f"seed {seed} {name:<24} AUC {metrics['auc']:.4f} GAUC {metrics['gauc']:.4f}")
    return out


def extra_runs(names, seeds, quick, workdir):
    """{run: {"seeds", "seconds", "auc", "gauc"} (lists per seed)} of RUNS outside the demo."""
    out = {n: {"seeds": list(seeds), "seconds": [], "auc": [], "gauc": []} for n in names}
    for s in seeds:
        for name, r in seed_runs(names, s, quick, workdir).items():
            for k in ("seconds", "auc", "gauc"):
                out[name][k].append(r[k])
    return out


def _merge(bench, key, value, per_run=False):
    """Set rows[key] = value in bench/results/<device>-<bench>.json (per_run: rows[key][run] for
    each run of value, keeping the other runs already there)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{harness.device_name()}-{bench}.json")
    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = json.load(f).get("rows", {})
    merged[key] = {**merged.get(key, {}), **value} if per_run else value
    print("wrote", harness.write_results(bench, {}, merged, path=path))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workdir", default="courier_demo")
    ap.add_argument("--feature-forms", action="store_true", help="also score each feature form alone")
    ap.add_argument("--runs", nargs="+", choices=sorted(RUNS), help="only these runs (not the whole demo)")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    if args.runs:
        out = extra_runs(args.runs, args.seeds, args.quick, args.workdir)
        for name in args.runs:
            a = np.array(out[name]["auc"])
            print(f"{name:<24}" + "".join(f"{v:>10.4f}" for v in a)
                  + f"{a.mean():>11.4f} ± {a.std(ddof=1) if len(a) > 1 else 0:.4f}")
        _merge("demo_runs", mode, out, per_run=True)
        return
    reports = [demo(seed=s, quick=args.quick, workdir=os.path.join(args.workdir, f"{mode}-seed{s}"), progress=False,
                    feature_forms=args.feature_forms) for s in args.seeds]
    s = summarise(reports)
    # the file's header names the last run's commit; each mode keeps the provenance of its own run
    s["run"] = {"git": harness._AT_START["commit"], "dirty": harness._AT_START["dirty"], "torch": torch.__version__,
                "date": datetime.date.today().isoformat()}
    print(f"\n{'method':<24}" + "".join(f"{'seed ' + str(k):>10}" for k in s["seeds"]) + f"{'mean ± std':>18}")
    for m in ORDER:
        a = np.array(s["auc"][m])
        print(f"{label(m):<24}" + "".join(f"{v:>10.4f}" for v in a) + f"{a.mean():>11.4f} ± {a.std(ddof=1) if len(a) > 1 else 0:.4f}")
    margin = np.array(s["margin_over_best_generic"])
    sd = margin.std(ddof=1) if len(margin) > 1 else float("nan")
    print(f"courier - best generic: {margin.mean():+.4f} ± {sd:.4f} (per seed {', '.join(f'{v:+.4f}' for v in margin)}); "
          f"gap recovered {', '.join(f'{100 * v:.0f} %' for v in s['gap_recovered'])}; "
          f"seconds {', '.join(f'{v:.0f}' for v in s['seconds'])}")
    if args.feature_forms:
        print_forms(s)
    _merge("demo", mode, s)


if __name__ == "__main__":
    main()
