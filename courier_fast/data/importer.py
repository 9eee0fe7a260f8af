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
with the first example (file, row, column), the split times, the negative-sampling rule (as of
each request: import_sessions.py) and its pool sizes, the cold-item share of ctr_test (items first
seen at or after the ctr_test cut), seconds per stage.

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

from courier_fast.data.import_checks import (DEFAULT_PATTERN, bad_summary, check_images, read_items,
                                             time_sql, validate_interactions)
from courier_fast.data.import_sessions import SPLITS, build_sessions
from courier_fast.data.import_sources import Source, one, sql_string

DEFAULTS = {"click_col": "click", "request_col": "request_id", "category_col": "category", "title_col": "title",
            "image_col": "image_path"}


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
    int_items = read_items(con, cfg, roles, items_src.path)
    stages.done()

    stages.start("check images")
    missing = check_images(con, cfg, items_src.path, roles, image_col, out)
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
    time_mode = validate_interactions(con, cfg, roles_i, int_items, inter_src.path)
    bad = bad_summary(con, {"items": items_src.path, "interactions": inter_src.path})
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
                              time_sql=lambda x: time_sql(x, time_mode, cfg.time_format))

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
