"""The demo's table and JSON: the default COURIER run appears once, under `courier`, naming its
query; --feature-forms adds each form's fit per method and changes nothing else."""
import dataclasses
import json

import numpy as np
import pytest

from conftest import import_bench

import courier_fast.pipeline.demo as demo_module
from courier_fast.data import load_dataset
from courier_fast.pipeline.demo import COURIER_QUERY, DEFAULT_COURIER, FORMS, ORDER, RUNS, format_forms, format_table
from courier_fast.pipeline.embeddings import ItemEmbeddings
from courier_fast.training.loop import TrainConfig


def test_default_courier_is_trainconfigs_and_shown_once_naming_its_query():
    default_query = {f.name: f.default for f in dataclasses.fields(TrainConfig)}["query"]
    assert RUNS[DEFAULT_COURIER] == ("courier", {"query": default_query}) and COURIER_QUERY == default_query
    assert DEFAULT_COURIER not in ORDER and len(set(ORDER)) == len(ORDER)
    report = {"seed": 0, "quick": True, "seconds": 1.0,
              "results": {m: {"auc": 0.6 + 0.01 * i, "gauc": 0.55, "logloss": 0.3} for i, m in enumerate(ORDER)}}
    rows = format_table(report).splitlines()[2:-1]
    assert len(rows) == len(ORDER)
    courier_rows = [r for r in rows if r.startswith("courier (")]
    assert courier_rows == [r for r in rows if r.startswith(f"courier ({default_query} query) ")]
    assert len(courier_rows) == 1 and not any(DEFAULT_COURIER in r for r in rows)


@pytest.fixture
def untrained_demo(world, monkeypatch):
    """demo() on the test world with every run's training replaced by seeded random embeddings."""
    ids = load_dataset(world, tables=())["items"].column("item_id").to_numpy()

    def fake_run(name, world_, workdir, seed, quick, progress=True):
        rng = np.random.default_rng([seed, sorted(RUNS).index(name)])
        return ItemEmbeddings(ids, rng.normal(size=(len(ids), 6))).with_clusters(4, seed)

    monkeypatch.setattr(demo_module, "run_method", fake_run)
    monkeypatch.setattr(demo_module, "_world", lambda workdir, seed, quick: world)


@pytest.mark.usefixtures("untrained_demo")
def test_feature_forms_report(tmp_path):
    plain = demo_module.demo(quick=True, workdir=str(tmp_path / "a"), progress=False, log=lambda *_: None)
    lines = []
    report = demo_module.demo(quick=True, workdir=str(tmp_path / "b"), progress=False, log=lines.append,
                              feature_forms=True)
    assert "feature_forms" not in plain and "feature_forms_seconds" not in plain
    assert report["results"] == plain["results"]  # the main table does not change
    ff = report["feature_forms"]
    assert set(ff) == set(ORDER) - {"no_image"}
    for m, forms in ff.items():
        assert list(forms) == ["none", *FORMS, "all"]
        assert forms["none"] == report["results"]["no_image"] and forms["all"] == report["results"][m]
        assert len({forms[f]["auc"] for f in FORMS}) == 3
    assert 0 <= report["feature_forms_seconds"] <= report["seconds"]
    with open(tmp_path / "b" / "results.json") as f:
        assert json.load(f)["feature_forms"] == ff
    table = format_forms(report)
    assert table in lines
    courier_row = next(r for r in table.splitlines() if r.startswith(f"courier ({COURIER_QUERY} query)"))
    gains = [float(v) for v in courier_row.split()[-4:]]
    want = [ff["courier"][f]["auc"] - ff["courier"]["none"]["auc"] for f in (*FORMS, "all")]
    np.testing.assert_allclose(gains, want, atol=5e-5)


@pytest.mark.usefixtures("untrained_demo")
def test_demo_seeds_summarises_feature_forms(tmp_path):
    summarise = import_bench("demo_seeds").summarise
    reports = [demo_module.demo(seed=s, quick=True, workdir=str(tmp_path / str(s)), progress=False,
                                log=lambda *_: None, feature_forms=True) for s in (0, 1)]
    s = summarise(reports)
    means = {m: np.mean([r["results"][m]["auc"] for r in reports]) for m in demo_module.GENERIC}
    assert s["best_generic"] == max(means, key=means.get)
    for m in ("courier", s["best_generic"]):
        for f in (*FORMS, "all"):
            want = [r["feature_forms"][m][f]["auc"] - r["results"]["no_image"]["auc"] for r in reports]
            np.testing.assert_allclose(s["feature_forms"][m][f]["gain"], want, rtol=0, atol=1e-12)
    assert "feature_forms" not in summarise([{k: v for k, v in r.items() if k != "feature_forms"} for r in reports])
