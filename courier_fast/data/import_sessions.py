"""Session rows from a validated interaction log, in DuckDB SQL (out of core).

Input: the table `inter` (row, user_id, item_id, t DOUBLE, click INT, req) of importer.py.
Positives are the rows with click = 1 (every row when the log has no click column).

* A request is a `req` group (the log has impressions: pv_items / clicks are the group's rows
  in file order, its time the earliest) or else one positive interaction.
* history = the user's last `history_len` positives strictly before the request's time
  (oldest -> newest); requests with fewer than `min_history` are left out.
* Split by request time: before the first cut -> pretrain, before the second -> ctr_train,
  else ctr_test. The cuts are `split_times`, or the quantiles of `split` over request times.
* Without impressions, pv_items = the positive plus `negatives` items drawn from the items with
  positives in the same time window (`time_windows` equal-count windows per split, so no draw
  crosses a split), with probability proportional to their positives there, never one of the
  user's positives (any time), without repeats; the positive sits at a drawn position.
  Draws come from hash(seed, request, draw): the same seed and DuckDB version give the same
  tables. A window with too few items gives a row fewer negatives (counted).

Leaves the table `sessions` (split 0/1/2, t, key, user_id, history BIGINT[], pv_items BIGINT[],
clicks TINYINT[]) and returns the report's counts: rows per table, the split times, rows short
of negatives, and the cold-item share of ctr_test (items shown there that no pretrain /
ctr_train row shows or has in its history).
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
    short = 0
    if not impressions:
        short = _negatives(con, cfg, split_sql)
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
    cold = _cold_share(con)
    stages.done()
    return {"requests": int(n_req), "rows": {SPLITS[s]: int(counts[s]) for s in range(3)},
            "dropped_short_history": int(n_req - n_rows), "split_times": [_show_time(c, time_mode) for c in cuts],
            "rows_short_of_negatives": int(short), "cold_items_ctr_test": cold}


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


def _negatives(con, cfg, split_sql):
    """req_negs (key, negs BIGINT[], at INT: the positive's position); -> rows short of negatives."""
    W, K, seed = int(cfg.time_windows), int(cfg.negatives), int(cfg.seed)
    # equal-count windows inside each split, from the quantiles of that split's positives
    con.execute(f"CREATE TABLE pos_split AS SELECT *, {split_sql} AS split FROM pos")
    fractions = ", ".join(repr(k / W) for k in range(1, W))
    con.execute("CREATE TABLE bounds_all (split INTEGER, lo DOUBLE, w INTEGER)")
    for s in range(3):
        con.execute(f"INSERT INTO bounds_all VALUES ({s}, '-infinity'::DOUBLE, {s * W})")
        if W > 1:
            con.execute(f"""INSERT INTO bounds_all SELECT {s}, b, {s * W} + k::INTEGER FROM (
                SELECT unnest(q) AS b, unnest(range(1, {W})) AS k
                FROM (SELECT quantile_disc(t, [{fractions}]) AS q FROM pos_split WHERE split = {s})) WHERE b IS NOT NULL""")
    # one window per boundary time, so that equal times always land in the same window
    con.execute("CREATE TABLE bounds AS SELECT split, lo, max(w) AS w FROM bounds_all GROUP BY split, lo")
    con.execute("""CREATE TABLE pos_w AS SELECT p.user_id, p.item_id, b.w FROM pos_split p
        ASOF JOIN bounds b ON p.split = b.split AND p.t >= b.lo""")
    # a uniform draw among a window's positive events picks an item with probability proportional
    # to its positives there: number the events per window (in item order: the item at each
    # number is then fixed) and join the drawn numbers to them (an equi-join, not a range join)
    con.execute("""CREATE TABLE pos_num AS SELECT w, (row_number() OVER (PARTITION BY w ORDER BY item_id) - 1) AS idx,
        item_id FROM pos_w""")
    con.execute("CREATE TABLE window_n AS SELECT w, count(*) AS n FROM pos_w GROUP BY w")
    con.execute("""CREATE TABLE req_w AS SELECT r.key, r.user_id, b.w FROM req_rows r
        ASOF JOIN bounds b ON r.split = b.split AND r.t >= b.lo""")
    con.execute("CREATE TABLE user_pos AS SELECT DISTINCT user_id, item_id FROM pos")
    draws = 2 * K + 8 if K else 0  # popular items repeat and the user's own positives are rejected: oversample
    # the earliest draw of each item that is not one of the user's positives survives; the first K are kept
    con.execute(f"""CREATE TABLE req_negs AS SELECT r.key, coalesce(n.negs, []::BIGINT[]) AS negs,
        (hash({seed}, r.key, -1) % (len(coalesce(n.negs, []::BIGINT[])) + 1)::UBIGINT)::INTEGER AS at
        FROM req_rows r LEFT JOIN (
            SELECT key, arg_min(item_id, j, {max(K, 1)}) AS negs FROM (
                SELECT c.key, c.item_id, min(c.j) AS j FROM (
                    SELECT d.key, d.user_id, d.j, p.item_id FROM (
                        SELECT r.key, r.user_id, r.w, d.j, (hash({seed}, r.key, d.j) % wn.n::UBIGINT)::BIGINT AS idx
                        FROM req_w r JOIN window_n wn USING (w), range({draws}) d(j)
                    ) d JOIN pos_num p ON p.w = d.w AND p.idx = d.idx
                ) c ANTI JOIN user_pos USING (user_id, item_id)
                GROUP BY c.key, c.item_id)
            GROUP BY key) n USING (key)""")
    return one(con, f"SELECT count(*) FROM req_negs WHERE len(negs) < {K}")[0]


def _cold_share(con):
    """{'slots': share of ctr_test's shown slots whose item is cold, 'items': share of its distinct
    shown items that are cold}; cold = in no pretrain / ctr_train row (shown or in history)."""
    slots, cold_slots, items, cold_items = one(con, """
        WITH seen AS (SELECT DISTINCT unnest(pv_items) AS item_id FROM sessions WHERE split < 2
                      UNION SELECT DISTINCT unnest(history) FROM sessions WHERE split < 2),
             shown AS (SELECT unnest(pv_items) AS item_id FROM sessions WHERE split = 2)
        SELECT count(*), count(*) FILTER (s.item_id IS NULL), count(DISTINCT t.item_id),
               count(DISTINCT t.item_id) FILTER (s.item_id IS NULL)
        FROM shown t LEFT JOIN seen s USING (item_id)""")
    return {"slots": cold_slots / slots if slots else 0.0, "items": cold_items / items if items else 0.0,
            "cold_items": int(cold_items), "shown_items": int(items)}
