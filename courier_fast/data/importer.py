"""`courier-fast import`: a public-dataset layout -> our format (format.py), out of core.

Input (the way H&M, MicroLens, PixelRec and Amazon Reviews ship):
    interactions  CSV / TSV / parquet / JSON lines, one row per interaction:
                  user id, item id, timestamp [, click 0/1] [, request id]
    items         one row per item: item id [, category] [, title] [, image path]
    images        a directory of image files, found by `image_pattern` (a Python format string
                  of the item id as written in the items file, a string: '{item_id}.jpg',
                  '{item_id:.3}/{item_id}.jpg' for H&M's images/010/0108775015.jpg) or by a
                  path column (relative to `images`, or absolute)

Output in `out` (written into a temporary sibling and renamed at the end: a failed import
leaves nothing there): items.parquet with image_path (relative to `out`), pretrain /
ctr_train / ctr_test.parquet (see import_sessions.py for the rows), categories.parquet
(category int -> its name in the file), item_ids.parquet / user_ids.parquet (int id -> the
file's id) when the file's ids are not integers, and import.json: counts, bad rows by reason
with the first example (file, row, column), the split times, the cold-item share of ctr_test,
seconds per stage.

Bad rows (a null id or time, a time that does not parse, a click that is not 0/1, an item id
the items file does not have, a duplicate item) are counted and left out, or with strict=True
the first one is a ValueError naming file, row and column. An image file that does not exist
is a ValueError (file, row, column, path) unless on_missing_image="skip". DuckDB does the work
in a database file inside the temporary directory, spilling to disk past `memory_limit`.
"""
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

import numpy as np

from courier_fast.data.import_sources import Source, one, sql_string
from courier_fast.data.import_sessions import SPLITS, build_sessions

DEFAULTS = {"click_col": "click", "request_col": "request_id", "category_col": "category", "title_col": "title",
            "image_col": "image_path"}
DEFAULT_PATTERN = "{item_id}.jpg"


@dataclass
class ImportConfig:
    interactions: str
    items: str
    images: str
    out: str
    # interaction columns (click / request: used when the file has them, or when named)
    user_col: str = "user_id"
    item_col: str = "item_id"
    time_col: str = "timestamp"
    click_col: str = None
    request_col: str = None
    # item columns (category / title / image path: used when the file has them, or when named)
    items_item_col: str = None       # default: item_col
    category_col: str = None
    title_col: str = None
    image_col: str = None
    image_pattern: str = None        # default '{item_id}.jpg' when the items have no path column
    # file formats
    interactions_format: str = None  # csv | tsv | parquet | jsonl (default: from the suffix)
    items_format: str = None
    delimiter: str = None            # CSV files' (default ',', and tab for .tsv)
    interactions_header: bool = True  # False: a CSV without a header row (columns column0, column1, ...)
    items_header: bool = True
    time_format: str = None          # strptime format; default: numbers, or ISO dates / datetimes
    # sessions (import_sessions.py)
    history_len: int = 5
    negatives: int = 4
    min_history: int = 1
    time_windows: int = 16
    split: tuple = (0.5, 0.25, 0.25)
    split_times: tuple = None        # (ctr_train start, ctr_test start), in the timestamps' format
    seed: int = 0
    # behaviour
    strict: bool = False
    on_missing_image: str = "raise"  # raise | skip
    progress: bool = True
    memory_limit: str = None         # DuckDB's, e.g. "4GB"
    threads: int = None

    def validate(self):
        for name in ("history_len", "time_windows"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("negatives", "min_history"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.min_history > self.history_len:
            raise ValueError(f"min_history ({self.min_history}) must be <= history_len ({self.history_len})")
        if len(self.split) != 3 or min(self.split) <= 0 or abs(sum(self.split) - 1) > 1e-6:
            raise ValueError(f"split must be three fractions > 0 summing to 1, got {self.split}")
        if self.split_times is not None and len(self.split_times) != 2:
            raise ValueError(f"split_times must be (ctr_train start, ctr_test start), got {self.split_times}")
        if self.on_missing_image not in ("raise", "skip"):
            raise ValueError(f"on_missing_image must be 'raise' or 'skip', got {self.on_missing_image!r}")
        if self.image_pattern is not None:
            _check_pattern(self.image_pattern)
        if not os.path.isdir(self.images):
            raise FileNotFoundError(f"images: {self.images} is not a directory")
        out = os.path.abspath(self.out)
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise ValueError(f"out: {self.out} exists and is not an empty directory")
        if not os.path.isdir(os.path.dirname(out)):
            raise FileNotFoundError(f"out: directory {os.path.dirname(out)} does not exist")


def _check_pattern(pattern):
    try:
        pattern.format(item_id="0108775015")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"image_pattern {pattern!r} must be a format string of {{item_id}} only ({exc})") from None


class _Stages:
    """A tqdm bar over the import's stages, and the seconds each took."""

    def __init__(self, names, progress):
        self.seconds, self._t = {}, time.perf_counter()
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=len(names), desc="import", unit="stage", dynamic_ncols=True)

    def start(self, name):
        self.name, self._t = name, time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(name)

    def done(self):
        self.seconds[self.name] = round(time.perf_counter() - self._t, 3)
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


STAGES = ("read items", "check images", "read interactions", "validate", "histories", "negatives", "split",
          "write")


def import_dataset(config):
    """Run the import described by `config` (an ImportConfig or a dict); -> the report dict
    (also written to <out>/import.json)."""
    import duckdb

    cfg = config if isinstance(config, ImportConfig) else ImportConfig(**config)
    cfg.validate()
    start = time.perf_counter()
    out = os.path.abspath(cfg.out)
    tmp = f"{out}.tmp-import-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    stages = _Stages(STAGES, cfg.progress)
    con = None
    try:
        con = duckdb.connect(os.path.join(tmp, "work.duckdb"))
        con.execute(f"SET temp_directory = {sql_string(os.path.join(tmp, 'spill'))}")
        con.execute("SET preserve_insertion_order = true")
        con.execute("SET enable_progress_bar = false")
        if cfg.memory_limit:
            con.execute(f"SET memory_limit = {sql_string(cfg.memory_limit)}")
        if cfg.threads:
            con.execute(f"SET threads = {int(cfg.threads)}")
        report = _run(con, cfg, out, tmp, stages)
        con.close()
        con = None
        for leftover in ("work.duckdb", "work.duckdb.wal", "spill"):
            path = os.path.join(tmp, leftover)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        report["seconds"] = {"total": round(time.perf_counter() - start, 3), **stages.seconds}
        with open(os.path.join(tmp, "import.json"), "w") as f:
            json.dump(report, f, indent=2)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked); replaced by the finished directory
        os.rename(tmp, out)
        return report
    finally:
        stages.close()
        if con is not None:
            con.close()
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- the stages
def _optional(cfg, have, field):
    """The column for an optional role: the named one (checked by Source.stage), else the
    default name when the file has it, else None."""
    named = getattr(cfg, field)
    if named is not None:
        return named
    return DEFAULTS[field] if DEFAULTS[field] in have else None


def _run(con, cfg, out, tmp, stages):
    items_src = Source(cfg.items, cfg.items_format, cfg.delimiter, cfg.items_header)
    inter_src = Source(cfg.interactions, cfg.interactions_format, cfg.delimiter, cfg.interactions_header)
    con.execute("CREATE TABLE bad (source VARCHAR, row BIGINT, col VARCHAR, reason VARCHAR, value VARCHAR)")

    stages.start("read items")
    have = items_src.columns(con)
    roles = {"item": cfg.items_item_col or cfg.item_col}
    for role, field in (("category", "category_col"), ("title", "title_col")):
        if _optional(cfg, have, field):
            roles[role] = _optional(cfg, have, field)
    image_col = None if cfg.image_pattern is not None else _optional(cfg, have, "image_col")
    if image_col:
        roles["path"] = image_col
    n_item_rows = items_src.stage(con, "items_raw", roles)
    int_items = _read_items(con, cfg, roles, items_src.path)
    stages.done()

    stages.start("check images")
    missing = _check_images(con, cfg, items_src.path, roles, image_col, out)
    stages.done()

    stages.start("read interactions")
    have = inter_src.columns(con)
    roles_i = {"user": cfg.user_col, "item": cfg.item_col, "time": cfg.time_col}
    click_col, request_col = _optional(cfg, have, "click_col"), _optional(cfg, have, "request_col")
    if request_col and not click_col:
        raise ValueError(f"{inter_src.path}: request ids ('{request_col}') need click labels; name the click "
                         f"column (--click-col)")
    if click_col:
        roles_i["click"] = click_col
    if request_col:
        roles_i["request"] = request_col
    n_inter_rows = inter_src.stage(con, "inter_raw", roles_i)
    stages.done()

    stages.start("validate")
    time_mode = _validate_interactions(con, cfg, roles_i, int_items, inter_src.path)
    bad = _bad_summary(con, {"items": items_src.path, "interactions": inter_src.path})
    if cfg.strict and bad["first"]:
        f = bad["first"]
        raise ValueError(f"{f['file']}: row {f['row']}, column '{f['column']}': {f['reason']}"
                         + (f" {f['value']!r}" if f["value"] is not None else "")
                         + f" ({bad['total']} bad rows; without --strict they are counted and left out)")
    n_good = one(con, "SELECT count(*) FROM inter")[0]
    if n_good == 0:
        raise ValueError(f"{inter_src.path}: no usable interaction ({bad['total']} bad rows: "
                         f"{bad['by_reason']}); check the column options")
    stages.done()

    sessions = build_sessions(con, cfg, impressions=bool(request_col), time_mode=time_mode, stages=stages,
                              time_sql=lambda x: _time_sql(x, time_mode, cfg.time_format))

    stages.start("write")
    _write_outputs(con, tmp, int_items)
    stages.done()
    return {"interactions_file": os.path.abspath(cfg.interactions), "items_file": os.path.abspath(cfg.items),
            "images": os.path.abspath(cfg.images),
            "columns": {"interactions": roles_i, "items": roles},
            "image_pattern": None if image_col else (cfg.image_pattern or DEFAULT_PATTERN),
            "impressions": bool(request_col), "time_mode": time_mode,
            "item_rows": n_item_rows, "items": one(con, "SELECT count(*) FROM item_paths")[0],
            "missing_images": missing, "interaction_rows": n_inter_rows, "interactions": n_good,
            "bad_rows": bad, **sessions,
            "options": {k: v for k, v in asdict(cfg).items() if k not in ("interactions", "items", "images", "out")}}


def _key_sql(column, integer):
    """The join key of an id column: its integer value when ids are integers, else the string."""
    return f"TRY_CAST(trim({column}) AS BIGINT)" if integer else column


def _all_integer(con, table, column):
    n, ints = one(con, f"SELECT count({column}), count(TRY_CAST(trim({column}) AS BIGINT)) FROM {table}")
    return n > 0 and n == ints


def _read_items(con, cfg, roles, path):
    """items table: row, src (the id as written), key, item_id BIGINT, category BIGINT, title,
    src_path; bad item rows recorded. -> whether item ids are integers."""
    integer = _all_integer(con, "items_raw", "item")
    key = _key_sql("item", integer)
    col = sql_string(roles["item"])
    con.execute(f"INSERT INTO bad SELECT 'items', row, {col}, 'null item id', NULL FROM items_raw WHERE item IS NULL")
    con.execute(f"""INSERT INTO bad SELECT 'items', row, {col}, 'duplicate item id', item FROM (
        SELECT row, item, row_number() OVER (PARTITION BY {key} ORDER BY row) AS n FROM items_raw WHERE item IS NOT NULL)
        WHERE n > 1""")
    cat = "category" if "category" in roles else "NULL"
    title = "coalesce(title, '')" if "title" in roles else "''"
    src_path = "path" if "path" in roles else "NULL"
    item_id = "key" if integer else "dense_rank() OVER (ORDER BY key)"
    con.execute(f"""CREATE TABLE items AS SELECT row, src, key, {item_id}::BIGINT AS item_id,
        (dense_rank() OVER (ORDER BY cat NULLS LAST) - 1)::BIGINT AS category, cat AS category_name, title, src_path
        FROM (SELECT row, item AS src, {key} AS key, {cat} AS cat, {title} AS title, {src_path} AS src_path
              FROM items_raw WHERE item IS NOT NULL
              QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY row) = 1)""")
    if one(con, "SELECT count(*) FROM items")[0] == 0:
        raise ValueError(f"{path}: no item with an id in column '{roles['item']}'")
    return integer


def _check_images(con, cfg, items_path, roles, image_col, out):
    """item_paths table (item_id, image_path relative to `out`) for the items whose image file
    exists; a missing one raises (file, row, column, path) unless on_missing_image='skip'.
    -> the number of items skipped for a missing image."""
    import pyarrow as pa

    from courier_fast.data.images import missing_files

    images = os.path.abspath(cfg.images)
    pattern = cfg.image_pattern or DEFAULT_PATTERN
    con.execute("CREATE TABLE item_paths (item_id BIGINT, image_path VARCHAR)")
    con.execute("CREATE TABLE item_missing (row BIGINT, item_id BIGINT, path VARCHAR)")
    total = one(con, "SELECT count(*) FROM items")[0]
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="check images", unit="item", dynamic_ncols=True, leave=False)
    reader = con.sql("SELECT row, item_id, src, src_path FROM items ORDER BY item_id").to_arrow_reader(65536)
    worker = con.cursor()  # inserts while the first cursor streams
    for batch in reader:
        rows, ids = batch.column("row").to_numpy(), batch.column("item_id").to_numpy()
        if image_col:
            rel = batch.column("src_path").to_pylist()
        else:
            rel = [pattern.format(item_id=s) for s in batch.column("src").to_pylist()]
        full = [None if p is None else p if os.path.isabs(p) else os.path.join(images, p) for p in rel]
        gone = np.array([p is None for p in full]) | missing_files([p or "" for p in full])
        keep = ~gone
        found = pa.table({"item_id": ids[keep], "image_path": [os.path.relpath(p, out) for p, k in zip(full, keep) if k]})
        lost = pa.table({"row": rows[gone], "item_id": ids[gone], "path": [str(p) for p, g in zip(full, gone) if g]})
        worker.register("found_batch", found)
        worker.register("lost_batch", lost)
        worker.execute("INSERT INTO item_paths SELECT * FROM found_batch")
        worker.execute("INSERT INTO item_missing SELECT * FROM lost_batch")
        worker.unregister("found_batch")
        worker.unregister("lost_batch")
        if bar is not None:
            bar.update(len(ids))
    if bar is not None:
        bar.close()
    n_missing, first_row = one(con, "SELECT count(*), min(row) FROM item_missing")
    if n_missing and cfg.on_missing_image == "raise":
        item_id, path = one(con, f"SELECT item_id, path FROM item_missing WHERE row = {first_row}")
        src = one(con, f"SELECT src FROM items WHERE row = {first_row}")[0]
        column = image_col or roles["item"]
        how = f"column '{image_col}'" if image_col else f"--image-pattern {pattern!r} in {images}"
        raise ValueError(f"{items_path}: row {first_row}, column '{column}': item {src}: image file {path} does not "
                         f"exist (from {how}; {n_missing} of {total} items have no image file; "
                         f"--on-missing-image skip leaves them out)")
    if one(con, "SELECT count(*) FROM item_paths")[0] == 0:
        raise ValueError(f"{items_path}: none of the {total} items has an image file under {images} "
                         f"(pattern {pattern!r}); check --images and --image-pattern")
    return int(n_missing)


def _time_sql(column, mode, time_format):
    """SQL turning a VARCHAR time into DOUBLE (seconds since 1970 for dates; the number itself
    for numeric times); NULL when it does not parse."""
    if mode == "format":
        return f"epoch(try_strptime(trim({column}), {sql_string(time_format)}))::DOUBLE"
    if mode == "numeric":
        return f"TRY_CAST(trim({column}) AS DOUBLE)"
    return f"epoch(TRY_CAST(trim({column}) AS TIMESTAMP))::DOUBLE"


SKIPPED_ITEM = "item without an image file (skipped)"


def _validate_interactions(con, cfg, roles, int_items, path):
    """inter table (row, user_id, item_id, t DOUBLE, click INT, req) of the good rows; the
    first problem of every other row goes to `bad`. -> the time mode (numeric | datetime | format)."""
    if cfg.time_format:
        mode = "format"
    else:
        n_num, n_dt = one(con, "SELECT count(TRY_CAST(trim(time) AS DOUBLE)), "
                                  "count(TRY_CAST(trim(time) AS TIMESTAMP)) FROM inter_raw")
        mode = "numeric" if n_num >= n_dt and n_num > 0 else "datetime"
    has_click, has_req = "click" in roles, "request" in roles
    con.execute(f"""CREATE TABLE inter_parsed AS SELECT row, user, item, time,
        {'click' if has_click else 'NULL'} AS click_raw, {'request' if has_req else 'NULL'} AS req,
        {_time_sql('time', mode, cfg.time_format)} AS t,
        {'TRY_CAST(trim(click) AS INTEGER)' if has_click else '1'} AS clk, {_key_sql('item', int_items)} AS key
        FROM inter_raw""")
    checks = [("p.user IS NULL", "user", "null user id", "NULL"), ("p.item IS NULL", "item", "null item id", "NULL"),
              ("p.time IS NULL", "time", "null time", "NULL"), ("p.t IS NULL", "time", "unparseable time", "p.time")]
    if has_click:
        checks += [("p.click_raw IS NULL", "click", "null click label", "NULL"),
                   ("p.clk IS NULL OR p.clk NOT IN (0, 1)", "click", "click label is not 0/1", "p.click_raw")]
    if has_req:
        checks.append(("p.req IS NULL", "request", "null request id", "NULL"))
    checks += [("ik.key IS NULL", "item", "unknown item id", "p.item"),
               ("it.item_id IS NULL", "item", SKIPPED_ITEM, "p.item")]

    def case(pick):
        return "CASE " + " ".join(f"WHEN {c[0]} THEN {pick(c)}" for c in checks) + " END"

    con.execute(f"""CREATE TABLE inter_checked AS SELECT p.row, p.user, p.t, p.clk, p.req, it.item_id,
        {case(lambda c: sql_string(c[2]))} AS reason, {case(lambda c: sql_string(roles[c[1]]))} AS col,
        {case(lambda c: c[3])} AS value
        FROM inter_parsed p
        LEFT JOIN (SELECT key FROM items) ik ON ik.key = p.key
        LEFT JOIN (SELECT key, item_id FROM items SEMI JOIN item_paths USING (item_id)) it ON it.key = p.key""")
    con.execute("INSERT INTO bad SELECT 'interactions', row, col, reason, value FROM inter_checked WHERE reason IS NOT NULL")
    integer = _all_integer(con, "(SELECT user FROM inter_checked WHERE reason IS NULL)", "user")
    user_id = "TRY_CAST(trim(user) AS BIGINT)" if integer else "dense_rank() OVER (ORDER BY user)"
    con.execute(f"""CREATE TABLE inter AS SELECT row, {user_id}::BIGINT AS user_id, user AS src_user, item_id, t,
        clk AS click, req FROM inter_checked WHERE reason IS NULL""")
    con.execute(f"CREATE TABLE user_ids_mapped AS SELECT {'false' if integer else 'true'} AS mapped")
    return mode


def _bad_summary(con, files):
    """{'total', 'by_reason': {source: {reason: count}}, 'first': the first bad row (file, row, column,
    reason, value) by file then row, skipped-image rows not counted as bad}."""
    rows = con.execute("SELECT source, reason, count(*) FROM bad GROUP BY ALL ORDER BY ALL").fetchall()
    by_reason = {}
    for source, reason, n in rows:
        by_reason.setdefault(source, {})[reason] = n
    first = one(con, f"""SELECT source, row, col, reason, value FROM bad WHERE reason != {sql_string(SKIPPED_ITEM)}
        ORDER BY source = 'interactions', row LIMIT 1""")
    total = sum(n for _, reason, n in rows if reason != SKIPPED_ITEM)
    return {"total": int(total), "by_reason": by_reason,
            "first": None if first is None else {"file": files[first[0]], "row": int(first[1]), "column": first[2],
                                                 "reason": first[3], "value": first[4]}}


def _write_outputs(con, tmp, int_items):
    """items.parquet, the three session tables (in time order) and the id / category mappings."""
    def copy(select, name):
        con.execute(f"COPY ({select}) TO {sql_string(os.path.join(tmp, name))} (FORMAT parquet)")

    for s, name in enumerate(SPLITS):
        copy(f"SELECT user_id, history, pv_items, clicks FROM sessions WHERE split = {s} ORDER BY t, key",
             f"{name}.parquet")

    copy("SELECT i.item_id, p.image_path, i.category, i.title FROM items i JOIN item_paths p USING (item_id) "
         "ORDER BY item_id", "items.parquet")
    copy("SELECT DISTINCT category, coalesce(category_name, '') AS name FROM items ORDER BY category",
         "categories.parquet")
    if not int_items:
        copy("SELECT item_id, src AS source_id FROM items ORDER BY item_id", "item_ids.parquet")
    if one(con, "SELECT mapped FROM user_ids_mapped")[0]:
        copy("SELECT DISTINCT user_id, src_user AS source_id FROM inter ORDER BY user_id", "user_ids.parquet")
