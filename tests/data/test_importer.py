"""`courier-fast import`: the session rules checked against an independent reading of the log
(history strictly before, negatives never the user's positives, split by time, cold share),
determinism, every input format, impressions, string ids, bad rows, malformed inputs (one
error naming file, row, column; nothing left in --out) and the generate -> import -> train ->
embed -> eval chain."""
import csv
import datetime
import json
import os
import shutil
from collections import Counter, defaultdict

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from courier_fast.cli import main
from courier_fast.data import load_dataset
from courier_fast.data.generate import EPOCH, WorldConfig, generate, split_days
from courier_fast.data.importer import ImportConfig, import_dataset

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = WorldConfig(items=60, users=12, requests_per_user=8, image_size=16)  # conftest's world, as files


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("files"))
    generate(root, seed=0, config=CONFIG, layout="files")
    return root


def _cuts():
    return tuple((EPOCH + datetime.timedelta(days=d)).date().isoformat() for d in split_days(CONFIG))


def _import(files, out, **kw):
    args = dict(interactions=os.path.join(files, "interactions.csv"), items=os.path.join(files, "items.csv"),
                images=os.path.join(files, "images"), out=str(out), split_times=_cuts(), progress=False)
    args.update(kw)
    return import_dataset(ImportConfig(**args))


@pytest.fixture(scope="module")
def imported(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("imp") / "data"
    return str(out), _import(files, out, negatives=3, history_len=4, seed=1)


def _log(files):
    with open(os.path.join(files, "interactions.csv")) as f:
        return [(int(r["user_id"]), int(r["item_id"]), datetime.datetime.fromisoformat(r["timestamp"]))
                for r in csv.DictReader(f)]


def _rows(out):
    return {name: pq.read_table(os.path.join(out, f"{name}.parquet")).to_pylist()
            for name in ("pretrain", "ctr_train", "ctr_test")}


# ----------------------------------------------------------------------------- the rules
def _split_of(t, cuts):
    return "pretrain" if t < cuts[0] else "ctr_train" if t < cuts[1] else "ctr_test"


def test_rows_follow_the_log(files, imported):
    """Every row against an independent reading of the log: its history, its split, and each
    negative drawn as of the request (from the newest ceil(n / time_windows) events of its split
    strictly before it, never a positive of the user up to then)."""
    out, report = imported
    log = _log(files)
    cuts = [datetime.datetime.fromisoformat(c) for c in _cuts()]
    by_user = defaultdict(list)
    for k, (u, i, t) in enumerate(log):
        by_user[u].append((t, k, i))
    expected = {name: Counter() for name in ("pretrain", "ctr_train", "ctr_test")}
    when = defaultdict(set)  # (user, positive, history) -> request times
    for u, events in by_user.items():
        events.sort()
        for t, _, i in events:
            history = tuple(j for s, _, j in events if s < t)[-4:]  # strictly earlier, newest 4
            if history:
                expected[_split_of(t, cuts)][(u, i, history)] += 1
                when[(u, i, history)].add(t)
    split_events = {name: sorted((t, k, i) for k, (_, i, t) in enumerate(log) if _split_of(t, cuts) == name)
                    for name in expected}
    pool = {name: -(-len(ev) // 16) for name, ev in split_events.items()}  # time_windows = 16 (default)
    assert report["negative_sampling"]["pool_events"] == pool
    got = _rows(out)
    n_neg = 0
    for name, rows in got.items():
        seen = Counter()
        for r in rows:
            assert sum(r["clicks"]) == 1 and len(r["pv_items"]) == len(r["clicks"]) <= 4
            pos = r["pv_items"][r["clicks"].index(1)]
            negs = [i for i, c in zip(r["pv_items"], r["clicks"]) if not c]
            key = (r["user_id"], pos, tuple(r["history"]))
            seen[key] += 1
            (t,) = when[key]  # this world has one request time per (user, positive, history)
            earlier = {i for _, _, i in [e for e in split_events[name] if e[0] < t][-pool[name]:]}
            users_so_far = {i for s, _, i in by_user[r["user_id"]] if s <= t}
            assert len(set(negs)) == len(negs) and set(negs) <= earlier - users_so_far, (name, r, t)
            n_neg += len(negs)
        assert seen == expected[name], name
    assert n_neg > 0
    assert report["rows"] == {k: sum(v.values()) for k, v in expected.items()}
    assert report["rows_short_of_negatives"] == sum(len(r["pv_items"]) < 4 for rows in got.values() for r in rows)
    assert report["dropped_short_history"] == len(log) - sum(report["rows"].values())
    with open(os.path.join(out, "import.json")) as f:
        assert json.load(f)["negative_sampling"] == report["negative_sampling"]


def _numeric_import(tmp_path, log, header, **kw):
    """Import a hand-written log (numeric times) over items 1..9 with split times 100 / 200."""
    images = _tiny_images(tmp_path / "img", [f"{i}.jpg" for i in range(1, 10)])
    items = _write(tmp_path / "items.csv", ["item_id"], [[i] for i in range(1, 10)])
    inter = _write(tmp_path / "log.csv", header, log)
    args = dict(interactions=inter, items=items, images=images, out=str(tmp_path / "d"), split_times=("100", "200"),
                progress=False)
    args.update(kw)
    return import_dataset(ImportConfig(**args)), _rows(tmp_path / "d")


def _pages(rows):
    """{(user, positive): set of shown items} of rows with one click each."""
    return {(r["user_id"], r["pv_items"][r["clicks"].index(1)]): set(r["pv_items"]) for r in rows}


def test_negatives_are_drawn_as_of_the_request(tmp_path):
    """A hand-built log where the old rule (the whole window, the user's positives at any time)
    gives other pages: an item first seen after a request is never its negative, the user's
    later positive is one, and no draw crosses a split."""
    log = [  # user, item, time
        [1, 1, 10], [2, 6, 21], [2, 6, 22], [2, 6, 25], [1, 2, 30], [2, 4, 40], [1, 6, 50], [3, 5, 60],
        [4, 7, 110], [1, 8, 120],
        [2, 9, 210], [3, 7, 220],
    ]
    report, rows = _numeric_import(tmp_path, log, ["user_id", "item_id", "timestamp"], negatives=2, time_windows=1,
                                   min_history=0, seed=3)
    first = {}
    for u, i, t in log:
        first.setdefault(i, t)
    for name, table in rows.items():  # min_history=0: one row per event, in time order
        events = [(u, i, t) for u, i, t in log if _split_of(t, (100, 200)) == name]
        assert [(r["user_id"], r["pv_items"][r["clicks"].index(1)]) for r in table] == [(u, i) for u, i, _ in events]
        for r, (_, pos, t) in zip(table, events):
            assert all(first[i] < t for i in r["pv_items"] if i != pos), (name, r)  # as of the request
    pages = {name: _pages(table) for name, table in rows.items()}
    # user 1 at t=30: before it only items 1 (its own) and 6 (user 2's; user 1's own later, at 50);
    # items 4 and 5 come after it. The old rule drew from {3, 4, 5} minus user 1's positives {1, 2, 6}.
    assert pages["pretrain"][(1, 2)] == {2, 6}
    assert pages["pretrain"][(1, 1)] == {1}  # nothing before it
    assert pages["ctr_train"] == {(4, 7): {7}, (1, 8): {8, 7}}  # the pretrain items are not drawn
    assert pages["ctr_test"] == {(2, 9): {9}, (3, 7): {7, 9}}
    assert report["negative_sampling"]["pool_events"] == {"pretrain": 8, "ctr_train": 2, "ctr_test": 2}
    assert report["negative_sampling"]["rule"].startswith("as-of")


def test_cold_means_first_seen_after_the_split(tmp_path):
    """Items 3 and 4 appear before the ctr_test cut only in rows that yield no session row (a
    user's first positive, dropped for min_history; a shown, unclicked row): they are not cold.
    Counted as "in no pretrain / ctr_train row", they would be."""
    log = [  # user, item, time, click
        [1, 1, 10, 1], [1, 2, 20, 1], [2, 3, 30, 1], [3, 4, 40, 0], [4, 1, 50, 1],
        [1, 5, 110, 1],
        [4, 3, 210, 1], [4, 4, 220, 1], [1, 7, 230, 1], [2, 7, 240, 1], [1, 2, 250, 1],
    ]
    report, rows = _numeric_import(tmp_path, log, ["user_id", "item_id", "timestamp", "click"], negatives=0,
                                   min_history=1)
    shown = [r["pv_items"][0] for r in rows["ctr_test"]]
    assert shown == [3, 4, 7, 7, 2] and report["dropped_short_history"] == 3
    assert report["cold_items_ctr_test"] == {"slots": 2 / 5, "items": 1 / 4, "cold_items": 1, "shown_items": 4}
    in_kept_rows = {i for name in ("pretrain", "ctr_train") for r in rows[name] for i in r["pv_items"] + r["history"]}
    assert np.mean([i not in in_kept_rows for i in shown]) == 4 / 5  # the other reading differs here


def test_cold_share_and_items(files, imported):
    out, report = imported
    rows = _rows(out)
    cut = datetime.datetime.fromisoformat(_cuts()[1])
    first = {}
    for _, i, t in _log(files):
        first[i] = min(t, first.get(i, t))
    shown = [i for r in rows["ctr_test"] for i in r["pv_items"]]
    cold = report["cold_items_ctr_test"]
    assert cold["slots"] == pytest.approx(np.mean([first[i] >= cut for i in shown]))
    assert cold["items"] == pytest.approx(np.mean([first[i] >= cut for i in set(shown)]))
    assert cold["slots"] > 0.9  # the generated world shows only cold items after the second cut
    data = load_dataset(out)  # validates every table
    items = pq.read_table(os.path.join(out, "items.parquet"))
    assert items.num_rows == CONFIG.items and not any(os.path.isabs(p) for p in items.column("image_path").to_pylist())
    for item_id, path in zip(data["items"].column("item_id").to_pylist(), data["items"].column("image_path").to_pylist()):
        with open(path, "rb") as a, open(os.path.join(files, "images", f"{item_id}.jpg"), "rb") as b:
            assert a.read() == b.read()
    with open(os.path.join(out, "import.json")) as f:
        assert json.load(f)["rows"] == report["rows"]
    assert sorted(os.listdir(out)) == ["categories.parquet", "ctr_test.parquet", "ctr_train.parquet", "import.json",
                                       "items.parquet", "pretrain.parquet"]


def test_seeded(files, imported, tmp_path):
    out, _ = imported
    same = _import(files, tmp_path / "same", negatives=3, history_len=4, seed=1)
    other = _import(files, tmp_path / "other", negatives=3, history_len=4, seed=2)
    assert same["rows"] == other["rows"]
    assert _rows(out) == _rows(tmp_path / "same")
    assert _rows(out) != _rows(tmp_path / "other")


def test_fraction_split_is_in_time_order(files, tmp_path):
    report = _import(files, tmp_path / "d", split_times=None, split=(0.6, 0.2, 0.2))
    n = sum(report["rows"].values())
    assert abs(report["rows"]["pretrain"] / n - 0.6) < 0.1
    assert report["split_times"][0] < report["split_times"][1]


# ----------------------------------------------------------------------------- formats
@pytest.mark.parametrize("fmt", ["tsv", "parquet", "jsonl"])
def test_every_format_gives_the_same_tables(files, imported, tmp_path, fmt):
    out, _ = imported
    src = tmp_path / "src"
    src.mkdir()
    paths = {}
    for name in ("interactions", "items"):
        table = pacsv.read_csv(os.path.join(files, f"{name}.csv"))
        path = str(src / f"{name}.{fmt}")
        if fmt == "tsv":
            pacsv.write_csv(table, path, pacsv.WriteOptions(delimiter="\t"))
        elif fmt == "parquet":
            pq.write_table(table, path)
        else:
            with open(path, "w") as f:
                for row in table.to_pylist():
                    f.write(json.dumps({k: str(v) if isinstance(v, datetime.datetime) else v for k, v in row.items()})
                            + "\n")
        paths[name] = path
    _import(files, tmp_path / "d", interactions=paths["interactions"], items=paths["items"], negatives=3,
            history_len=4, seed=1)
    assert _rows(tmp_path / "d") == _rows(out)


def test_headerless_csv(files, imported, tmp_path):
    out, _ = imported
    with open(os.path.join(files, "interactions.csv")) as f:
        rows = list(csv.reader(f))[1:]
    path = tmp_path / "log.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    _import(files, tmp_path / "d", interactions=str(path), interactions_header=False, user_col="column0",
            item_col="column1", time_col="column2", items_item_col="item_id", negatives=3, history_len=4, seed=1)
    assert _rows(tmp_path / "d") == _rows(out)


def _write(path, header, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def _tiny_images(folder, names):
    from PIL import Image
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        Image.new("RGB", (8, 8), (len(name) * 20 % 256, 0, 0)).save(os.path.join(folder, name), format="JPEG")
    return str(folder)


def test_impressions_become_page_views(tmp_path):
    images = _tiny_images(tmp_path / "img", [f"{i}.jpg" for i in (1, 2, 3, 4)])
    items = _write(tmp_path / "items.csv", ["item_id", "category"], [[1, "a"], [2, "b"], [3, "a"], [4, "c"]])
    log = [  # request, user, item, time, click
        ["r1", 7, 1, 10, 1], ["r1", 7, 2, 10, 0],
        ["r2", 7, 3, 20, 1], ["r2", 7, 4, 20, 1], ["r2", 7, 1, 20, 0],
        ["r3", 7, 2, 30, 0], ["r3", 7, 4, 30, 1],
        ["r4", 8, 1, 40, 1],
        ["r5", 7, 1, 50, 0], ["r5", 7, 3, 50, 0],
    ]
    inter = _write(tmp_path / "log.csv", ["request_id", "user_id", "item_id", "timestamp", "click"], log)
    report = import_dataset(ImportConfig(interactions=inter, items=items, images=images, out=str(tmp_path / "d"),
                                         split_times=("25", "45"), min_history=0, progress=False))
    assert report["impressions"] and report["time_mode"] == "numeric"
    rows = _rows(tmp_path / "d")
    assert rows["pretrain"] == [{"user_id": 7, "history": [], "pv_items": [1, 2], "clicks": [1, 0]},
                                {"user_id": 7, "history": [1], "pv_items": [3, 4, 1], "clicks": [1, 1, 0]}]
    assert rows["ctr_train"] == [{"user_id": 7, "history": [1, 3, 4], "pv_items": [2, 4], "clicks": [0, 1]},
                                 {"user_id": 8, "history": [], "pv_items": [1], "clicks": [1]}]
    assert rows["ctr_test"] == [{"user_id": 7, "history": [1, 3, 4, 4], "pv_items": [1, 3], "clicks": [0, 0]}]
    cats = pq.read_table(tmp_path / "d" / "categories.parquet").to_pylist()
    assert cats == [{"category": 0, "name": "a"}, {"category": 1, "name": "b"}, {"category": 2, "name": "c"}]


def test_string_ids_in_json_lines(tmp_path):
    """Amazon-Reviews-like: string item and user ids, ms timestamps, JSON lines."""
    ids = ["B00XK", "A17Q2", "B0042"]
    images = _tiny_images(tmp_path / "img", [f"{i}.jpg" for i in ids])
    with open(tmp_path / "meta.jsonl", "w") as f:
        for i in ids:
            f.write(json.dumps({"parent_asin": i, "title": f"t {i}", "main_category": "x", "images": [{"large": "u"}]})
                    + "\n")
    with open(tmp_path / "reviews.jsonl", "w") as f:
        for k, (u, i) in enumerate([("AF", 0), ("AF", 1), ("AF", 2), ("ZZ", 2), ("ZZ", 0), ("AF", 0)]):
            f.write(json.dumps({"user_id": u, "parent_asin": ids[i], "timestamp": 1_600_000_000_000 + k,
                                "rating": 5}) + "\n")
    report = import_dataset(ImportConfig(interactions=str(tmp_path / "reviews.jsonl"), items=str(tmp_path / "meta.jsonl"),
                                         images=images, out=str(tmp_path / "d"), item_col="parent_asin",
                                         category_col="main_category", negatives=1, split=(0.34, 0.33, 0.33),
                                         min_history=0, progress=False))
    assert report["items"] == 3 and report["interactions"] == 6
    item_map = {r["source_id"]: r["item_id"] for r in pq.read_table(tmp_path / "d" / "item_ids.parquet").to_pylist()}
    assert sorted(item_map) == sorted(ids) and len(set(item_map.values())) == 3
    user_map = {r["source_id"]: r["user_id"] for r in pq.read_table(tmp_path / "d" / "user_ids.parquet").to_pylist()}
    assert sorted(user_map) == ["AF", "ZZ"]
    data = load_dataset(str(tmp_path / "d"))
    for item_id, path in zip(data["items"].column("item_id").to_pylist(), data["items"].column("image_path").to_pylist()):
        source = next(s for s, v in item_map.items() if v == item_id)
        assert path == os.path.join(images, f"{source}.jpg")
    first = min((r for rows in _rows(tmp_path / "d").values() for r in rows), key=lambda r: len(r["history"]))
    assert first["user_id"] in user_map.values()


def test_zero_padded_ids_and_nested_image_folders(tmp_path):
    """H&M-like: article ids written with a leading zero, images/010/0108775015.jpg, daily dates."""
    ids = ["0108775015", "0108775044", "0110065001", "0111565001"]
    images = _tiny_images(tmp_path / "images", [f"{i[:3]}/{i}.jpg" for i in ids])
    items = _write(tmp_path / "articles.csv", ["article_id", "prod_name", "product_type_no"],
                   [[i, f"name {i}", 250 + k % 2] for k, i in enumerate(ids)])
    log = [["2020-09-01", "c1", ids[0]], ["2020-09-02", "c1", ids[1]], ["2020-09-03", "c1", ids[2]],
           ["2020-09-03", "c2", ids[3]], ["2020-09-04", "c2", ids[0]], ["2020-09-05", "c1", ids[3]]]
    inter = _write(tmp_path / "transactions_train.csv", ["t_dat", "customer_id", "article_id"], log)
    report = import_dataset(ImportConfig(interactions=inter, items=items, images=images, out=str(tmp_path / "d"),
                                         user_col="customer_id", item_col="article_id", time_col="t_dat",
                                         title_col="prod_name", category_col="product_type_no",
                                         image_pattern="{item_id:.3}/{item_id}.jpg", negatives=2, min_history=0,
                                         split_times=("2020-09-03", "2020-09-05"), progress=False))
    assert report["time_mode"] == "datetime" and report["items"] == 4
    assert not os.path.exists(tmp_path / "d" / "item_ids.parquet")  # integer ids: kept as they are
    data = load_dataset(str(tmp_path / "d"))
    assert sorted(data["items"].column("item_id").to_pylist()) == sorted(int(i) for i in ids)
    assert sorted(data["items"].column("title").to_pylist()) == sorted(f"name {i}" for i in ids)
    assert report["rows"] == {"pretrain": 2, "ctr_train": 3, "ctr_test": 1}


# ----------------------------------------------------------------------------- bad rows
def _damaged_log(files, tmp_path):
    """The log with four bad rows: null user (row 2), unknown item (5), unparseable time (7), null item (9)."""
    with open(os.path.join(files, "interactions.csv")) as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    body[2][0] = ""
    body[5][1] = "999999"
    body[7][2] = "yesterday"
    body[9][1] = ""
    return _write(tmp_path / "log.csv", header, body)


def test_bad_rows_are_counted_and_left_out(files, imported, tmp_path):
    report = _import(files, tmp_path / "d", interactions=_damaged_log(files, tmp_path))
    bad = report["bad_rows"]
    assert bad["total"] == 4 and report["interactions"] == report["interaction_rows"] - 4
    assert bad["by_reason"]["interactions"] == {"null user id": 1, "unknown item id": 1, "unparseable time": 1,
                                                "null item id": 1}
    assert bad["first"] == {"file": str(tmp_path / "log.csv"), "row": 2, "column": "user_id", "reason": "null user id",
                            "value": None}
    load_dataset(str(tmp_path / "d"))


def test_strict_fails_on_the_first_bad_row(files, tmp_path):
    with pytest.raises(ValueError) as info:
        _import(files, tmp_path / "d", interactions=_damaged_log(files, tmp_path), strict=True)
    assert str(info.value).startswith(f"{tmp_path / 'log.csv'}: row 2, column 'user_id': null user id (4 bad rows")
    assert os.listdir(tmp_path) == ["log.csv"]  # nothing written


def _malformed(files, tmp_path, case):
    """ImportConfig kwargs for one malformed input, and the words its error must hold."""
    items, log = os.path.join(files, "items.csv"), os.path.join(files, "interactions.csv")
    if case == "missing image":
        images = tmp_path / "images"
        shutil.copytree(os.path.join(files, "images"), images)
        with open(items) as f:
            row, victim = next((k, r["item_id"]) for k, r in enumerate(csv.DictReader(f)) if k == 4)
        os.remove(images / f"{victim}.jpg")
        return {"images": str(images)}, [items, f"row {row}", "column 'item_id'", str(images / f"{victim}.jpg"),
                                         "does not exist"]
    if case == "unknown item":
        with open(log) as f:
            rows = list(csv.reader(f))
        rows[1 + 6][1] = "424242"
        path = _write(tmp_path / "log.csv", rows[0], rows[1:])
        return {"interactions": path, "strict": True}, [path, "row 6", "column 'item_id'", "unknown item id", "424242"]
    if case == "empty file":
        path = tmp_path / "log.csv"
        path.write_text("")
        return {"interactions": str(path)}, [str(path), "empty"]
    if case == "header only":
        path = _write(tmp_path / "items.csv", ["item_id", "category", "title"], [])
        return {"items": path}, [path, "no data rows"]
    if case == "wrong column":
        return {"time_col": "time"}, [log, "header row", "column 'time'", "user_id, item_id, timestamp"]
    if case == "wrong items column":
        return {"title_col": "name"}, [items, "header row", "column 'name'"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing image", "unknown item", "empty file", "header only", "wrong column",
                                  "wrong items column"])
def test_malformed_input_is_one_clear_error_and_nothing_is_written(files, tmp_path, capsys, case):
    kwargs, words = _malformed(files, tmp_path, case)
    out = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        _import(files, out, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert sorted(os.listdir(tmp_path)) == before  # no --out, no temporary directory
    argv = ["import", "--interactions", kwargs.get("interactions", os.path.join(files, "interactions.csv")),
            "--items", kwargs.get("items", os.path.join(files, "items.csv")),
            "--images", kwargs.get("images", os.path.join(files, "images")), "--out", str(out), "--no-progress"]
    argv += ["--strict"] if kwargs.get("strict") else []
    argv += ["--time-col", kwargs["time_col"]] if "time_col" in kwargs else []
    argv += ["--title-col", kwargs["title_col"]] if "title_col" in kwargs else []
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("courier-fast import: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert words[0] in err and not out.exists()


def test_out_must_be_new_or_empty(files, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        _import(files, tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    assert _import(files, tmp_path / "empty")["items"] == CONFIG.items


def test_missing_images_can_be_skipped(files, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(os.path.join(files, "images"), images)
    gone = pacsv.read_csv(os.path.join(files, "items.csv")).column("item_id").to_pylist()[:5]
    for i in gone:
        os.remove(images / f"{i}.jpg")
    report = _import(files, tmp_path / "d", images=str(images), on_missing_image="skip", strict=True)
    assert report["missing_images"] == 5 and report["items"] == CONFIG.items - 5
    skipped = report["bad_rows"]["by_reason"]["interactions"]["item without an image file (skipped)"]
    assert skipped == sum(i in gone for _, i, _ in _log(files)) and report["bad_rows"]["total"] == 0
    data = load_dataset(str(tmp_path / "d"))
    assert not set(gone) & {i for t in ("pretrain", "ctr_train", "ctr_test") for r in data[t].to_pylist()
                            for i in r["pv_items"] + r["history"]}


# ----------------------------------------------------------------------------- the whole chain, as a user runs it
def test_generate_files_import_train_embed_eval(tmp_path, capsys):
    world = str(tmp_path / "world")
    cfg = ["--items", "60", "--users", "12", "--requests-per-user", "8", "--image-size", "16"]
    assert main(["generate", "--out", world, "--layout", "files", *cfg]) == 0
    hint = capsys.readouterr().out
    cuts = hint.split("--split-times ")[1].split()[0]
    data = str(tmp_path / "data")
    assert main(["import", "--interactions", f"{world}/interactions.csv", "--items", f"{world}/items.csv",
                 "--images", f"{world}/images", "--out", data, "--split-times", cuts, "--no-progress"]) == 0
    assert "cold items in ctr_test" in capsys.readouterr().out
    run = str(tmp_path / "run")
    assert main(["train", "--data", data, "--out", run, "--encoder", "test_efficientnet", "--embed-dim", "16",
                 "--batch-size", "8", "--steps", "2", "--no-progress"]) == 0
    emb = str(tmp_path / "emb")
    assert main(["embed", "--checkpoint", f"{run}/checkpoint.pt", "--data", data, "--out", emb, "--clusters", "4",
                 "--chunk-size", "16", "--no-progress", "--simscore", "ctr_test"]) == 0
    assert main(["eval", "--data", data, "--embeddings", emb, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= metrics["auc"] <= 1 and metrics["test_rows"] > 0
    assert os.path.exists(os.path.join(emb, "simscore-ctr_test.parquet"))


def test_demo_runs_on_an_imported_directory(imported, tmp_path, monkeypatch):
    from courier_fast.pipeline import demo as demo_module

    tiny = {"encoder": "test_efficientnet", "image_size": None, "batch_size": 8, "max_images": 40, "lr": 1e-3,
            "warmup_steps": 1, "clusters": 4}
    monkeypatch.setitem(demo_module.PRESETS, True, tiny)
    out, _ = imported
    lines = []
    report = demo_module.demo(quick=True, data=out, workdir=str(tmp_path / "w"), progress=False, log=lines.append)
    assert list(report["results"]) == [m for m in demo_module.ORDER if m != "oracle_attributes"]  # no oracle.parquet
    assert report["data"] == os.path.abspath(out)
    assert os.path.exists(tmp_path / "w" / "results.json") and os.path.exists(tmp_path / "w" / "results.png")
    assert not os.path.exists(tmp_path / "w" / "world")  # nothing generated
    assert any("courier - best generic baseline" in line for line in lines)
