"""The main job before and after a change, in one sitting: `courier-fast demo` from two checkouts.

Each checkout is a directory holding the package with its extension built in place (a git
worktree of the older commit, `python setup.py build_ext --inplace`). The demo runs on the same
seed from each, in ABBA order (before, after, after, before, ...), because this machine's speed
drifts over minutes; each run gets a fresh work directory (the demo resumes finished runs) and
each checkout its own self-check cache, warmed by `courier-fast selftest` before the first timed
run, so that no timed run pays for the self-check. Per run: the checkout's commit, the demo's
own "seconds" (world, pre-training, embedding, evaluation) and every method's AUC; summary: mean
seconds per side, after / before, and each method's AUC per side (the backends round
differently, so AUCs may move in the last digits).

    python bench/demo_abba.py --before /tmp/before --after . --quick [--seed 0] [--repeats 1]

writes bench/results/cpu-demo_abba.json (the "git" field is the after checkout's, where this
script runs from).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402


def _commit(checkout):
    out = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def _env(checkout, cache):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout), COURIER_FAST_CACHE_DIR=cache)
    env.pop("TRITON_INTERPRET", None)
    return env


def run_demo(checkout, cache, seed, quick):
    """One demo run from `checkout` in a fresh work directory -> {"seconds", "auc": {method: AUC}}."""
    with tempfile.TemporaryDirectory(prefix="demo_abba_") as work:
        path = os.path.join(work, "results.json")
        cmd = [sys.executable, "-m", "courier_fast", "demo", "--seed", str(seed), "--workdir", work,
               "--json", path, "--no-progress"] + (["--quick"] if quick else [])
        subprocess.run(cmd, env=_env(checkout, cache), check=True, stdout=subprocess.DEVNULL)
        with open(path) as f:
            report = json.load(f)
    return {"seconds": report["seconds"], "auc": {k: v["auc"] for k, v in report["results"].items()}}


def abba(repeats):
    """("before", "after", "after", "before") repeated: each side runs first as often as last."""
    return [side for _ in range(repeats) for side in ("before", "after", "after", "before")]


def summarize(runs):
    out = {}
    for side in ("before", "after"):
        mine = [r for r in runs if r["side"] == side]
        methods = sorted(mine[0]["auc"]) if mine else []
        out[side] = {"seconds_mean": round(statistics.mean(r["seconds"] for r in mine), 1),
                     "auc_mean": {m: round(statistics.mean(r["auc"][m] for r in mine), 5) for m in methods}}
    out["after_over_before"] = round(out["after"]["seconds_mean"] / out["before"]["seconds_mean"], 3)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="checkout of the older commit, extension built in place")
    ap.add_argument("--after", default=".", help="checkout of the newer commit (default: this one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1, help="ABBA blocks (each runs the demo 4 times)")
    ap.add_argument("--quick", action="store_true", help="`courier-fast demo --quick` (the README's main job)")
    ap.add_argument("--out")
    args = ap.parse_args()
    checkouts = {"before": args.before, "after": args.after}
    with tempfile.TemporaryDirectory(prefix="demo_abba_cache_") as caches:
        cache = {side: os.path.join(caches, side) for side in checkouts}
        for side, checkout in checkouts.items():  # warm each side's self-check verdicts, untimed
            subprocess.run([sys.executable, "-m", "courier_fast", "selftest", "--device", "cpu"],
                           env=_env(checkout, cache[side]), check=True, stdout=subprocess.DEVNULL)
        runs = []
        for i, side in enumerate(abba(args.repeats)):
            res = run_demo(checkouts[side], cache[side], args.seed, args.quick)
            runs.append({"order": i, "side": side, "commit": _commit(checkouts[side]), **res})
            print(f"{i}: {side:<6} {runs[-1]['commit']} {res['seconds']:>7.1f} s  "
                  + "  ".join(f"{k} {v:.4f}" for k, v in sorted(res["auc"].items())), flush=True)
    summary = summarize(runs)
    print(json.dumps(summary, indent=1))
    rows = [{"seed": args.seed, "quick": args.quick, "runs": runs, "summary": summary}]
    print("wrote", harness.write_results("demo_abba", {}, rows, args.out))


if __name__ == "__main__":
    main()
