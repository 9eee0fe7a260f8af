"""The generated world: valid format, deterministic per seed, cold test items, CTR near 10 %."""
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from courier_fast.data import load_dataset
from courier_fast.data.generate import WorldConfig, generate

SMALL = WorldConfig(items=120, users=30, requests_per_user=8, image_size=24)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(out, seed=5, config=SMALL)
    return out


def test_world_is_valid_and_complete(world):
    data = load_dataset(world)  # validates every table against the items
    assert data["items"].num_rows == SMALL.items
    assert set(pq.read_table(world / "oracle.parquet").column_names) >= {"item_id", "category", "hue", "pattern", "quality"}


def test_same_seed_same_tables_other_seed_differs(world, tmp_path):
    generate(tmp_path / "again", seed=5, config=SMALL)
    generate(tmp_path / "other", seed=6, config=SMALL)
    for name in ("items", "pretrain", "ctr_train", "ctr_test", "oracle"):
        a = pq.read_table(world / f"{name}.parquet")
        assert a.equals(pq.read_table(tmp_path / "again" / f"{name}.parquet")), name
    assert not pq.read_table(world / "pretrain.parquet").equals(pq.read_table(tmp_path / "other" / "pretrain.parquet"))


def test_test_pages_show_only_cold_items(world):
    data = load_dataset(world)
    seen = set()
    for name in ("pretrain", "ctr_train"):
        for col in ("history", "pv_items"):
            seen |= set(np.concatenate(data[name][col].to_numpy(zero_copy_only=False)).tolist())
    test_pv = set(np.concatenate(data["ctr_test"]["pv_items"].to_numpy(zero_copy_only=False)).tolist())
    assert test_pv and not (test_pv & seen)
    test_hist = set(np.concatenate(data["ctr_test"]["history"].to_numpy(zero_copy_only=False)).tolist())
    assert not (test_hist & test_pv)


def test_ctr_near_ten_percent_and_histories_are_clicks(world):
    data = load_dataset(world)
    clicks = np.concatenate(data["pretrain"]["clicks"].to_numpy(zero_copy_only=False))
    assert 0.05 < clicks.mean() < 0.16
    rows = data["pretrain"].to_pylist()  # rows are per user, in request order
    checked = 0
    for prev, row in zip(rows, rows[1:]):
        if prev["user_id"] != row["user_id"]:
            continue
        clicked = [i for i, c in zip(prev["pv_items"], prev["clicks"]) if c]
        assert row["history"] == (prev["history"] + clicked)[-SMALL.history_len:]
        checked += 1
    assert checked > 0


def test_titles_name_the_category(world):
    from courier_fast.data.generate import SHAPES
    items = pq.read_table(world / "items.parquet").to_pylist()
    assert all(it["title"].split()[0] == SHAPES[it["category"]] for it in items)


def test_cli_generate_quick_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "courier_fast", "generate", "--out", str(tmp_path / "w"),
                          "--seed", "1", "--quick", "--users", "20"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stdout
    load_dataset(tmp_path / "w")
    bad = subprocess.run([sys.executable, "-m", "courier_fast", "generate", "--out", str(tmp_path / "x"),
                          "--items", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--items must be > 0" in bad.stderr


def test_files_layout_is_the_same_world(world, tmp_path):
    """images/, items.csv and interactions.csv hold the parquet world's images, items and clicks,
    each click on the day of its request (request r of a user on day r)."""
    import csv
    import datetime
    from collections import Counter

    from courier_fast.data.generate import EPOCH, split_days

    files = tmp_path / "files"
    counts = generate(files, seed=5, config=SMALL, layout="files")
    assert sorted(p.name for p in files.iterdir()) == ["images", "interactions.csv", "items.csv", "oracle.parquet"]
    items = pq.read_table(world / "items.parquet").to_pylist()
    with open(files / "items.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["item_id"]), int(r["category"]), r["title"]) for r in rows] == \
        [(it["item_id"], it["category"], it["title"]) for it in items]
    for it in items:
        assert (files / "images" / f"{it['item_id']}.jpg").read_bytes() == it["image"]
    with open(files / "interactions.csv") as f:
        log = [(int(r["user_id"]), int(r["item_id"]), datetime.datetime.fromisoformat(r["timestamp"]))
               for r in csv.DictReader(f)]
    assert counts["interactions"] == len(log) and [t for *_, t in log] == sorted(t for *_, t in log)
    days = {}
    for u, i, t in log:
        days.setdefault((u, i), []).append((t - EPOCH).days)
    train_day, test_day = split_days(SMALL)
    span = {"pretrain": (3, train_day), "ctr_train": (train_day, test_day), "ctr_test": (test_day, 3 + 8)}
    logged = Counter((u, i) for u, i, _ in log)
    for name, (lo, hi) in span.items():
        clicked = Counter((r["user_id"], i) for r in pq.read_table(world / f"{name}.parquet").to_pylist()
                          for i, c in zip(r["pv_items"], r["clicks"]) if c)
        assert not clicked - logged, name  # every recorded click is in the log
        for pair in clicked:  # on a day of its table's requests
            assert any(lo <= d < hi for d in days[pair]), (name, pair, days[pair])
    test_items = {i for r in pq.read_table(world / "ctr_test.parquet").to_pylist() for i in r["pv_items"]}
    first_test_day = EPOCH + datetime.timedelta(days=split_days(SMALL)[1])
    assert {i for _, i, t in log if t >= first_test_day} <= test_items  # only cold items are clicked then
