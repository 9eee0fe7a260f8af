"""`courier-fast demo`: the paper's thesis on the generated world, end to end.

Generates a world, pre-trains every method with the same encoder and image budget, embeds all
items, fits the same CTR model with each method's image features and prints cold-item AUC /
GAUC / logloss, a PNG bar chart and a JSON file:
    {"seed", "quick", "seconds", "results": {<method>: {"auc", "gauc", "logloss"}}}
Methods: no_image, random_encoder, category_supervised, simclr, clip_titles, courier (the
package's default configuration, TrainConfig()'s query="learned": the run courier_learned_query,
shown once, under this name, its query named in the table and in "courier_query" of the JSON),
courier_target_query, oracle_attributes (true attributes: the ceiling). Runs resume: a method
whose checkpoint is complete is not trained again. RUNS also holds runs the demo does not make
(courier_target_image: the paper's literal query), for bench/demo_seeds.py --runs.
feature_forms=True (`--feature-forms`) also evaluates each method's embeddings in each of the
paper's feature forms alone (vector, simscore, cluster; evaluate()'s `features`) and adds
    "feature_forms": {<method>: {<form>: {"auc", "gauc", "logloss"}}}
with "none" (= no_image) and "all" (= the main result) beside them, and "feature_forms_seconds"
(the extra fits' share of "seconds"); off by default (the extra fits cost time).
data=DIR runs on an existing data directory (e.g. one `courier-fast import` wrote) instead of
generating the world; oracle_attributes is reported only where DIR has the world's oracle.parquet.
"""
import dataclasses
import json
import os
import time

from courier_fast.data.format import atomic_path

GENERIC = ("random_encoder", "category_supervised", "simclr", "clip_titles")
PRETRAINED = GENERIC + ("courier_target_query", "courier_learned_query")
ORDER = ("no_image",) + GENERIC + ("courier", "courier_target_query", "oracle_attributes")
FORMS = ("vector", "simscore", "cluster")  # the paper's appendix: each form of the embedding on its own

# Shared by every method: the encoder, its input size, rows per step, optimiser and budget.
PRESETS = {
    True: {"encoder": "test_efficientnet", "image_size": None, "batch_size": 64, "max_images": 60_000,
           "lr": 1e-3, "warmup_steps": 20, "clusters": 32},
    False: {"encoder": "test_efficientnet", "image_size": 32, "batch_size": 64, "max_images": 400_000,
            "lr": 1e-3, "warmup_steps": 50, "clusters": 64},
}
# What each run trains: (TrainConfig.method, extra TrainConfig fields)
RUNS = {
    "random_encoder": ("random_encoder", {}),
    "category_supervised": ("category_supervised", {}),
    "simclr": ("simclr", {}),
    "clip_titles": ("clip_titles", {}),
    "courier_target_query": ("courier", {"query": "target"}),
    "courier_learned_query": ("courier", {"query": "learned"}),
    "courier_target_image": ("courier", {"query": "target_image"}),  # not in the demo
}
DEFAULT_COURIER = "courier_learned_query"  # TrainConfig's (and CourierModel's) default query
COURIER_QUERY = RUNS[DEFAULT_COURIER][1]["query"]


def label(method):
    """A method's name in the table: the default courier run names its query."""
    return f"courier ({COURIER_QUERY} query)" if method == "courier" else method


def _world(workdir, seed, quick):
    from courier_fast.data.generate import WorldConfig, generate

    root = os.path.join(workdir, "world")
    stamp = os.path.join(root, "world.json")
    want = {"seed": seed, "config": dataclasses.asdict(WorldConfig.quick() if quick else WorldConfig())}
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f) == want:
                return root
    generate(root, seed=seed, quick=quick)
    with atomic_path(stamp) as tmp, open(tmp, "w") as f:
        json.dump(want, f)
    return root


def run_method(name, world, workdir, seed, quick, progress=True):
    """Pre-train run `name` (RUNS) on `world` (resuming), embed every item; -> ItemEmbeddings."""
    from courier_fast.pipeline.embed import embed_checkpoint
    from courier_fast.training.loop import TrainConfig, train

    p = PRESETS[quick]
    method, extra = RUNS[name]
    out = os.path.join(workdir, "runs", name)
    cfg = TrainConfig(data=world, out=out, method=method, encoder=p["encoder"], image_size=p["image_size"],
                      batch_size=p["batch_size"], steps=10**9, max_images=p["max_images"], lr=p["lr"],
                      warmup_steps=p["warmup_steps"], seed=seed, resume=True, progress=progress,
                      checkpoint_every=100, **extra)
    train(cfg)
    return embed_checkpoint(os.path.join(out, "checkpoint.pt"), world, clusters=p["clusters"], seed=seed)


def demo(seed=0, quick=False, workdir=None, json_path=None, png_path=None, progress=True, log=print, data=None,
         feature_forms=False):
    """Run everything (on `data` when given, else on the generated world); returns the JSON dict
    (also written to json_path)."""
    from courier_fast.pipeline.evaluate import evaluate, oracle_embeddings

    forms, forms_seconds = {}, 0.0

    def score(method, emb):
        nonlocal forms_seconds
        results[method] = evaluate(world, emb)
        if feature_forms:
            t = time.time()
            forms[method] = {f: evaluate(world, emb, features=f) for f in FORMS}
            forms_seconds += time.time() - t

    start = time.time()
    name = f"{'quick' if quick else 'full'}-seed{seed}"
    if data is not None:  # its own runs: a run directory resumes whatever trained there before
        name += "-" + os.path.basename(os.path.abspath(data))
    workdir = workdir or os.path.join("courier_demo", name)
    os.makedirs(workdir, exist_ok=True)
    world = data if data is not None else _world(workdir, seed, quick)
    log(f"{'data' if data is not None else 'world'}: {world} ({time.time() - start:.0f} s)")
    results = {"no_image": evaluate(world)}
    for name in PRETRAINED:
        t0 = time.time()
        score(name, run_method(name, world, workdir, seed, quick, progress))
        log(f"{name:<24} AUC {results[name]['auc']:.4f}  ({time.time() - t0:.0f} s)")
    results["courier"] = results.pop(DEFAULT_COURIER)
    if feature_forms:
        forms["courier"] = forms.pop(DEFAULT_COURIER)
    if os.path.exists(os.path.join(world, "oracle.parquet")):
        score("oracle_attributes", oracle_embeddings(world, PRESETS[quick]["clusters"], seed))
    metrics = lambda r: {k: r[k] for k in ("auc", "gauc", "logloss")}  # noqa: E731
    report = {"seed": seed, "quick": quick, "seconds": round(time.time() - start, 1), "courier_query": COURIER_QUERY,
              "results": {m: metrics(results[m]) for m in ORDER if m in results}}
    if feature_forms:  # "seconds" includes these fits; "feature_forms_seconds" says how much of it they took
        report["feature_forms_seconds"] = round(forms_seconds, 1)
        report["feature_forms"] = {m: {"none": report["results"]["no_image"],
                                       **{f: metrics(forms[m][f]) for f in FORMS}, "all": report["results"][m]}
                                   for m in ORDER if m in forms}
    if data is not None:
        report["data"] = os.path.abspath(data)
    log(format_table(report))
    if feature_forms:
        log(format_forms(report))
    json_path = json_path or os.path.join(workdir, "results.json")
    with atomic_path(json_path) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    plot(report, png_path)
    log(f"wrote {json_path} and {png_path}")
    return report


def format_table(report):
    res = report["results"]
    base = res["no_image"]["auc"]
    best_generic = max(res[m]["auc"] for m in GENERIC)
    lines = [f"cold-item CTR, seed {report['seed']}{' (quick)' if report['quick'] else ''}, "
             f"{report.get('seconds', 0):.0f} s", f"{'method':<24}{'AUC':>8}{'GAUC':>8}{'logloss':>9}{'vs no_image':>13}"]
    for m in ORDER:
        if m not in res:
            continue
        r = res[m]
        lines.append(f"{label(m):<24}{r['auc']:>8.4f}{r['gauc']:>8.4f}{r['logloss']:>9.4f}{r['auc'] - base:>+13.4f}")
    gap = res["oracle_attributes"]["auc"] - base if "oracle_attributes" in res else float("nan")
    c = res["courier"]["auc"]
    lines.append(f"courier - best generic baseline: {c - best_generic:+.4f} AUC; "
                 f"recovers {100 * (c - base) / gap if gap > 0 else float('nan'):.0f} % of the no_image -> oracle gap")
    return "\n".join(lines)


def format_forms(report):
    """The AUC gain of each feature form over "none" (ID / category features only), per method."""
    ff = report["feature_forms"]
    cols = FORMS + ("all",)
    lines = ["AUC gain over ID / category features alone, by feature form (paper: cluster > simscore > vector)",
             f"{'method':<24}" + "".join(f"{c:>10}" for c in cols)]
    for m, r in ff.items():
        lines.append(f"{label(m):<24}" + "".join(f"{r[c]['auc'] - r['none']['auc']:>+10.4f}" for c in cols))
    return "\n".join(lines)


def plot(report, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    names = [m for m in ORDER if m in res]
    aucs = [res[m]["auc"] for m in names]
    colour = {"no_image": "#999999", "oracle_attributes": "#31a354", **{m: "#6baed6" for m in GENERIC}}
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar(range(len(names)), aucs, color=[colour.get(m, "#e6550d") for m in names])
    ax.set_xticks(range(len(names)), [label(m) for m in names], rotation=30, ha="right")
    lo = min(aucs)
    ax.set_ylim(lo - 0.02, max(aucs) + 0.01)
    for i, a in enumerate(aucs):
        ax.text(i, a + 0.002, f"{a:.3f}", ha="center", fontsize=8)
    ax.set_ylabel("cold-item AUC")
    ax.set_title(f"COURIER demo, seed {report['seed']}{' (quick)' if report['quick'] else ''}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
