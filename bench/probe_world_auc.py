"""Headroom probe of the generated world: logistic-regression CTR AUC on cold ctr_test items
with category + quality features vs the same plus oracle-attribute history features (hue
cosine, same pattern, same frequency class between the candidate and each history item). A
crude stand-in for the downstream CTR harness; it only checks that the world leaves room for
image features. Each seed's AUCs are merged into bench/results/<device>-probe_world.json under
"quick" or "full" (a --quick run too: the numbers do not depend on the machine).

    python bench/probe_world_auc.py --seeds 0 1 2 [--quick]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from courier_fast.data.generate import SHAPES, generate  # noqa: E402


def features(root, table, oracle, attrs):
    pos = {int(i): k for k, i in enumerate(attrs["item_id"])}
    cat, hue, pat, freq, qual = (np.asarray(attrs[k]) for k in ("category", "hue", "pattern", "frequency", "quality"))
    rows, labels = [], []
    for r in pq.read_table(f"{root}/{table}.parquet").to_pylist():
        hist = [pos[i] for i in r["history"]]
        for item, click in zip(r["pv_items"], r["clicks"]):
            j = pos[item]
            same_cat = np.array([cat[k] == cat[j] for k in hist], float)
            f = [qual[j], *np.eye(len(SHAPES))[cat[j]], same_cat.sum(), same_cat.mean() if hist else 0.0]
            if oracle:
                for sim in (lambda k: np.cos(2 * np.pi * (hue[k] - hue[j])), lambda k: float(pat[k] == pat[j]),
                            lambda k: float((freq[k] > 3.25) == (freq[j] > 3.25))):
                    v = np.array([sim(k) for k in hist])
                    f += [v.mean() if hist else 0.0, (v * same_cat).sum(), (v * same_cat).max() if hist else 0.0]
            rows.append(f)
            labels.append(click)
    return np.array(rows, float), np.array(labels, float)


def logistic_scores(x, y, x_test, steps=3000, lr=0.5, l2=1e-4):
    mu, sd = x.mean(0), x.std(0) + 1e-9
    x, x_test = np.c_[(x - mu) / sd, np.ones(len(x))], np.c_[(x_test - mu) / sd, np.ones(len(x_test))]
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x @ w))
        w -= lr * (x.T @ (p - y) / len(y) + l2 * w)
    return x_test @ w


def auc(scores, labels):
    ranks = np.argsort(np.argsort(scores)) + 1
    n1 = labels.sum()
    return (ranks[labels == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(labels) - n1))


def probe(seed, quick):
    """{"category+quality": AUC, "category+quality+oracle attrs": AUC, "test_rows", "ctr", "seconds"}."""
    root = tempfile.mkdtemp(prefix="courier_world_")
    start = time.time()
    generate(root, seed=seed, quick=quick)
    print(f"seed {seed}: generated in {time.time() - start:.1f} s at {root}")
    attrs = pq.read_table(f"{root}/oracle.parquet").to_pydict()
    out = {}
    for oracle in (False, True):
        x, y = features(root, "ctr_train", oracle, attrs)
        xt, yt = features(root, "ctr_test", oracle, attrs)
        name = "category+quality+oracle attrs" if oracle else "category+quality"
        out[name] = float(auc(logistic_scores(x, y, xt), yt))
        out["test_rows"], out["ctr"] = int(len(yt)), float(yt.mean())
        print(f"{name:<32} cold-item AUC {out[name]:.4f}  (test rows {len(yt)}, CTR {yt.mean():.3f})")
    out["seconds"] = round(time.time() - start, 1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    path = os.path.join(harness.HERE, "results", f"{harness.device_name()}-probe_world.json")
    merged = {}
    if os.path.exists(path):
        with open(path) as f:
            merged = json.load(f).get("rows", {})
    for seed in args.seeds:
        merged.setdefault(mode, {})[str(seed)] = probe(seed, args.quick)
    print("wrote", harness.write_results("probe_world", {}, merged, path=path))


if __name__ == "__main__":
    main()
