"""Session rows from a validated interaction log, in DuckDB SQL (out of core).

Input: the table `inter` (row, user_id, item_id, t DOUBLE, click INT, req) of importer.py.
Positives are the rows with click = 1 (every row when the log has no click column).

* A request is a `req` group (the log has impressions: pv_items / clicks are the group's rows
  in file order, its time the earliest) or else one positive interaction.
* history = the user's last `history_len` positives strictly before the request's time
  (oldest -> newest); requests with fewer than `min_history` are left out.
* Split by request time: before the first cut -> pretrain, before the second -> ctr_train,
  else ctr_test. The cuts are `split_times`, or the quantiles of `split` over request times.
* Without impressions, pv_items = the positive plus `negatives` items sampled as of the request
  (NEGATIVE_RULE): uniform draws among the positive events of the request's split strictly
  before its time, the newest ceil(n_split / time_windows) of them (a trailing window: an item
  is drawn with probability proportional to its positives there, so every drawn item was first
  seen before the request and no draw crosses a split); an item the user had a positive for at
  or before the request time is rejected (the user's later positives are legitimate negatives:
  not clicked then); no repeats; the positive sits at a drawn position. Draws come from
  hash(seed, request, draw): the same seed and DuckDB version give the same tables. A request
  with too few earlier items (the first ones of each split) gets fewer negatives (counted).

Leaves the table `sessions` (split 0/1/2, t, key, user_id, history BIGINT[], pv_items BIGINT[],
clicks TINYINT[]) and returns the report's counts: rows per table, the split times, the
negative-sampling rule and its pool sizes, rows short of negatives, and the cold-item share of
ctr_test (cold = first seen at or after the ctr_test cut: the item's earliest usable log row,
shown or clicked, is not before it).
"""
from courier_fast.data.import_sources import one, sql_string

SPLITS = ("pretrain", "ctr_train", "ctr_test")


def build_sessions(con, cfg, impressions, time_mode, stages, time_sql):
    """Build `sessions` from `inter` (see the module docstring); -> report dict."""
    H = int(cfg.history_len)
    stages.start("histories")
    con.execute("CREATE TABLE pos AS SELECT row, user_id, item_id, t FROM inter WHERE click = 1")
    if one(con, "SELECT count(*) FROM pos")[0] == 0:
        raise ValueError(f"{cfg.interactions}: no positive interaction (click = 1) among the usable rows")
    if impressions:
        con.execute("""CREATE TABLE req AS SELECT min(row) AS key, user_id, min(t) AS t,
            list(item_id ORDER BY row) AS pv_items, list(click ORDER BY row)::TINYINT[] AS clicks
            FROM inter GROUP BY user_id, req""")
    else:
        con.execute("CREATE TABLE req AS SELECT row AS key, user_id, t, item_id FROM pos")
    # positives numbered per user in time order; `last` = the newest H up to and including each
    con.execute(f"""CREATE TABLE phist AS SELECT user_id, t, pidx, max(pidx) OVER (PARTITION BY user_id, t) AS gmax,
        list(item_id ORDER BY pidx) OVER (PARTITION BY user_id ORDER BY pidx
                                          ROWS BETWEEN {H - 1} PRECEDING AND CURRENT ROW) AS last
        FROM (SELECT *, row_number() OVER (PARTITION BY user_id ORDER BY t, row) AS pidx FROM pos)""")
    # the number of the user's positives strictly before each request: the latest earlier time's gmax
    con.execute("""CREATE TABLE req_cp AS SELECT r.key, r.user_id, coalesce(p.gmax, 0) AS cp
        FROM req r ASOF LEFT JOIN (SELECT user_id, t, gmax FROM phist) p ON r.user_id = p.user_id AND r.t > p.t""")
    con.execute(f"""CREATE TABLE req_hist AS SELECT c.key, coalesce(p.last, []::BIGINT[]) AS history
        FROM req_cp c LEFT JOIN phist p ON p.user_id = c.user_id AND p.pidx = c.cp
        WHERE least(c.cp, {H}) >= {int(cfg.min_history)}""")
    n_req = one(con, "SELECT count(*) FROM req")[0]
    n_rows = one(con, "SELECT count(*) FROM req_hist")[0]
    if n_rows == 0:
        raise ValueError(f"{cfg.interactions}: no request has {cfg.min_history} earlier positive(s) of its user "
                         f"(min_history); {n_req} requests")
    stages.done()

    stages.start("negatives")
    cuts = _cuts(con, cfg, time_mode, time_sql)
    split_sql = f"(CASE WHEN t < {cuts[0]!r} THEN 0 WHEN t < {cuts[1]!r} THEN 1 ELSE 2 END)"
    con.execute(f"CREATE TABLE req_rows AS SELECT r.*, h.history, {split_sql} AS split FROM req r JOIN req_hist h USING (key)")
    short, sampling = 0, {"rule": "impressions: each request's rows as logged (nothing sampled)"}
    if not impressions:
        short, pool_events = _negatives(con, cfg, split_sql)
        sampling = {"rule": NEGATIVE_RULE, "negatives": int(cfg.negatives), "time_windows": int(cfg.time_windows),
                    "pool_events": pool_events, "seed": int(cfg.seed)}
    stages.done()

    stages.start("split")
    if impressions:
        con.execute("""CREATE TABLE sessions AS SELECT split, t, key, user_id, history, pv_items, clicks FROM req_rows""")
    else:
        con.execute("""CREATE TABLE sessions AS SELECT r.split, r.t, r.key, r.user_id, r.history,
            list_concat(n.negs[1:n.at], [r.item_id], n.negs[n.at + 1:]) AS pv_items,
            list_transform(range(len(n.negs) + 1), lambda x: (x = n.at)::TINYINT) AS clicks
            FROM req_rows r JOIN req_negs n USING (key)""")
    counts = dict(con.execute("SELECT split, count(*) FROM sessions GROUP BY split").fetchall())
    empty = [SPLITS[s] for s in range(3) if not counts.get(s)]
    if empty:
        raise ValueError(f"{cfg.interactions}: {', '.join(empty)} would be empty with split times {cuts} "
                         f"({n_rows} requests); move --split-times or change --split")
    cold = _cold_share(con, cuts[1])
    stages.done()
    return {"requests": int(n_req), "rows": {SPLITS[s]: int(counts[s]) for s in range(3)},
            "dropped_short_history": int(n_req - n_rows), "split_times": [_show_time(c, time_mode) for c in cuts],
            "negative_sampling": sampling, "rows_short_of_negatives": int(short), "cold_items_ctr_test": cold}


def _show_time(t, mode):
    """A cut as the user wrote times: a number, or an ISO datetime for dates."""
    if mode == "numeric":
        return t
    import datetime
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).replace(tzinfo=None).isoformat()


def _cuts(con, cfg, time_mode, time_sql):
    """(ctr_train start, ctr_test start) as DOUBLE times."""
    if cfg.split_times is not None:
        cuts = []
        for value in cfg.split_times:
            (t,) = one(con, f"SELECT {time_sql(sql_string(value))}")
            if t is None:
                raise ValueError(f"split_times: {value!r} does not parse like the interactions' times ({time_mode})")
            cuts.append(float(t))
        if cuts[0] > cuts[1]:
            raise ValueError(f"split_times: {cfg.split_times[0]!r} must not be after {cfg.split_times[1]!r}")
        return tuple(cuts)
    f0, f1 = cfg.split[0], cfg.split[0] + cfg.split[1]
    q = one(con, f"SELECT quantile_disc(r.t, [{f0!r}, {f1!r}]) FROM req r SEMI JOIN req_hist h USING (key)")
    return tuple(float(x) for x in q[0])


NEGATIVE_RULE = ("as-of: uniform draws among the positive events of the request's split strictly before its "
                 "time, the newest ceil(events in the split / time_windows) of them (popularity-weighted, every "
                 "drawn item first seen before the request); the user's positives at or before the request "
                 "time rejected, later ones allowed; no repeats; seeded by hash(seed, request, draw)")


def _negatives(con, cfg, split_sql):
    """req_negs (key, negs BIGINT[], at INT: the positive's position); -> (rows short of negatives,
    {split name: pool size in events})."""
    W, K, seed = int(cfg.time_windows), int(cfg.negatives), int(cfg.seed)
    # the split's positive events numbered in time order (ties by file row): a uniform draw of a
    # number picks an item with probability proportional to its events in the numbered range,
    # and joining drawn numbers to the events is an equi-join, not a range join
    con.execute(f"""CREATE TABLE pool AS SELECT {split_sql} AS split, t, item_id,
        row_number() OVER (PARTITION BY {split_sql} ORDER BY t, row) AS n FROM pos""")
    # per split and distinct time: how many of the split's events are at or before it
    con.execute("CREATE TABLE pool_upto AS SELECT split, t, max(n) AS upto FROM pool GROUP BY split, t")
    con.execute(f"CREATE TABLE pool_size AS SELECT split, ceil(count(*) / {W})::BIGINT AS m FROM pool GROUP BY split")
    # each request's range of event numbers: the newest m events of its split strictly before its time
    con.execute("""CREATE TABLE req_pool AS SELECT a.key, a.user_id, a.t, a.split, greatest(a.before - s.m, 0) AS lo,
        a.before - greatest(a.before - s.m, 0) AS size
        FROM (SELECT r.key, r.user_id, r.t, r.split, coalesce(u.upto, 0) AS before
              FROM req_rows r ASOF LEFT JOIN pool_upto u ON r.split = u.split AND r.t > u.t) a
        JOIN pool_size s USING (split)""")
    # the time of each user's first positive of each item: rejected while it is <= the request's time
    con.execute("CREATE TABLE user_first AS SELECT user_id, item_id, min(t) AS t0 FROM pos GROUP BY user_id, item_id")
    draws = 2 * K + 8 if K else 0  # popular items repeat and the user's own positives are rejected: oversample
    # the earliest draw of each item that survives the rejection; the first K are kept
    con.execute(f"""CREATE TABLE req_negs AS SELECT r.key, coalesce(n.negs, []::BIGINT[]) AS negs,
        (hash({seed}, r.key, -1) % (len(coalesce(n.negs, []::BIGINT[])) + 1)::UBIGINT)::INTEGER AS at
        FROM req_rows r LEFT JOIN (
            SELECT key, arg_min(item_id, j, {max(K, 1)}) AS negs FROM (
                SELECT d.key, p.item_id, min(d.j) AS j FROM (
                    SELECT q.key, q.user_id, q.t, q.split, d.j,
                           q.lo + 1 + (hash({seed}, q.key, d.j) % q.size::UBIGINT)::BIGINT AS n
                    FROM req_pool q, range({draws}) d(j) WHERE q.size > 0
                ) d JOIN pool p ON p.split = d.split AND p.n = d.n
                LEFT JOIN user_first f ON f.user_id = d.user_id AND f.item_id = p.item_id
                WHERE f.t0 IS NULL OR f.t0 > d.t
                GROUP BY d.key, p.item_id)
            GROUP BY key) n USING (key)""")
    sizes = dict(con.execute("SELECT split, m FROM pool_size").fetchall())
    short = one(con, f"SELECT count(*) FROM req_negs WHERE len(negs) < {K}")[0]
    return short, {SPLITS[s]: int(sizes.get(s, 0)) for s in range(3)}


def _cold_share(con, ctr_test_start):
    """{'slots': share of ctr_test's shown slots whose item is cold, 'items': share of its distinct
    shown items that are cold, 'cold_items', 'shown_items'}; cold = first seen at or after the
    ctr_test cut (the item's earliest row of the usable log `inter`, shown or clicked, is not
    before it), whether or not that earlier row became a session row."""
    slots, cold_slots, items, cold_items = one(con, f"""
        WITH first AS (SELECT item_id, min(t) AS t0 FROM inter GROUP BY item_id),
             shown AS (SELECT unnest(pv_items) AS item_id FROM sessions WHERE split = 2)
        SELECT count(*), count(*) FILTER (f.t0 >= {ctr_test_start!r}), count(DISTINCT s.item_id),
               count(DISTINCT s.item_id) FILTER (f.t0 >= {ctr_test_start!r})
        FROM shown s JOIN first f USING (item_id)""")
    return {"slots": cold_slots / slots if slots else 0.0, "items": cold_items / items if items else 0.0,
            "cold_items": int(cold_items), "shown_items": int(items)}
