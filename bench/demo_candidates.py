"""COURIER on the demo with and without candidate ids and the logQ correction (issue 19).

Trains, embeds and evaluates the default COURIER run (learned query) in these variants on each
seed's world, with the demo's budget (bench/demo_seeds.py's extra_runs):
    courier_ids          candidate_ids=True: accidental hits by item id (CourierModel's default)
    courier_in_rank      candidate_ids=False: the previous rule (one candidate per distinct item
                         of the rank unless clicked in several rows)
    courier_ids_logq     candidate ids and the logQ correction (courier-fast train --logq)
    courier_ids_target   candidate ids and the target-aware query (query="target")
    courier_ids_t010     the default with temperature 0.1 (CourierModel's is 0.05)
    courier_ids_t0025    the default with temperature 0.025
    courier_ids_ctr2     the default with the CTR head's loss weight 2 (CourierModel's is 1)
    courier_ids_hist05   the default with the history self-reconstruction weight 0.5 (is 1)
    courier_ids_t020     temperature 0.2 (against courier_ids_t010, the default since issue 28)
    courier_ids_t010_ctr2  temperature 0.1 and the CTR head's loss weight 2
and writes per-seed cold-item AUC / GAUC to bench/results/<device>-demo_candidates.json (or
--out) under "quick" / "full". A single process: no cross-rank duplicates, so the first two
differ only in how in-rank duplicates count (every copy left out of the anchor's own
denominator and repeated negatives counted per slot, against one candidate per item).

    python bench/demo_candidates.py --quick --seeds 0 1 2 [--workdir DIR] [--runs NAME ...]

bench/demo_paired.py compares two of them (or any RUNS) seed by seed (docs/design.md §5).
Options a variant does not name take CourierModel's defaults at the commit that runs it (the
temperature was 0.05 before issue 28 made it 0.1): each results JSON names its commit.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import demo_seeds  # noqa: E402
import harness  # noqa: E402

from courier_fast.pipeline.demo import RUNS  # noqa: E402

VARIANTS = {
    "courier_ids": ("courier", {"query": "learned", "method_options": {"candidate_ids": True}}),
    "courier_in_rank": ("courier", {"query": "learned", "method_options": {"candidate_ids": False}}),
    "courier_ids_logq": ("courier", {"query": "learned", "logq": True, "method_options": {"candidate_ids": True}}),
    "courier_ids_target": ("courier", {"query": "target", "method_options": {"candidate_ids": True}}),
    # issue 28 item 3: where the default may leave signal, each judged against courier_ids
    "courier_ids_t010": ("courier", {"query": "learned", "temperature": 0.1, "method_options": {"candidate_ids": True}}),
    "courier_ids_t0025": ("courier", {"query": "learned", "temperature": 0.025,
                                      "method_options": {"candidate_ids": True}}),
    "courier_ids_ctr2": ("courier", {"query": "learned", "ctr_weight": 2.0, "method_options": {"candidate_ids": True}}),
    "courier_ids_hist05": ("courier", {"query": "learned", "history_weight": 0.5,
                                       "method_options": {"candidate_ids": True}}),
    "courier_ids_t020": ("courier", {"query": "learned", "temperature": 0.2, "method_options": {"candidate_ids": True}}),
    "courier_ids_t010_ctr2": ("courier", {"query": "learned", "temperature": 0.1, "ctr_weight": 2.0,
                                          "method_options": {"candidate_ids": True}}),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--workdir", default="courier_demo_candidates")
    ap.add_argument("--runs", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    ap.add_argument("--out", help="results JSON (default bench/results/<device>-demo_candidates.json)")
    args = ap.parse_args()
    RUNS.update(VARIANTS)  # run_method looks the runs up by name
    out = demo_seeds.extra_runs(args.runs, args.seeds, args.quick, args.workdir)
    for name in args.runs:
        a = np.array(out[name]["auc"])
        print(f"{name:<20}" + "".join(f"{v:>10.4f}" for v in a)
              + f"{a.mean():>11.4f} ± {a.std(ddof=1) if len(a) > 1 else 0:.4f}")
    print("wrote", harness.write_results("demo_candidates", {}, {"quick" if args.quick else "full": out},
                                         path=args.out))


if __name__ == "__main__":
    main()
