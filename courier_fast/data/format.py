"""The on-disk format users bring their data in (and `courier-fast generate` writes).

    items.parquet        item_id int64 (unique), image binary (JPEG bytes), category int,
                         title string
    pretrain.parquet     one row per request: user_id int, history list<int64> (clicked item
    ctr_train.parquet    ids, oldest -> newest), pv_items list<int64> (items shown),
    ctr_test.parquet     clicks list<int8> (0/1, one per shown item)

Loading validates everything and raises ValueError naming the table, row and column: unknown
item ids, pv_items/clicks length mismatches, labels other than 0/1, nulls, empty tables.
Writes are atomic (temporary file, then rename).
"""
import contextlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SESSION_TABLES = ("pretrain", "ctr_train", "ctr_test")
ITEM_SCHEMA = pa.schema([("item_id", pa.int64()), ("image", pa.binary()), ("category", pa.int64()),
                         ("title", pa.string())])
SESSION_SCHEMA = pa.schema([("user_id", pa.int64()), ("history", pa.list_(pa.int64())),
                            ("pv_items", pa.list_(pa.int64())), ("clicks", pa.list_(pa.int8()))])


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; it replaces `path` when the block succeeds and is
    removed when it fails, so readers never see a half-written file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_table(table, path):
    """Write a parquet file atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _fail(table, row, column, what):
    raise ValueError(f"{table}: row {row}, column '{column}': {what}")


def _read(path, table, schema):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{table}: {path} does not exist")
    t = pq.read_table(path)
    if t.num_rows == 0:
        raise ValueError(f"{table}: {path} has no rows")
    for field in schema:
        if field.name not in t.column_names:
            raise ValueError(f"{table}: column '{field.name}' is missing (have {t.column_names})")
        col = t.column(field.name)
        if col.null_count:
            row = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
            _fail(table, row, field.name, "null value")
        try:
            t = t.set_column(t.column_names.index(field.name), field.name, col.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"{table}: column '{field.name}' has type {col.type}, expected {field.type}: {exc}") from None
    return t.select(schema.names)


def read_items(path):
    """items.parquet, validated; item ids unique, images non-empty."""
    t = _read(path, "items", ITEM_SCHEMA)
    ids = t.column("item_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if dup.size:
        _fail("items", int(order[dup[0] + 1]), "item_id", f"duplicate id {ids[order][dup[0]]}")
    lengths = pc.binary_length(t.column("image")).to_numpy()
    if (lengths == 0).any():
        _fail("items", int(np.flatnonzero(lengths == 0)[0]), "image", "empty image bytes")
    return t


def _list_values(t, column):
    """(flat values, owning row of each value, per-row lengths) of a list column."""
    arr = t.column(column).combine_chunks()
    values = arr.flatten().to_numpy()
    lengths = pc.list_value_length(arr).to_numpy()
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return values, rows, lengths


def read_sessions(path, table, item_ids):
    """A session table, validated against the item ids (a sorted or unsorted int64 array)."""
    t = _read(path, table, SESSION_SCHEMA)
    known = np.sort(np.asarray(item_ids, dtype=np.int64))
    for column in ("history", "pv_items"):
        values, rows, _ = _list_values(t, column)
        pos = np.searchsorted(known, values).clip(max=len(known) - 1)
        unknown = known[pos] != values
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            _fail(table, int(rows[i]), column, f"unknown item id {values[i]}")
    _, _, pv_len = _list_values(t, "pv_items")
    clicks, click_rows, click_len = _list_values(t, "clicks")
    if (pv_len == 0).any():
        _fail(table, int(np.flatnonzero(pv_len == 0)[0]), "pv_items", "no shown items")
    mismatch = np.flatnonzero(pv_len != click_len)
    if mismatch.size:
        r = int(mismatch[0])
        _fail(table, r, "clicks", f"{click_len[r]} labels for {pv_len[r]} pv_items")
    bad = np.flatnonzero((clicks != 0) & (clicks != 1))
    if bad.size:
        _fail(table, int(click_rows[bad[0]]), "clicks", f"label {clicks[bad[0]]} is not 0/1")
    return t


def load_dataset(root, tables=SESSION_TABLES):
    """{'items': Table, <session table>: Table} from a directory in this format."""
    items = read_items(os.path.join(root, "items.parquet"))
    ids = items.column("item_id").to_numpy()
    out = {"items": items}
    for name in tables:
        out[name] = read_sessions(os.path.join(root, f"{name}.parquet"), name, ids)
    return out
