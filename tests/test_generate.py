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
