"""The on-disk format users bring their data in (and `courier-fast generate` writes).

    items.parquet        item_id int64 (unique), image binary (JPEG bytes) -- or, instead,
                         image_path string (one file per item: absolute, or relative to the
                         dataset directory; read lazily, see images.py) --, category int,
                         title string
    pretrain.parquet     one row per request: user_id int, history list<int64> (clicked item
    ctr_train.parquet    ids, oldest -> newest), pv_items list<int64> (items shown),
    ctr_test.parquet     clicks list<int8> (0/1, one per shown item)

Loading validates everything and raises ValueError naming the table, row and column: unknown
item ids, pv_items/clicks length mismatches, labels other than 0/1, nulls, empty tables, and
image files that do not exist (a ValueError naming the item and path, or with
on_missing="skip" the item is left out, its history / page-view slots dropped and counted).
Writes are atomic (temporary file, then rename).
"""
import os
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from courier_fast.atomic import atomic_path  # noqa: F401  (the data modules write through it)

SESSION_TABLES = ("pretrain", "ctr_train", "ctr_test")
PATH_CHUNK = 65536  # image paths resolved and checked this many at a time
ITEM_SCHEMA = pa.schema([("item_id", pa.int64()), ("image", pa.binary()), ("category", pa.int64()),
                         ("title", pa.string())])
ITEM_PATH_SCHEMA = pa.schema([("item_id", pa.int64()), ("image_path", pa.string()), ("category", pa.int64()),
                              ("title", pa.string())])
SESSION_SCHEMA = pa.schema([("user_id", pa.int64()), ("history", pa.list_(pa.int64())),
                            ("pv_items", pa.list_(pa.int64())), ("clicks", pa.list_(pa.int8()))])


def write_table(table, path):
    """Write a parquet file atomically."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _fail(table, row, column, what):
    raise ValueError(f"{table}: row {row}, column '{column}': {what}")


def _read(path, table, schema, missing_hint=""):
    if not os.path.exists(path):
        raise FileNotFoundError(f"{table}: {path} does not exist")
    t = pq.read_table(path)
    if t.num_rows == 0:
        raise ValueError(f"{table}: {path} has no rows")
    for field in schema:
        if field.name not in t.column_names:
            raise ValueError(f"{table}: column '{field.name}' is missing (have {t.column_names}){missing_hint}")
        col = t.column(field.name)
        if col.null_count:
            row = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
            _fail(table, row, field.name, "null value")
        try:
            t = t.set_column(t.column_names.index(field.name), field.name, col.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"{table}: column '{field.name}' has type {col.type}, expected {field.type}: {exc}") from None
    return t.select(schema.names)


def read_items(path, on_missing="raise"):
    """items.parquet, validated; item ids unique, images non-empty. Path items: paths made
    absolute (relative ones are taken from the file's directory) and checked to exist."""
    return _read_items(path, on_missing)[0]


def _read_items(path, on_missing):
    """(items table, ids of the items skipped because their image file is missing)."""
    if on_missing not in ("raise", "skip"):
        raise ValueError(f"on_missing must be 'raise' or 'skip', got {on_missing!r}")
    if os.path.exists(path):
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowInvalid, OSError) as exc:
            raise ValueError(f"items: {path} is not a parquet file ({exc})") from None
        if "image" in names and "image_path" in names:
            raise ValueError(f"items: {path} has both 'image' and 'image_path' columns; keep one")
        if "image" not in names and "image_path" in names:
            return _read_path_items(path, on_missing)
    t = _read(path, "items", ITEM_SCHEMA, missing_hint="; or give 'image_path' (one file per item)")
    _check_unique_ids(t)
    lengths = pc.binary_length(t.column("image")).to_numpy()
    if (lengths == 0).any():
        _fail("items", int(np.flatnonzero(lengths == 0)[0]), "image", "empty image bytes")
    return t, np.zeros(0, np.int64)


def _check_unique_ids(t):
    ids = t.column("item_id").to_numpy()
    order = np.argsort(ids, kind="stable")
    dup = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if dup.size:
        _fail("items", int(order[dup[0] + 1]), "item_id", f"duplicate id {ids[order][dup[0]]}")


def _read_path_items(path, on_missing):
    from courier_fast.data.images import missing_files, resolve_paths

    t = _read(path, "items", ITEM_PATH_SCHEMA)
    _check_unique_ids(t)
    lengths = pc.utf8_length(t.column("image_path")).to_numpy()
    if (lengths == 0).any():
        _fail("items", int(np.flatnonzero(lengths == 0)[0]), "image_path", "empty path")
    root = os.path.dirname(os.path.abspath(path))
    resolved, missing = [], np.zeros(t.num_rows, dtype=bool)
    for start in range(0, t.num_rows, PATH_CHUNK):  # a chunk of Python strings at a time, not the catalogue
        chunk = resolve_paths(t.column("image_path").slice(start, PATH_CHUNK).to_pylist(), root)
        missing[start:start + len(chunk)] = missing_files(chunk)
        resolved.append(pa.array(chunk, pa.string()))
    t = t.set_column(1, "image_path", pa.chunked_array(resolved, pa.string()))
    if not missing.any():
        return t, np.zeros(0, np.int64)
    first = int(np.flatnonzero(missing)[0])
    item = t.column("item_id")[first].as_py()
    what = (f"item {item}: image file {t.column('image_path')[first].as_py()} does not exist "
            f"({int(missing.sum())} missing)")
    if on_missing == "raise":
        _fail("items", first, "image_path", what + "; on_missing='skip' leaves them out")
    skipped = t.column("item_id").to_numpy()[missing]
    warnings.warn(f"items: skipped {len(skipped)} items without an image file (e.g. row {first}: {what})",
                  stacklevel=3)
    return t.filter(pa.array(~missing)), skipped


def _list_values(t, column):
    """(flat values, owning row of each value, per-row lengths) of a list column."""
    arr = t.column(column).combine_chunks()
    values = arr.flatten().to_numpy()
    lengths = pc.list_value_length(arr).to_numpy()
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return values, rows, lengths


def read_sessions(path, table, item_ids, drop_items=None):
    """A session table, validated against the item ids (a sorted or unsorted int64 array).
    drop_items: ids (also known) whose history / page-view slots are removed after validation;
    a row left without shown items is removed. -> the table (and, with drop_items, the
    numbers of slots and rows removed)."""
    t = _read(path, table, SESSION_SCHEMA)
    drop = np.zeros(0, np.int64) if drop_items is None else np.asarray(drop_items, dtype=np.int64)
    known = np.sort(np.concatenate([np.asarray(item_ids, dtype=np.int64), drop]))
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
    if drop_items is None:
        return t
    return _drop_items(t, drop)


def _filter_lists(column, keep):
    """A list column with the flat values where `keep` is False removed (row structure kept)."""
    arr = column.combine_chunks()
    offsets = arr.offsets.to_numpy()
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    flat = arr.flatten()
    new_offsets = kept_before[offsets - offsets[0]].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(new_offsets), flat.filter(pa.array(keep)), type=arr.type)


def _drop_items(t, drop):
    """(t without the slots of items `drop` and without rows left with no pv item, slots removed, rows removed)."""
    if not len(drop):
        return t, 0, 0
    drop_set = pa.array(np.unique(drop))
    hist_keep = ~pc.is_in(t.column("history").combine_chunks().flatten(), drop_set).to_numpy(zero_copy_only=False)
    pv_keep = ~pc.is_in(t.column("pv_items").combine_chunks().flatten(), drop_set).to_numpy(zero_copy_only=False)
    slots = int((~hist_keep).sum() + (~pv_keep).sum())
    t = t.set_column(1, "history", _filter_lists(t.column("history"), hist_keep))
    t = t.set_column(2, "pv_items", _filter_lists(t.column("pv_items"), pv_keep))
    t = t.set_column(3, "clicks", _filter_lists(t.column("clicks"), pv_keep))
    rows = pc.list_value_length(t.column("pv_items")).to_numpy() > 0
    return t.filter(pa.array(rows)), slots, int((~rows).sum())


class Dataset(dict):
    """{'items': Table, <session table>: Table}; .skipped counts what on_missing='skip' left out:
    {'items': items without an image file, 'slots': their history / page-view slots, 'rows':
    requests left with no shown item}."""

    skipped = {"items": 0, "slots": 0, "rows": 0}


def load_dataset(root, tables=SESSION_TABLES, on_missing="raise"):
    """A Dataset ({'items': Table, <session table>: Table}) from a directory in this format.

    on_missing: what an item whose image file does not exist does: "raise" a ValueError naming
    the item and path, or "skip" it (its slots are removed from every session table; counted in
    .skipped)."""
    items, skipped = _read_items(os.path.join(root, "items.parquet"), on_missing)
    ids = items.column("item_id").to_numpy()
    out = Dataset(items=items)
    out.skipped = {"items": len(skipped), "slots": 0, "rows": 0}
    for name in tables:
        out[name], slots, rows = read_sessions(os.path.join(root, f"{name}.parquet"), name, ids, drop_items=skipped)
        out.skipped["slots"] += slots
        out.skipped["rows"] += rows
    return out
