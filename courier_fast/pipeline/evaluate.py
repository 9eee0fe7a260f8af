"""Downstream CTR evaluation (`courier-fast eval`): does an image embedding help a CTR model?

A logistic-regression CTR model (scikit-learn, standardised features) is fitted on every shown
slot of ctr_train and scored on ctr_test, whose items are all cold (never seen in pretrain or
ctr_train, so item ids carry nothing). Features:

* always (ID / category): the candidate's category (one-hot), the number of history items, the
  number and fraction of history items sharing its category;
* with an ItemEmbeddings (image features, docs/design.md §1), in three forms (the paper's
  appendix measures each on its own):
  - "simscore": the cosine to each history slot plus its mean, max, and sum / max over
    same-category history items;
  - "cluster": the cluster ID (one-hot) and how many history items share the candidate's
    cluster (overall and within its category); needs the embeddings' cluster_ids;
  - "vector": the vector itself.
  `features` picks one form, "all" (the default: every form the embeddings have) or "none"
  (the ID / category features alone, as without embeddings).

Metrics: AUC, GAUC (per-user AUC weighted by the user's impressions, users with both labels)
and logloss. `oracle_embeddings()` builds the ceiling from the world's true attributes.
"""
import os

import numpy as np

from courier_fast.data.loader import padded_column
from courier_fast.pipeline.embeddings import ItemEmbeddings, simscore


FEATURE_FORMS = ("all", "vector", "simscore", "cluster", "none")


def check_features(features, emb):
    """Raise a ValueError naming `features` when it is not a form or `emb` (an ItemEmbeddings, a
    path to one, or None) cannot give it."""
    if features not in FEATURE_FORMS:
        raise ValueError(f"features must be one of {FEATURE_FORMS}, got {features!r}")
    if emb is None and features not in ("all", "none"):
        raise ValueError(f"features={features!r} needs embeddings (give embeddings, or features='none')")
    if features == "cluster" and isinstance(emb, ItemEmbeddings) and emb.cluster_ids is None:
        raise ValueError("features='cluster' needs embeddings with cluster ids (ItemEmbeddings.with_clusters, "
                         "or `courier-fast embed --clusters K`)")


def ctr_features(sessions, items, emb=None, history_len=5, features="all"):
    """(X (n, f) float32, y (n,) float32, user (n,) int64) over every valid shown slot of `sessions`.

    features: which image features `emb` adds (FEATURE_FORMS; module docstring). The ID /
    category columns come first in every form; the image columns follow in the order
    simscore, cluster, vector.
    """
    check_features(features, emb)
    if features == "none":
        emb = None
    ids = items.column("item_id").to_numpy()
    cats = items.column("category").to_numpy()
    order = np.argsort(ids)
    n_cat = int(cats.max()) + 1

    def category(x):
        pos = order[np.searchsorted(ids[order], x.clip(min=0))]
        return np.where(x >= 0, cats[pos], -1)

    hist = padded_column(sessions.column("history"), history_len, newest=True)
    pv = padded_column(sessions.column("pv_items"))
    clicks = padded_column(sessions.column("clicks"), pv.shape[1])
    users = sessions.column("user_id").to_numpy()
    valid = pv >= 0
    hvalid = (hist >= 0)[:, None, :].astype(np.float32)                      # (R, 1, L)
    hc, pc = category(hist), category(pv)
    same = ((hc[:, None, :] == pc[:, :, None]) & (hist[:, None, :] >= 0)).astype(np.float32)  # (R, P, L)
    n_hist = hvalid.sum(-1).repeat(pv.shape[1], 1)
    feats = [np.eye(n_cat, dtype=np.float32)[pc.clip(min=0)], n_hist[..., None],
             same.sum(-1, keepdims=True), (same.sum(-1) / np.maximum(n_hist, 1))[..., None]]
    if emb is not None and features in ("all", "simscore"):
        s = simscore(emb, hist, pv)                                           # (R, P, L), 0 at padding
        neg = np.where(hvalid > 0, s, -1.0)
        same_neg = np.where(same > 0, s, -1.0)
        feats += [s, (s.sum(-1) / np.maximum(n_hist, 1))[..., None], neg.max(-1, keepdims=True),
                  (s * same).sum(-1, keepdims=True), same_neg.max(-1, keepdims=True)]
    if emb is not None and features in ("all", "cluster") and emb.cluster_ids is not None:
        k = int(emb.cluster_ids.max()) + 1
        cl = lambda x: np.where(x >= 0, emb.cluster_ids[emb.rows(x)], -2)  # noqa: E731
        hcl, pcl = cl(hist), cl(pv)
        same_cl = (hcl[:, None, :] == pcl[:, :, None]).astype(np.float32)
        feats += [np.eye(k, dtype=np.float32)[pcl.clip(min=0)], same_cl.sum(-1, keepdims=True),
                  (same_cl * same).sum(-1, keepdims=True)]
    if emb is not None and features in ("all", "vector"):
        feats.append(emb.vectors[emb.rows(pv)])
    x = np.concatenate(feats, -1)
    return x[valid].astype(np.float32), clicks[valid].astype(np.float32), np.broadcast_to(users[:, None], pv.shape)[valid]


def gauc(scores, labels, users):
    """Impression-weighted mean of per-user AUCs over users with both a click and a non-click."""
    from sklearn.metrics import roc_auc_score

    total, weight = 0.0, 0
    order = np.argsort(users, kind="stable")
    _, start = np.unique(users[order], return_index=True)
    for a, b in zip(start, list(start[1:]) + [len(order)]):
        idx = order[a:b]
        y = labels[idx]
        if 0 < y.sum() < len(y):
            total += roc_auc_score(y, scores[idx]) * len(idx)
            weight += len(idx)
    return total / weight if weight else float("nan")


def evaluate(data, embeddings=None, C=0.1, history_len=5, features="all"):
    """Fit on ctr_train, score ctr_test: {"auc", "gauc", "logloss", "train_rows", "test_rows"}.

    embeddings: None (ID/category features only), an ItemEmbeddings, or a path to one (a
    file or a `courier-fast embed` parts directory); it needs a vector for every item the two
    tables show or hold in a history.
    features: the form of the image features (FEATURE_FORMS: "all", "vector", "simscore",
    "cluster" or "none"; module docstring); the ID / category features are always in.
    """
    check_features(features, embeddings)  # before any file is read
    if features == "none":
        embeddings = None
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss, roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from courier_fast.data import load_dataset

    tables = load_dataset(data, tables=("ctr_train", "ctr_test"))
    # the items the CTR tables show or hold in a history: all an embedding is needed for
    needed = np.unique(np.concatenate([tables[t].column(c).combine_chunks().flatten().to_numpy()
                                       for t in ("ctr_train", "ctr_test") for c in ("history", "pv_items")]))
    if isinstance(embeddings, (str, os.PathLike)):  # a file, or a parts directory read only for `needed`
        embeddings = ItemEmbeddings.load(embeddings, item_ids=needed)
    emb = embeddings
    if emb is not None:
        missing = np.setdiff1d(needed, emb.item_ids)
        if missing.size:
            raise ValueError(f"embeddings: {missing.size} items that {data} ctr_train / ctr_test show have no "
                             f"embedding (e.g. id {missing[0]})")
    x, y, _ = ctr_features(tables["ctr_train"], tables["items"], emb, history_len, features)
    xt, yt, ut = ctr_features(tables["ctr_test"], tables["items"], emb, history_len, features)
    if len(np.unique(y)) < 2 or len(np.unique(yt)) < 2:
        raise ValueError(f"data: {data} ctr_train and ctr_test need both clicks and non-clicks")
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000))
    model.fit(x, y)
    p = model.predict_proba(xt)[:, 1]
    return {"auc": float(roc_auc_score(yt, p)), "gauc": float(gauc(p, yt, ut)), "logloss": float(log_loss(yt, p)),
            "train_rows": int(len(y)), "test_rows": int(len(yt))}


def oracle_embeddings(data, clusters=32, seed=0):
    """The ceiling: embeddings built from oracle.parquet's true taste attributes, whose cosine
    weighs hue (angle), pattern and frequency class roughly as the world's click model does."""
    import pyarrow.parquet as pq

    path = os.path.join(data, "oracle.parquet")
    if not os.path.exists(path):
        raise FileNotFoundError(f"data: {path} does not exist (oracle_attributes needs a generated world)")
    t = pq.read_table(path).to_pydict()
    hue = 2 * np.pi * np.asarray(t["hue"])
    pattern = np.eye(int(max(t["pattern"])) + 1)[np.asarray(t["pattern"])]
    freq = np.where(np.asarray(t["frequency"]) > 3.25, 1.0, -1.0)[:, None]
    vec = np.concatenate([np.sqrt(4.75) * np.stack([np.cos(hue), np.sin(hue)], 1), np.sqrt(1.5) * pattern,
                          np.sqrt(0.4) * freq], 1)
    emb = ItemEmbeddings(t["item_id"], vec)
    return emb.with_clusters(clusters, seed) if clusters else emb
