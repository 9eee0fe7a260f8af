"""Headroom probe of the generated world: logistic-regression CTR AUC on cold ctr_test items
with category + quality features vs the same plus oracle-attribute history features (hue
cosine, same pattern, same frequency class between the candidate and each history item). A
crude stand-in for the downstream CTR harness; it only checks that the world leaves room for
image features.

    python bench/probe_world_auc.py --seed 0 [--quick]
"""
import argparse
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq

from courier_fast.data.generate import SHAPES, generate


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="courier_world_")
    start = time.time()
    generate(root, seed=args.seed, quick=args.quick)
    print(f"generated in {time.time() - start:.1f} s at {root}")
    attrs = pq.read_table(f"{root}/oracle.parquet").to_pydict()
    for oracle in (False, True):
        x, y = features(root, "ctr_train", oracle, attrs)
        xt, yt = features(root, "ctr_test", oracle, attrs)
        name = "category+quality+oracle attrs" if oracle else "category+quality"
        print(f"{name:<32} cold-item AUC {auc(logistic_scores(x, y, xt), yt):.4f}  (test rows {len(yt)}, CTR {yt.mean():.3f})")


if __name__ == "__main__":
    main()
