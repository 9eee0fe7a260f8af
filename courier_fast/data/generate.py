"""A generated visual-CTR world in the on-disk format (`courier-fast generate`).

Items are rendered JPEGs. Their *category* is the object's shape (a shape family with per-item
size/aspect variation); their *visual attributes* (hue, a pattern in a second colour: plain,
stripes, dots, checks or gradient, with a frequency and an orientation) are drawn independently
of category and id. Nuisances (background grey, small shifts, pixel noise) never affect clicks.
Titles name the category plus filler words: text knows the category, not the look.

Users have a category taste and 2-3 visual interest modes; each mode covers a group of
categories and has its own hue centre, pickiness, pattern and frequency taste (red dresses,
blue shoes), so which history items matter depends on the shown item. A click is Bernoulli of
sigmoid(category taste + visual affinity + non-visual item quality + bias), the bias set for a
CTR near 10 %. Page views show 10 items, half drawn by category taste, half at random. History
= the user's earlier clicks (oldest -> newest). ctr_test pages show only cold items, which never
appear in pretrain or ctr_train. oracle.parquet holds the true attributes (for a ceiling only).
Deterministic per seed.

layout="files" writes the same world the way public datasets ship (no impressions, no session
tables): images/<item_id>.jpg, items.csv (item_id, category, title) and interactions.csv
(user_id, item_id, timestamp: one row per click, warm-up clicks included; request r of a user
happens on day r after 2024-01-01, at a seeded second of that day), for `courier-fast import`.
"""
import datetime
import io
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from courier_fast.data.format import ITEM_SCHEMA, SESSION_SCHEMA, write_table

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon")
PATTERNS = ("plain", "stripes", "dots", "checks", "gradient")
LAYOUTS = ("parquet", "files")
EPOCH = datetime.datetime(2024, 1, 1)  # day 0 of the files layout's timestamps
FILLER = ("new", "classic", "style", "premium", "daily", "soft", "light", "basic", "season", "sale")


@dataclass
class WorldConfig:
    items: int = 3000
    users: int = 1500
    requests_per_user: int = 16
    image_size: int = 64
    page_size: int = 10
    history_len: int = 5
    cold_fraction: float = 0.2
    target_ctr: float = 0.10

    @classmethod
    def quick(cls):
        return cls(items=600, users=500, requests_per_user=12, image_size=32)


def _hsv_to_rgb(h, s, v):
    i = np.floor(h * 6) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.array(table[int(i)])


def _shape_mask(shape, x, y, size, aspect):
    """Boolean mask of a centred shape in coordinates x, y in [-1, 1]."""
    x, y = x / (size * aspect), y / (size / aspect)
    r = np.sqrt(x * x + y * y)
    ang = np.arctan2(y, x)
    if shape == "circle":
        return r <= 1
    if shape == "square":
        return (np.abs(x) <= 0.85) & (np.abs(y) <= 0.85)
    if shape == "triangle":
        return (y >= -0.8) & (np.abs(x) <= (0.8 - y) * 0.6)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1
    if shape == "cross":
        return ((np.abs(x) <= 0.3) & (np.abs(y) <= 0.95)) | ((np.abs(y) <= 0.3) & (np.abs(x) <= 0.95))
    if shape == "ring":
        return (r <= 1) & (r >= 0.55)
    if shape == "star":
        return r <= 0.55 + 0.4 * np.cos(5 * ang) ** 2
    return np.maximum(np.abs(x) * 0.866 + np.abs(y) * 0.5, np.abs(y)) <= 0.9  # hexagon


def render(attrs, size, rng):
    """One item image (H, W, 3) uint8 from its attribute dict."""
    lin = np.linspace(-1, 1, size)
    x, y = np.meshgrid(lin, lin)
    x, y = x - attrs["shift_x"], y - attrs["shift_y"]
    mask = _shape_mask(SHAPES[attrs["category"] % len(SHAPES)], x, y, attrs["scale"], attrs["aspect"])
    c1 = _hsv_to_rgb(attrs["hue"], 0.85, 0.9)
    c2 = _hsv_to_rgb(attrs["hue2"], 0.6, 0.35 + 0.6 * (attrs["hue2"] > 0.5))
    theta, freq = attrs["orientation"], attrs["frequency"]
    u = (x * np.cos(theta) + y * np.sin(theta)) * freq * np.pi
    v = (-x * np.sin(theta) + y * np.cos(theta)) * freq * np.pi
    pattern = PATTERNS[attrs["pattern"]]
    if pattern == "plain":
        w = np.zeros_like(x)
    elif pattern == "stripes":
        w = (np.sin(u) > 0).astype(float)
    elif pattern == "dots":
        w = ((np.sin(u) * np.sin(v)) > 0.5).astype(float)
    elif pattern == "checks":
        w = ((np.sin(u) * np.sin(v)) > 0).astype(float)
    else:  # gradient along the orientation
        w = np.clip((u / (freq * np.pi) + 1) / 2, 0, 1)
    fill = c1[None, None, :] * (1 - w[..., None]) + c2[None, None, :] * w[..., None]
    img = np.full((size, size, 3), attrs["background"])
    img[mask] = fill[mask]
    img = img * 255 + rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _items(cfg, rng):
    n = cfg.items
    cat = rng.integers(0, len(SHAPES), n)
    attrs = {
        "item_id": np.arange(1, n + 1, dtype=np.int64) * 7 + 1000,  # ids are not positions
        "category": cat,
        "hue": rng.random(n), "hue2": rng.random(n),
        "pattern": rng.integers(0, len(PATTERNS), n),
        "frequency": rng.uniform(1.5, 5.0, n), "orientation": rng.uniform(0, np.pi, n),
        "scale": rng.uniform(0.55, 0.8, n), "aspect": rng.uniform(0.85, 1.2, n),
        "background": rng.uniform(0.3, 0.8, n),
        "shift_x": rng.uniform(-0.1, 0.1, n), "shift_y": rng.uniform(-0.1, 0.1, n),
        "quality": rng.normal(0, 1, n),
        "cold": rng.random(n) < cfg.cold_fraction,
    }
    return attrs


def _users(cfg, rng, n_cat):
    users = []
    for _ in range(cfg.users):
        taste = rng.dirichlet(np.full(n_cat, 0.6))
        n_modes = int(rng.integers(2, 4))
        groups = np.array_split(rng.permutation(n_cat), n_modes)
        modes = [{"cats": set(g.tolist()), "hue": rng.random(), "kappa": rng.uniform(3.5, 6.0),
                  "pattern": int(rng.integers(0, len(PATTERNS))), "high_freq": bool(rng.random() < 0.5)}
                 for g in groups]
        users.append({"taste": taste, "modes": modes})
    return users


def _affinity(user, it, cfg_items):
    """Category taste + visual affinity + quality (without the global bias), vectorised over items."""
    cat = cfg_items["category"][it]
    score = np.log(user["taste"][cat] * len(user["taste"]) + 1e-3) * 0.8
    for m in user["modes"]:
        inside = np.isin(cat, list(m["cats"]))
        hue = np.cos(2 * np.pi * (cfg_items["hue"][it] - m["hue"]))
        pat = (cfg_items["pattern"][it] == m["pattern"]).astype(float)
        freq = (cfg_items["frequency"][it] > 3.25) == m["high_freq"]
        score = score + inside * (m["kappa"] * hue + 1.5 * pat + 0.8 * freq - 1.0)
    return score + 0.5 * cfg_items["quality"][it]


def split_days(cfg):
    """(first ctr_train day, first ctr_test day) of the files layout: the native split in time."""
    return 3 + cfg.requests_per_user // 2, 3 + (cfg.requests_per_user * 3) // 4


def generate(out_dir, seed=0, quick=False, config=None, layout="parquet"):
    """Write the world into out_dir: items, pretrain/ctr_train/ctr_test and oracle parquet files
    (layout="parquet"), or images/, items.csv, interactions.csv and oracle.parquet ("files").
    -> rows per table ("parquet") or {"items", "interactions"} counts ("files")."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    cfg = config or (WorldConfig.quick() if quick else WorldConfig())
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    items = _items(cfg, rng)
    n_cat = len(SHAPES)
    users = _users(cfg, rng, n_cat)
    warm = np.flatnonzero(~items["cold"])
    cold = np.flatnonzero(items["cold"])
    by_cat = {(pool, c): idx[items["category"][idx] == c] for pool, idx in (("warm", warm), ("cold", cold))
              for c in range(n_cat)}

    def page(u, pool_name, pool):
        k = cfg.page_size // 2
        cats = rng.choice(n_cat, size=k, p=users[u]["taste"])
        by_taste = [rng.choice(by_cat[(pool_name, c)]) if len(by_cat[(pool_name, c)]) else rng.choice(pool) for c in cats]
        rest = rng.choice(pool, size=cfg.page_size - k, replace=False)
        return rng.permutation(np.array(by_taste + rest.tolist()))

    # the bias that gives the target CTR, found on sample pages by bisection
    sample = [(u, page(u, "warm", warm)) for u in rng.integers(0, cfg.users, 300)]
    scores = np.concatenate([_affinity(users[u], p, items) for u, p in sample])
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 / (1 + np.exp(-(scores + mid)))).mean() < cfg.target_ctr else (lo, mid)
    bias = (lo + hi) / 2

    tables = {"pretrain": [], "ctr_train": [], "ctr_test": []}
    clicks_log = []  # (user, request index, item position) of every click, warm-up included
    n_req = cfg.requests_per_user
    train_day, test_day = split_days(cfg)
    for u in range(cfg.users):
        history = []
        for r in range(n_req + 3):  # 3 unrecorded warm-up requests seed the history
            split = ("warmup" if r < 3 else "pretrain" if r < train_day
                     else "ctr_train" if r < test_day else "ctr_test")
            pool_name, pool = ("cold", cold) if split == "ctr_test" else ("warm", warm)
            pv = page(u, pool_name, pool)
            prob = 1 / (1 + np.exp(-(_affinity(users[u], pv, items) + bias)))
            clicks = (rng.random(len(pv)) < prob).astype(np.int8)
            clicks_log.extend((u, r, int(i)) for i in pv[clicks == 1])
            if split != "warmup":
                tables[split].append((u, [int(items["item_id"][i]) for i in history[-cfg.history_len:]],
                                      [int(items["item_id"][i]) for i in pv], clicks.tolist()))
            if split != "ctr_test":  # cold items never enter a history
                history.extend(pv[clicks == 1].tolist())

    from PIL import Image

    images = []
    for i in range(cfg.items):
        attrs = {k: v[i] for k, v in items.items()}
        buf = io.BytesIO()
        Image.fromarray(render(attrs, cfg.image_size, rng)).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    titles = [f"{SHAPES[c]} " + " ".join(rng.choice(FILLER, 2)) for c in items["category"]]
    oracle = {k: v for k, v in items.items() if k not in ("scale", "aspect", "shift_x", "shift_y")}
    write_table(pa.table(oracle), os.path.join(out_dir, "oracle.parquet"))
    if layout == "files":
        return _write_files(out_dir, seed, cfg, items, images, titles, clicks_log)
    write_table(pa.table({"item_id": items["item_id"], "image": images, "category": items["category"].astype(np.int64),
                          "title": titles}, schema=ITEM_SCHEMA), os.path.join(out_dir, "items.parquet"))
    for name, rows in tables.items():
        write_table(pa.table({"user_id": [r[0] for r in rows], "history": [r[1] for r in rows],
                              "pv_items": [r[2] for r in rows], "clicks": [r[3] for r in rows]},
                             schema=SESSION_SCHEMA), os.path.join(out_dir, f"{name}.parquet"))
    return {name: len(rows) for name, rows in tables.items()}


def _write_csv(table, path):
    import pyarrow.csv as pacsv

    from courier_fast.data.format import atomic_path
    with atomic_path(path) as tmp:
        pacsv.write_csv(table, tmp, pacsv.WriteOptions(quoting_style="needed"))


def _write_files(out_dir, seed, cfg, items, images, titles, clicks_log):
    """The public-dataset layout of the world (see the module docstring)."""
    from courier_fast.data.format import atomic_path

    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    for item_id, data in zip(items["item_id"].tolist(), images):
        with atomic_path(os.path.join(out_dir, "images", f"{item_id}.jpg")) as tmp, open(tmp, "wb") as f:
            f.write(data)
    _write_csv(pa.table({"item_id": items["item_id"], "category": items["category"].astype(np.int64),
                         "title": titles}), os.path.join(out_dir, "items.csv"))
    # one second of each (user, request) day, from its own generator: the world's draws are untouched
    second = np.random.default_rng([seed, 1]).integers(0, 86400, size=(cfg.users, cfg.requests_per_user + 3))
    log = np.array(clicks_log, dtype=np.int64).reshape(-1, 3)
    seconds = log[:, 1] * 86400 + second[log[:, 0], log[:, 1]]
    order = np.lexsort((log[:, 0], seconds))
    stamps = [(EPOCH + datetime.timedelta(seconds=int(x))).isoformat() for x in seconds[order]]
    _write_csv(pa.table({"user_id": log[order, 0], "item_id": items["item_id"][log[order, 2]], "timestamp": stamps}),
               os.path.join(out_dir, "interactions.csv"))
    return {"items": cfg.items, "interactions": len(log)}
