"""On-disk format: loading validates tables and names the table, row and column."""
import pyarrow as pa
import pytest

from courier_fast.data.format import (ITEM_SCHEMA, SESSION_SCHEMA, load_dataset, read_items,
                                      read_sessions, write_table)


def _items(ids=(1, 2, 3, 4)):
    return pa.table({"item_id": list(ids), "image": [b"\xff\xd8jpeg"] * len(ids),
                     "category": [i % 2 for i in ids], "title": [f"item {i}" for i in ids]}, schema=ITEM_SCHEMA)


def _sessions(history=([1, 2], [3]), pv=([3, 4], [1, 2, 4]), clicks=([0, 1], [1, 0, 0])):
    return pa.table({"user_id": list(range(len(pv))), "history": list(history), "pv_items": list(pv),
                     "clicks": list(clicks)}, schema=SESSION_SCHEMA)


@pytest.fixture
def world(tmp_path):
    write_table(_items(), tmp_path / "items.parquet")
    for name in ("pretrain", "ctr_train", "ctr_test"):
        write_table(_sessions(), tmp_path / f"{name}.parquet")
    return tmp_path


def test_valid_world_loads(world):
    data = load_dataset(world)
    assert data["items"].num_rows == 4 and data["ctr_test"].num_rows == 2
    assert not list(world.glob("*.tmp*"))  # atomic writes leave nothing behind


@pytest.mark.parametrize("kwargs,msg", [
    ({"pv": ([3, 4], [1, 2, 99])}, "ctr_train: row 1, column 'pv_items': unknown item id 99"),
    ({"history": ([1, 77], [3])}, "ctr_train: row 0, column 'history': unknown item id 77"),
    ({"clicks": ([0, 1], [1, 0])}, "ctr_train: row 1, column 'clicks': 2 labels for 3 pv_items"),
    ({"clicks": ([0, 2], [1, 0, 0])}, "ctr_train: row 0, column 'clicks': label 2 is not 0/1"),
    ({"pv": ([], [1, 2, 4]), "clicks": ([], [1, 0, 0])}, "ctr_train: row 0, column 'pv_items': no shown items"),
])
def test_session_errors_name_table_row_column(world, kwargs, msg):
    path = world / "ctr_train.parquet"
    write_table(_sessions(**kwargs), path)
    with pytest.raises(ValueError) as info:
        read_sessions(path, "ctr_train", [1, 2, 3, 4])
    assert msg in str(info.value)


def test_item_errors(tmp_path):
    path = tmp_path / "items.parquet"
    write_table(_items((1, 2, 2)), path)
    with pytest.raises(ValueError, match="items: row 2, column 'item_id': duplicate id 2"):
        read_items(path)
    write_table(pa.table({"item_id": [1], "image": [b""], "category": [0], "title": ["x"]}, schema=ITEM_SCHEMA), path)
    with pytest.raises(ValueError, match="column 'image': empty image bytes"):
        read_items(path)
    write_table(pa.table({"item_id": [1], "category": [0], "title": ["x"]}), path)
    with pytest.raises(ValueError, match="items: column 'image' is missing"):
        read_items(path)


def test_empty_table_and_missing_file(world):
    write_table(_sessions(history=(), pv=(), clicks=()), world / "pretrain.parquet")
    with pytest.raises(ValueError, match="pretrain: .* has no rows"):
        load_dataset(world)
    (world / "pretrain.parquet").unlink()
    with pytest.raises(FileNotFoundError, match="pretrain"):
        load_dataset(world)
