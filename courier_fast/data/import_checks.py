"""Validation for `courier-fast import` (importer.py), in DuckDB: ids, image files, times, labels.

Every problem is a row of the table `bad` (source 'items' | 'interactions', row, col, reason,
value), with the 0-based data row of the input file (import_sources.py), so that a report or a
--strict error can name file, row and column. Ids are integers when every id of the column
parses as one (the integer is then the id; H&M's '0108775015' -> 108775015), else strings
mapped to dense integers. Times are numbers (any unit), ISO dates / datetimes (-> seconds since
1970) or parsed with a strptime format.
"""
import os

import numpy as np

from courier_fast.data.import_sources import one, sql_string

DEFAULT_PATTERN = "{item_id}.jpg"


def _key_sql(column, integer):
    """The join key of an id column: its integer value when ids are integers, else the string."""
    return f"TRY_CAST(trim({column}) AS BIGINT)" if integer else column


def _all_integer(con, table, column):
    n, ints = one(con, f"SELECT count({column}), count(TRY_CAST(trim({column}) AS BIGINT)) FROM {table}")
    return n > 0 and n == ints


def read_items(con, cfg, roles, path):
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


def check_images(con, cfg, items_path, roles, image_col, out):
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


def time_sql(column, mode, time_format):
    """SQL turning a VARCHAR time into DOUBLE (seconds since 1970 for dates; the number itself
    for numeric times); NULL when it does not parse."""
    if mode == "format":
        return f"epoch(try_strptime(trim({column}), {sql_string(time_format)}))::DOUBLE"
    if mode == "numeric":
        return f"TRY_CAST(trim({column}) AS DOUBLE)"
    return f"epoch(TRY_CAST(trim({column}) AS TIMESTAMP))::DOUBLE"


SKIPPED_ITEM = "item without an image file (skipped)"


def validate_interactions(con, cfg, roles, int_items, path):
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
        {time_sql('time', mode, cfg.time_format)} AS t,
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


def bad_summary(con, files):
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
