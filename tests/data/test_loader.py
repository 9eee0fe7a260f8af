"""SessionLoader: shapes and masks, each item decoded once per batch, deterministic shuffling,
disjoint and complete sharding, prefetch equals the plain order, errors surface."""
import io

import numpy as np
import pyarrow as pa
import pytest
import torch

from courier_fast.data import DecodeError, ImageDecoder, dali_available
from courier_fast.data.format import ITEM_SCHEMA, SESSION_SCHEMA
from courier_fast.data.loader import SessionLoader


def _jpeg(value):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (value, 255 - value, (7 * value) % 256)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def world():
    rng = np.random.default_rng(0)
    ids = np.arange(100, 130)
    items = pa.table({"item_id": ids, "image": [_jpeg(int(i) * 8 % 256) for i in ids],
                      "category": ids % 3, "title": [f"t{i}" for i in ids]}, schema=ITEM_SCHEMA)
    rows = []
    for u in range(23):
        hist = rng.choice(ids, size=int(rng.integers(0, 8)), replace=False).tolist()
        pv = rng.choice(ids, size=int(rng.integers(1, 6)), replace=False).tolist()
        rows.append((u, hist, pv, rng.integers(0, 2, len(pv)).tolist()))
    sessions = pa.table({"user_id": [r[0] for r in rows], "history": [r[1] for r in rows],
                         "pv_items": [r[2] for r in rows], "clicks": [r[3] for r in rows]}, schema=SESSION_SCHEMA)
    return items, sessions


class CountingDecoder(ImageDecoder):
    def __init__(self):
        super().__init__(backend="pil")
        self.calls = []

    def __call__(self, images, item_ids=None):
        self.calls.append(list(item_ids))
        return super().__call__(images, item_ids)


def test_batch_contents_match_the_table(world):
    items, sessions = world
    dec = CountingDecoder()
    loader = SessionLoader(items, sessions, batch_size=4, history_len=5, decoder=dec, shuffle=False, prefetch=0)
    pixel = {int(i): ImageDecoder(backend="pil")([img])[0] for i, img in zip(items["item_id"].to_pylist(), items["image"].to_pylist())}
    seen = 0
    for batch, ids in zip(loader, dec.calls):
        assert len(ids) == len(set(ids))  # every distinct item decoded once per batch
        b = batch.pv.shape[0]
        assert batch.history.shape == (b, 5, 3, 12, 12) and batch.pv.shape[1] == loader.pv_len
        for k in range(b):
            row = sessions.slice(seen + k, 1).to_pylist()[0]
            hist = row["history"][-5:]
            assert batch.history_ids[k, :len(hist)].tolist() == hist
            assert batch.history_pad[k].tolist() == [False] * len(hist) + [True] * (5 - len(hist))
            assert batch.pv_ids[k, :len(row["pv_items"])].tolist() == row["pv_items"]
            assert batch.clicks[k, :len(row["clicks"])].tolist() == [float(c) for c in row["clicks"]]
            assert batch.clicks[k][batch.pv_pad[k]].abs().sum() == 0
            for j, item in enumerate(hist):
                assert torch.equal(batch.history[k, j], pixel[item])
            assert batch.history[k][batch.history_pad[k]].abs().sum() == 0
            assert batch.user_id[k] == row["user_id"]
        seen += b
    assert seen == sessions.num_rows


def test_shuffle_is_deterministic_per_seed_and_epoch(world):
    items, sessions = world
    a = SessionLoader(items, sessions, batch_size=5, seed=3, prefetch=0)
    b = SessionLoader(items, sessions, batch_size=5, seed=3, prefetch=0)
    assert np.array_equal(a.shard(), b.shard())
    first = a.shard()
    a.set_epoch(1)
    assert not np.array_equal(first, a.shard()) and sorted(first) == sorted(a.shard())


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_is_disjoint_and_complete(world, drop_last):
    items, sessions = world
    shards = [SessionLoader(items, sessions, batch_size=2, rank=r, world_size=3, seed=1,
                            drop_last=drop_last, prefetch=0).shard() for r in range(3)]
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == len(flat)
    if drop_last:
        assert len({len(s) for s in shards}) == 1 and all(len(s) % 2 == 0 for s in shards)
    else:
        assert sorted(flat.tolist()) == list(range(sessions.num_rows))
    loaders = [SessionLoader(items, sessions, batch_size=2, rank=r, world_size=3, drop_last=drop_last, prefetch=0) for r in range(3)]
    assert sum(sum(b.pv.shape[0] for b in ld) for ld in loaders) == sum(len(ld.shard()) for ld in loaders)


def test_prefetch_gives_the_same_batches(world):
    items, sessions = world
    plain = list(SessionLoader(items, sessions, batch_size=4, seed=2, prefetch=0))
    fetched = list(SessionLoader(items, sessions, batch_size=4, seed=2, prefetch=3))
    assert len(plain) == len(fetched)
    for x, y in zip(plain, fetched):
        assert torch.equal(x.pv, y.pv) and torch.equal(x.history_ids, y.history_ids)


def test_decode_error_surfaces_from_the_prefetch_thread(world):
    items, sessions = world
    images = items["image"].to_pylist()
    images[0] = b"broken"
    broken = items.set_column(1, "image", pa.array(images, pa.binary()))
    loader = SessionLoader(broken, sessions, batch_size=50, prefetch=2, decoder=ImageDecoder(backend="pil"))
    with pytest.raises(DecodeError) as info:
        list(loader)
    assert info.value.item_id == 100


def test_bad_arguments(world):
    items, sessions = world
    with pytest.raises(ValueError, match="rank"):
        SessionLoader(items, sessions, batch_size=2, rank=3, world_size=3)
    with pytest.raises(ValueError, match="batch_size"):
        SessionLoader(items, sessions, batch_size=0)


@pytest.mark.parametrize("backend", ["pil"] + (["dali"] if dali_available() else []))
def test_skipped_image_becomes_padding_in_every_row(world, backend):
    """on_error="skip" inside multi-row batches: the bad item's slots are padding and every
    other slot still shows its own image (indices into `images` stay aligned)."""
    items, sessions = world
    bad_id = 105
    images = items["image"].to_pylist()
    images[bad_id - 100] = images[bad_id - 100][:40]  # a truncated JPEG
    broken = items.set_column(1, "image", pa.array(images, pa.binary()))
    pixel = {int(i): ImageDecoder(backend="pil")([img])[0]
             for i, img in zip(items["item_id"].to_pylist(), items["image"].to_pylist()) if i != bad_id}
    dec = ImageDecoder(backend=backend, on_error="skip")
    loader = SessionLoader(broken, sessions, batch_size=8, decoder=dec, shuffle=False, prefetch=0)
    rows_with_bad = batches_with_bad = 0
    for start, batch in zip(range(0, sessions.num_rows, 8), loader):
        rows = sessions.slice(start, 8).to_pylist()
        hits = [bad_id in r["history"][-5:] + r["pv_items"] for r in rows]
        rows_with_bad += sum(hits)
        batches_with_bad += any(hits)
        assert bad_id not in batch.image_ids.tolist() and batch.images.shape[0] == len(batch.image_ids)
        for ids, pad, gathered in ((batch.history_ids, batch.history_pad, batch.history),
                                   (batch.pv_ids, batch.pv_pad, batch.pv)):
            assert torch.equal(pad, ids < 0)
            for k, j in zip(*torch.nonzero(~pad, as_tuple=True)):
                assert (gathered[k, j].int() - pixel[int(ids[k, j])].int()).abs().max() <= 3
            assert gathered[pad].abs().sum() == 0
        assert batch.clicks[batch.pv_pad].abs().sum() == 0
        for k, r in enumerate(rows):  # the other slots keep their place
            assert batch.pv_ids[k, :len(r["pv_items"])].tolist() == [i if i != bad_id else -1 for i in r["pv_items"]]
    assert rows_with_bad > 1 and dec.skipped == batches_with_bad > 0  # it sat in several rows


def test_prefetch_thread_decodes_on_the_decoders_gpu(world, monkeypatch):
    """The prefetch thread makes the decoder's device current (a new thread starts on GPU 0)."""
    import threading
    items, sessions = world
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append((threading.current_thread().name, d)))
    pil = ImageDecoder(backend="pil")

    class OnGpu1:  # a decoder made with device="cuda:1" (it decodes on the CPU here)
        device = torch.device("cuda", 1)

        def __call__(self, images, item_ids=None):
            return pil(images, item_ids)

    list(SessionLoader(items, sessions, batch_size=8, decoder=OnGpu1(), prefetch=2))
    assert calls == [("courier-fast-prefetch", torch.device("cuda", 1))]
