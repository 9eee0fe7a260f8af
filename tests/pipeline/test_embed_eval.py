"""ItemEmbeddings (norms, files, rows, k-means), simscore, embed() and the downstream CTR evaluation."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from courier_fast.data import load_dataset
from courier_fast.pipeline.embed import embed
from courier_fast.pipeline.embeddings import ItemEmbeddings, simscore
from courier_fast.pipeline.evaluate import ctr_features, evaluate, gauc, oracle_embeddings
from courier_fast.training.loop import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def rng(seed):
    return np.random.default_rng(seed)


def _random_embeddings(rng, n=20, d=6, clusters=None):
    ids = rng.permutation(np.arange(100, 100 + 5 * n, 5))  # ids are neither positions nor sorted
    vec = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=(n, 1))
    return ItemEmbeddings(ids, vec, None if clusters is None else rng.integers(0, clusters, n))


# ----------------------------------------------------------------------------- ItemEmbeddings
def test_vectors_are_unit_norm(rng):
    emb = _random_embeddings(rng)
    assert emb.vectors.dtype == np.float32 and emb.item_ids.dtype == np.int64
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("suffix", [".safetensors", ".parquet"])
@pytest.mark.parametrize("clusters", [None, 4])
def test_save_load_roundtrip(rng, tmp_path, suffix, clusters):
    emb = _random_embeddings(rng, clusters=clusters)
    path = tmp_path / f"emb{suffix}"
    emb.save(path)
    back = ItemEmbeddings.load(path)
    np.testing.assert_array_equal(back.item_ids, emb.item_ids)
    np.testing.assert_allclose(back.vectors, emb.vectors, rtol=1e-6, atol=1e-7)  # re-normalised on load
    if clusters is None:
        assert back.cluster_ids is None
    else:
        np.testing.assert_array_equal(back.cluster_ids, emb.cluster_ids)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_save_bad_suffix_and_load_errors(rng, tmp_path):
    emb = _random_embeddings(rng)
    with pytest.raises(ValueError, match="suffix|end with"):
        emb.save(tmp_path / "emb.npy")
    with pytest.raises(FileNotFoundError):
        ItemEmbeddings.load(tmp_path / "missing.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not a parquet file")
    with pytest.raises(ValueError, match="junk.parquet"):
        ItemEmbeddings.load(tmp_path / "junk.parquet")


def test_load_corrupt_safetensors_raises_value_error(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        ItemEmbeddings.load(tmp_path / "junk.safetensors")


def test_rows_maps_ids(rng):
    emb = _random_embeddings(rng)
    pick = rng.integers(0, len(emb), size=(3, 4))
    ids = emb.item_ids[pick]
    ids[0, 1] = -1
    rows = emb.rows(ids)
    assert rows.shape == (3, 4) and rows[0, 1] == -1
    expect = pick.copy()
    expect[0, 1] = -1
    np.testing.assert_array_equal(rows, expect)
    for unknown in (emb.item_ids.max() + 1, emb.item_ids.min() - 1, emb.item_ids.min() + 1, 0):
        with pytest.raises(KeyError):
            emb.rows([emb.item_ids[0], unknown])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_vectors_rejected(rng, bad):
    vec = rng.normal(size=(5, 3))
    vec[2, 1] = bad
    with pytest.raises(ValueError, match="NaN|Inf"):
        ItemEmbeddings(np.arange(5), vec)
    with pytest.raises(ValueError):
        ItemEmbeddings(np.arange(4), rng.normal(size=(5, 3)))  # one vector per id


def test_with_clusters_separates_two_blobs(rng):
    d, n = 8, 30
    centre = rng.normal(size=d)
    side = rng.random(n) < 0.5
    side[:2] = [True, False]
    vec = np.where(side[:, None], centre, -centre) + 0.05 * rng.normal(size=(n, d))
    emb = ItemEmbeddings(np.arange(n) * 3 + 1, vec)
    two = emb.with_clusters(2)
    labels = two.cluster_ids
    assert set(labels.tolist()) == {0, 1}
    assert (labels[side] == labels[side][0]).all() and (labels[~side] == labels[~side][0]).all()
    np.testing.assert_allclose(two.vectors, emb.vectors, rtol=1e-6, atol=1e-7)
    k5 = emb.with_clusters(5).cluster_ids
    assert k5.min() >= 0 and k5.max() < 5
    assert emb.cluster_ids is None  # a copy


def test_simscore_equals_cosine_loop(rng):
    emb = _random_embeddings(rng, n=15, d=5)
    hist = emb.item_ids[rng.integers(0, 15, (4, 3))]
    pv = emb.item_ids[rng.integers(0, 15, (4, 6))]
    hist[1, 2] = hist[3, 1:] = -1
    pv[2, 4:] = -1
    s = simscore(emb, hist, pv)
    assert s.shape == (4, 6, 3) and s.dtype == np.float32
    lookup = dict(zip(emb.item_ids.tolist(), emb.vectors))
    for r in range(4):
        for p in range(6):
            for h in range(3):
                if pv[r, p] < 0 or hist[r, h] < 0:
                    assert s[r, p, h] == 0
                else:
                    a, b = lookup[pv[r, p]], lookup[hist[r, h]]
                    want = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
                    assert abs(s[r, p, h] - want) < 1e-5


# ----------------------------------------------------------------------------- embed()
@pytest.fixture(scope="module")
def checkpoint(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run"))
    return train(TrainConfig(data=world, out=out, encoder="test_efficientnet", embed_dim=32, batch_size=8,
                             steps=2, image_size=0, progress=False))["checkpoint"]


@pytest.mark.parametrize("suffix,clusters", [(".safetensors", 5), (".parquet", 0)])
def test_embed_covers_every_item(world, checkpoint, tmp_path, suffix, clusters):
    out = tmp_path / f"emb{suffix}"
    emb = embed(checkpoint, world, str(out), clusters=clusters, batch_size=16)
    items = load_dataset(world, tables=())["items"]
    np.testing.assert_array_equal(np.sort(emb.item_ids), np.sort(items.column("item_id").to_numpy()))
    assert emb.vectors.shape == (items.num_rows, 32) and np.isfinite(emb.vectors).all()
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, rtol=1e-5)
    if clusters:
        assert emb.cluster_ids.min() >= 0 and emb.cluster_ids.max() < clusters
    else:
        assert emb.cluster_ids is None
    back = ItemEmbeddings.load(out)
    np.testing.assert_array_equal(back.item_ids, emb.item_ids)
    np.testing.assert_allclose(back.vectors, emb.vectors, rtol=1e-6, atol=1e-7)  # re-normalised on load


def test_embed_is_deterministic_in_batch_size(world, checkpoint, tmp_path):
    a = embed(checkpoint, world, str(tmp_path / "a.parquet"), clusters=0, batch_size=13)
    b = embed(checkpoint, world, str(tmp_path / "b.parquet"), clusters=0, batch_size=64)
    np.testing.assert_allclose(a.vectors, b.vectors, rtol=1e-4, atol=1e-5)  # eval mode: rows independent


# ----------------------------------------------------------------------------- evaluation
def _check_metrics(m):
    assert 0 <= m["auc"] <= 1 and 0 <= m["gauc"] <= 1 and m["logloss"] > 0
    assert m["train_rows"] > 0 and m["test_rows"] > 0


def test_evaluate_no_image_and_embeddings(world, rng):
    base = evaluate(world)
    _check_metrics(base)
    items = load_dataset(world, tables=())["items"]
    ids = items.column("item_id").to_numpy()
    emb = ItemEmbeddings(ids, rng.normal(size=(len(ids), 8))).with_clusters(4)
    with_emb = evaluate(world, emb)
    _check_metrics(with_emb)
    assert (with_emb["train_rows"], with_emb["test_rows"]) == (base["train_rows"], base["test_rows"])


def test_evaluate_rejects_incomplete_embeddings(world, rng):
    data = load_dataset(world, tables=("ctr_test",))
    ids = data["items"].column("item_id").to_numpy()
    shown = data["ctr_test"].column("pv_items")[0].as_py()[0]  # an item the test table needs
    keep = ids != shown
    emb = ItemEmbeddings(ids[keep], rng.normal(size=(int(keep.sum()), 4)))
    with pytest.raises(ValueError, match=f"no embedding .*id {shown}"):
        evaluate(world, emb)


def test_oracle_beats_no_image(world, tmp_path):
    # seed-0 world; the oracle led no_image on every seed 0..5 tried (by 0.05 to 0.36 AUC)
    base = evaluate(world)["auc"]
    path = tmp_path / "oracle.parquet"
    oracle_embeddings(world, clusters=8).save(path)
    assert evaluate(world, str(path))["auc"] > base + 0.05


def test_gauc_hand_made():
    users = np.array([7, 3, 7, 3, 7, 3, 9, 9, 3, 7])
    labels = np.array([1, 0, 0, 1, 0, 0, 0, 0, 1, 1], dtype=np.float32)
    scores = np.array([0.9, 0.2, 0.3, 0.1, 0.95, 0.4, 0.5, 0.6, 0.8, 0.1])

    def pairwise_auc(s, y):
        pos, neg = s[y == 1], s[y == 0]
        return np.mean([(p > q) + 0.5 * (p == q) for p in pos for q in neg])

    # user 7: pos {0.9, 0.1}, neg {0.3, 0.95} -> 1/4; user 3: pos {0.1, 0.8}, neg {0.2, 0.4} -> 2/4;
    # user 9 has no click and is left out; weights are impressions (4 and 4)
    a7 = pairwise_auc(scores[users == 7], labels[users == 7])
    a3 = pairwise_auc(scores[users == 3], labels[users == 3])
    assert (a7, a3) == (0.25, 0.5)
    assert gauc(scores, labels, users) == pytest.approx((4 * a7 + 4 * a3) / 8)
    users2 = np.where(users == 3, 3, 7)  # user 9's rows join user 7: 6 impressions
    a7b = pairwise_auc(scores[users2 == 7], labels[users2 == 7])
    assert gauc(scores, labels, users2) == pytest.approx((6 * a7b + 4 * a3) / 10)
    assert np.isnan(gauc(scores, np.zeros_like(labels), users))


def test_gauc_random_matches_sklearn(rng):
    users = rng.integers(0, 6, 200)
    labels = (rng.random(200) < 0.3).astype(np.float32)
    scores = rng.random(200)
    total = weight = 0
    for u in np.unique(users):
        m = users == u
        if 0 < labels[m].sum() < m.sum():
            total += roc_auc_score(labels[m], scores[m]) * m.sum()
            weight += m.sum()
    assert gauc(scores, labels, users) == pytest.approx(total / weight)


@pytest.mark.parametrize("clusters", [0, 3])
def test_ctr_features_shapes(world, rng, clusters):
    data = load_dataset(world, tables=("ctr_test",))
    items, sessions = data["items"], data["ctr_test"]
    n_slots = sum(len(p) for p in sessions.column("pv_items").to_pylist())
    n_cat = int(items.column("category").to_numpy().max()) + 1
    x, y, users = ctr_features(sessions, items)
    assert x.shape == (n_slots, n_cat + 3) and y.shape == users.shape == (n_slots,)
    assert x.dtype == y.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0}
    assert y.sum() == sum(sum(c) for c in sessions.column("clicks").to_pylist())
    ids = items.column("item_id").to_numpy()
    d = 6
    emb = ItemEmbeddings(ids, rng.normal(size=(len(ids), d)))
    if clusters:
        emb = emb.with_clusters(clusters)
    xe, ye, ue = ctr_features(sessions, items, emb, history_len=5)
    extra = 5 + 4 + d + (clusters + 2 if clusters else 0)  # simscores + 4 summaries + vector [+ cluster one-hot + 2]
    assert xe.shape == (n_slots, n_cat + 3 + extra) and np.isfinite(xe).all()
    np.testing.assert_array_equal(ye, y)
    np.testing.assert_array_equal(ue, users)
    np.testing.assert_array_equal(xe[:, :n_cat + 3], x)
    shown = np.concatenate(sessions.column("pv_items").to_pylist())
    np.testing.assert_allclose(xe[:, -d:], emb.vectors[emb.rows(shown)])


# ----------------------------------------------------------------------------- feature forms
@pytest.mark.parametrize("clusters", [0, 3])
def test_ctr_features_each_form_is_its_columns_of_all(world, rng, clusters):
    """Each form alone is the ID / category columns plus exactly that form's columns of "all"
    (simscore, then cluster, then vector); "none" is the features without embeddings."""
    data = load_dataset(world, tables=("ctr_test",))
    items, sessions = data["items"], data["ctr_test"]
    ids = items.column("item_id").to_numpy()
    d = int(rng.integers(3, 9))
    emb = ItemEmbeddings(ids, rng.normal(size=(len(ids), d)))
    if clusters:
        emb = emb.with_clusters(clusters, seed=int(rng.integers(100)))
    base, y, users = ctr_features(sessions, items)
    full, _, _ = ctr_features(sessions, items, emb, features="all")
    b, s = base.shape[1], 5 + 4
    k = int(emb.cluster_ids.max()) + 3 if clusters else 0
    spans = {"none": [], "simscore": [slice(b, b + s)], "cluster": [slice(b + s, b + s + k)] if clusters else None,
             "vector": [slice(b + s + k, b + s + k + d)]}
    assert full.shape[1] == b + s + k + d
    for form, cols in spans.items():
        if cols is None:
            with pytest.raises(ValueError, match="features='cluster'.*cluster ids"):
                ctr_features(sessions, items, emb, features=form)
            continue
        x, yf, uf = ctr_features(sessions, items, emb, features=form)
        np.testing.assert_array_equal(x, np.concatenate([base] + [full[:, c] for c in cols], 1))
        np.testing.assert_array_equal(yf, y)
        np.testing.assert_array_equal(uf, users)


@pytest.mark.parametrize("form", ["vector", "simscore", "cluster"])
def test_image_forms_need_embeddings(world, form):
    data = load_dataset(world, tables=("ctr_test",))
    with pytest.raises(ValueError, match=f"features='{form}' needs embeddings"):
        ctr_features(data["ctr_test"], data["items"], None, features=form)
    with pytest.raises(ValueError, match=f"features='{form}' needs embeddings"):
        evaluate(world, features=form)


def test_unknown_form_is_named_before_any_file_is_read(tmp_path):
    with pytest.raises(ValueError, match="features must be one of .*'clusters'"):
        evaluate(str(tmp_path / "no_such_data"), str(tmp_path / "no_such.parquet"), features="clusters")


def test_evaluate_forms(world, rng):
    """"none" is the no-embedding fit (the embeddings are not even read); every form fits on the
    same rows; the oracle's cluster form alone beats ID / category features on this world."""
    base = evaluate(world)
    assert evaluate(world, "no/such/embeddings.parquet", features="none") == base
    oracle = oracle_embeddings(world, clusters=8)
    forms = {f: evaluate(world, oracle, features=f) for f in ("vector", "simscore", "cluster")}
    for m in forms.values():
        _check_metrics(m)
        assert (m["train_rows"], m["test_rows"]) == (base["train_rows"], base["test_rows"])
    assert len({m["auc"] for m in forms.values()}) == 3  # three different fits
    assert forms["cluster"]["auc"] > base["auc"] + 0.02
