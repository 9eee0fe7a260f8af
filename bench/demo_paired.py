"""Paired comparison of demo configurations over seeds: the protocol for defaults (docs/design.md §5).

For a base configuration A (today's default) and challengers B, each a run of
courier_fast.pipeline.demo.RUNS or bench/demo_candidates.py's VARIANTS, it trains, embeds and
evaluates every run on each seed's world at the demo's budget (bench/demo_seeds.py's seed_runs;
runs resume in <workdir>/<mode>-seed<S>) and reports, per challenger B:
    per seed: cold-item AUC of A and of B and the paired difference B - A;
    the mean difference and its 95 % t-interval over seeds (n - 1 degrees of freedom);
    the decision: "change" (make B the default) only when at least MIN_SEEDS seeds are in and
    the interval lies wholly above zero; otherwise "keep" (A stays), saying whether the interval
    lies below zero ("A better") or straddles it ("no difference shown").
With no_image and oracle_attributes among the runs (the default) it also gives each run's share
of the no_image -> oracle gap per seed, mean and std. The JSON (bench/results/<device>-demo_paired.json,
or --out) is rewritten after every seed, so a run cut short leaves every finished seed usable:
    rows[<mode>] = {"base", "runs", "specs", "per_seed": {seed: {run: {"auc", "gauc", "seconds"}}},
                    "seeds": finished seeds, "auc": {run: [per seed]}, "paired": {B: {...}},
                    "gap_recovered": {run: {"per_seed", "mean", "std"}}}

    python bench/demo_paired.py --quick --seeds 0 1 2 3 4 5 6 7 8 9 \\
        --base courier_ids --runs courier_in_rank courier_ids_target courier_ids_logq [--workers 2]
    python bench/demo_paired.py --table [--out FILE]     # print the tables of a written JSON
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

MIN_SEEDS = 10  # docs/design.md §5: a default is judged on at least ten seeds
BOUNDS = ("no_image", "oracle_attributes")  # the gap's two ends: no pre-training needed


def paired(base, other, level=0.95, min_seeds=MIN_SEEDS):
    """The paired difference other - base over seeds (equal-length sequences of AUC):
    {"diff": per seed, "n", "mean", "std", "ci95": [lo, hi] (t-interval, n - 1 degrees of freedom;
    infinite for n < 2), "decision"}: "change" only when n >= min_seeds and lo > 0, else
    "keep (...)" with the reason."""
    from scipy.stats import t

    if len(base) != len(other) or len(base) == 0:
        raise ValueError(f"need one AUC per seed for both, got {len(base)} and {len(other)}")
    d = np.asarray(other, dtype=float) - np.asarray(base, dtype=float)
    n, mean = len(d), float(d.mean())
    std = float(d.std(ddof=1)) if n > 1 else float("nan")
    half = float(t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)) if n > 1 else math.inf
    lo, hi = mean - half, mean + half
    if lo > 0:
        decision = "change" if n >= min_seeds else f"keep (challenger better, but only {n} < {min_seeds} seeds)"
    elif hi < 0:
        decision = "keep (base better)"
    else:
        decision = "keep (no difference shown)"
    return {"diff": d.tolist(), "n": n, "mean": mean, "std": std, "ci95": [lo, hi], "decision": decision}


def gap_share(auc, no_image, oracle):
    """Per seed (auc - no_image) / (oracle - no_image): the share of the no-image -> oracle gap."""
    a, lo, hi = (np.asarray(x, dtype=float) for x in (auc, no_image, oracle))
    return ((a - lo) / (hi - lo)).tolist()


def summarise(per_seed, base, runs):
    """The summary of rows[<mode>] from {seed: {run: {"auc", ...}}}: seeds with every run finished."""
    names = [base] + list(runs)
    seeds = sorted(s for s, r in per_seed.items() if all(n in r for n in names))
    auc = {n: [per_seed[s][n]["auc"] for s in seeds] for n in names}
    out = {"seeds": seeds, "auc": auc, "gauc": {n: [per_seed[s][n]["gauc"] for s in seeds] for n in names},
           "seconds": {n: [per_seed[s][n]["seconds"] for s in seeds] for n in names}}
    if seeds:
        out["paired"] = {b: paired(auc[base], auc[b]) for b in runs if b not in BOUNDS}
    if seeds and all(b in names for b in BOUNDS):
        out["gap_recovered"] = {}
        for n in names:
            if n in BOUNDS:
                continue
            share = np.array(gap_share(auc[n], auc["no_image"], auc["oracle_attributes"]))
            out["gap_recovered"][n] = {"per_seed": share.tolist(), "mean": float(share.mean()),
                                       "std": float(share.std(ddof=1)) if len(share) > 1 else float("nan")}
    return out


def format_tables(row):
    """The paired table of each challenger against the base, and the gap shares."""
    base, seeds, auc = row["base"], row["seeds"], row["auc"]
    lines = []
    for b, p in row.get("paired", {}).items():
        lines.append(f"\n{b} (B) vs {base} (A), cold-item AUC, quick={row['quick']}")
        lines.append(f"{'seed':>6}{'A':>10}{'B':>10}{'B - A':>10}")
        for s, a, v, d in zip(seeds, auc[base], auc[b], p["diff"]):
            lines.append(f"{s:>6}{a:>10.4f}{v:>10.4f}{d:>+10.4f}")
        lines.append(f"mean B - A {p['mean']:+.4f} (std {p['std']:.4f}, n {p['n']}), "
                     f"95 % interval [{p['ci95'][0]:+.4f}, {p['ci95'][1]:+.4f}]: {p['decision']}")
    for n, g in row.get("gap_recovered", {}).items():
        lines.append(f"{n:<24} share of the no_image -> oracle gap {100 * g['mean']:.0f} % ± {100 * g['std']:.0f} "
                     f"(per seed {', '.join(f'{100 * v:.0f}' for v in g['per_seed'])})")
    return "\n".join(lines)


def _one_seed(job):
    """A worker: every run of one seed (a process of its own, `threads` torch threads)."""
    names, seed, quick, workdir, threads = job
    import torch

    torch.set_num_threads(threads)
    import demo_candidates
    import demo_seeds
    from courier_fast.pipeline.demo import RUNS

    RUNS.update(demo_candidates.VARIANTS)  # run_method looks the runs up by name
    return seed, demo_seeds.seed_runs(names, seed, quick, workdir, log=lambda m: print(m, flush=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(MIN_SEEDS)))
    ap.add_argument("--base", default="courier_ids", help="today's default (A)")
    ap.add_argument("--runs", nargs="+", default=["courier_in_rank"], help="challengers (B)")
    ap.add_argument("--no-bounds", action="store_true", help="leave out no_image / oracle_attributes")
    ap.add_argument("--workdir", default=os.path.join("courier_demo", "paired"))
    ap.add_argument("--workers", type=int, default=1, help="seeds trained at once (a process each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", help="results JSON (default bench/results/<device>-demo_paired.json)")
    ap.add_argument("--table", action="store_true", help="only print the tables of --out")
    args = ap.parse_args()
    path = args.out or os.path.join(harness.HERE, "results", f"{harness.device_name()}-demo_paired.json")
    mode = "quick" if args.quick else "full"
    if args.table:
        with open(path) as f:
            for row in json.load(f)["rows"].values():
                print(format_tables(row))
        return
    import demo_candidates
    from courier_fast.pipeline.demo import RUNS

    known = set(RUNS) | set(demo_candidates.VARIANTS) | set(BOUNDS)
    bad = [n for n in [args.base] + args.runs if n not in known]
    if bad:
        ap.error(f"unknown runs {bad}; known: {sorted(known)}")
    challengers = list(dict.fromkeys(args.runs + ([] if args.no_bounds else list(BOUNDS))))
    names = list(BOUNDS if not args.no_bounds else ()) + [args.base] + [n for n in challengers if n not in BOUNDS]
    specs = {n: list({**RUNS, **demo_candidates.VARIANTS}[n]) for n in names if n not in BOUNDS}
    per_seed = {}
    jobs = [(names, s, args.quick, args.workdir, args.threads) for s in args.seeds]
    if args.workers > 1:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(args.workers)
        results = pool.imap_unordered(_one_seed, jobs)
    else:
        results = map(_one_seed, jobs)
    for seed, runs in results:
        per_seed[seed] = runs
        row = {"quick": args.quick, "base": args.base, "runs": challengers, "specs": specs,
               "per_seed": {str(s): per_seed[s] for s in sorted(per_seed)},
               **summarise(per_seed, args.base, challengers)}
        print(format_tables(row), flush=True)
        print("wrote", harness.write_results("demo_paired", {}, {mode: row}, path=path), flush=True)


if __name__ == "__main__":
    main()
