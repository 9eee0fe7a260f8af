"""Items by reference: items.parquet with image_path instead of bytes. Paths are checked at load
(error or skip-and-count), the loader and embed read only the files they need, and everything
equals the same world with the bytes inside."""
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import courier_fast.data.images as images_module
from courier_fast.data import ImageDecoder, SessionLoader, load_dataset
from courier_fast.data.format import ITEM_PATH_SCHEMA, read_items, write_table
from courier_fast.pipeline.embed import encode_items
from courier_fast.models.encoder import ImageEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


def to_path_layout(world, dest, absolute=False):
    """A copy of `world` whose items.parquet names image files (images/<id>.jpg) instead of holding bytes."""
    shutil.copytree(world, dest)
    items = pq.read_table(os.path.join(dest, "items.parquet"))
    os.makedirs(os.path.join(dest, "images"))
    paths = []
    for item_id, data in zip(items.column("item_id").to_pylist(), items.column("image").to_pylist()):
        rel = os.path.join("images", f"{item_id}.jpg")
        with open(os.path.join(dest, rel), "wb") as f:
            f.write(data)
        paths.append(os.path.join(str(dest), rel) if absolute else rel)
    table = pa.table({"item_id": items.column("item_id"), "image_path": paths, "category": items.column("category"),
                      "title": items.column("title")}, schema=ITEM_PATH_SCHEMA)
    write_table(table, os.path.join(dest, "items.parquet"))
    return str(dest)


@pytest.fixture(scope="module")
def path_world(world, tmp_path_factory):
    return to_path_layout(world, tmp_path_factory.mktemp("paths") / "world")


@pytest.mark.parametrize("absolute", [False, True])
def test_path_items_load_with_absolute_paths(world, tmp_path, absolute):
    data = to_path_layout(world, tmp_path / "w", absolute=absolute)
    items = load_dataset(data)["items"]
    assert items.column_names == ["item_id", "image_path", "category", "title"]
    for item_id, path in zip(items.column("item_id").to_pylist(), items.column("image_path").to_pylist()):
        assert os.path.isabs(path) and path == os.path.join(data, "images", f"{item_id}.jpg")
    native = load_dataset(world)["items"]
    assert items.column("item_id").equals(native.column("item_id"))


def test_loader_batches_equal_the_byte_world(world, path_world):
    a, b = load_dataset(world, ("pretrain",)), load_dataset(path_world, ("pretrain",))
    kw = dict(batch_size=8, seed=1, prefetch=0)
    for x, y in zip(SessionLoader(a["items"], a["pretrain"], decoder=ImageDecoder(backend="pil"), **kw),
                    SessionLoader(b["items"], b["pretrain"], decoder=ImageDecoder(backend="pil"), **kw)):
        assert torch.equal(x.images, y.images) and torch.equal(x.pv_index, y.pv_index)
        assert torch.equal(x.image_ids, y.image_ids) and torch.equal(x.clicks, y.clicks)


def test_loader_reads_only_the_batch_files(path_world, monkeypatch):
    data = load_dataset(path_world, ("pretrain",))
    read = []
    real = images_module._read_file
    monkeypatch.setattr(images_module, "_read_file", lambda p: read.append(p) or real(p))
    loader = SessionLoader(data["items"], data["pretrain"], batch_size=4, shuffle=False, prefetch=0,
                           decoder=ImageDecoder(backend="pil"))
    batch = loader.make_batch(np.arange(4))
    expect = {os.path.join(path_world, "images", f"{i}.jpg") for i in batch.image_ids.tolist()}
    assert sorted(read) == sorted(expect) and len(read) < data["items"].num_rows


def test_encode_items_equals_the_byte_world(world, path_world):
    torch.manual_seed(0)
    enc = ImageEncoder("test_efficientnet", embed_dim=8)
    a = encode_items(enc, load_dataset(world, ())["items"], batch_size=16, decoder="pil")
    b = encode_items(enc, load_dataset(path_world, ())["items"], batch_size=16, decoder="pil")
    np.testing.assert_array_equal(a.item_ids, b.item_ids)
    np.testing.assert_allclose(a.vectors, b.vectors, rtol=1e-6, atol=1e-6)
    assert torch.is_grad_enabled()  # the generator does not leak no_grad into the caller


def test_missing_file_names_item_and_path(world, tmp_path):
    data = to_path_layout(world, tmp_path / "w")
    items = pq.read_table(os.path.join(data, "items.parquet"))
    victim_row = 7
    victim = items.column("item_id")[victim_row].as_py()
    path = os.path.join(data, "images", f"{victim}.jpg")
    os.remove(path)
    with pytest.raises(ValueError) as info:
        load_dataset(data)
    msg = str(info.value)
    assert f"row {victim_row}" in msg and "image_path" in msg and str(victim) in msg and path in msg


def test_missing_files_skipped_and_counted(world, tmp_path):
    data = to_path_layout(world, tmp_path / "w")
    native = load_dataset(world)
    ids = native["items"].column("item_id").to_numpy()
    gone = set(ids[[3, 11, 20]].tolist())
    for i in gone:
        os.remove(os.path.join(data, "images", f"{i}.jpg"))
    with pytest.warns(UserWarning, match="skipped 3 items"):
        got = load_dataset(data, on_missing="skip")
    assert got.skipped["items"] == 3
    assert set(got["items"].column("item_id").to_pylist()) == set(ids.tolist()) - gone
    slots = rows = 0
    for name in ("pretrain", "ctr_train", "ctr_test"):
        before, after = native[name].to_pylist(), got[name].to_pylist()
        kept = []
        for r in before:
            pv = [(i, c) for i, c in zip(r["pv_items"], r["clicks"]) if i not in gone]
            hist = [i for i in r["history"] if i not in gone]
            slots += len(r["pv_items"]) - len(pv) + len(r["history"]) - len(hist)
            if pv:
                kept.append({"user_id": r["user_id"], "history": hist, "pv_items": [i for i, _ in pv],
                             "clicks": [c for _, c in pv]})
            else:
                rows += 1
        assert after == kept, name
    assert slots > 0 and got.skipped["slots"] == slots and got.skipped["rows"] == rows


def test_file_deleted_after_load_names_item(path_world, tmp_path):
    src = load_dataset(path_world, ("pretrain",))
    items = src["items"]
    victim = items.column("item_id")[0].as_py()
    moved = tmp_path / "images"
    shutil.copytree(os.path.join(path_world, "images"), moved)
    items = items.set_column(1, "image_path", pa.array([p.replace(os.path.join(path_world, "images"), str(moved))
                                                        for p in items.column("image_path").to_pylist()]))
    os.remove(moved / f"{victim}.jpg")
    images = images_module.ItemImages(items)
    with pytest.raises(ValueError, match=f"item {victim}: cannot read image file .*{victim}.jpg"):
        images.read([1, 0])


def test_both_or_neither_image_column(tmp_path):
    path = tmp_path / "items.parquet"
    write_table(pa.table({"item_id": [1], "image": [b"x"], "image_path": ["a.jpg"], "category": [0],
                          "title": ["t"]}), path)
    with pytest.raises(ValueError, match="both 'image' and 'image_path'"):
        read_items(path)
    write_table(pa.table({"item_id": [1], "image_path": [""], "category": [0], "title": ["t"]}), path)
    with pytest.raises(ValueError, match="row 0, column 'image_path': empty path"):
        read_items(path)
    with pytest.raises(ValueError, match="on_missing"):
        read_items(path, on_missing="ignore")
