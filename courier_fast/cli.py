"""The `courier-fast` command line (also `python -m courier_fast`)."""
import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="courier-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, compiled extension and available backends")
    info.add_argument("--json", action="store_true", help="print build_info() and backends as JSON")
    _add_selftest(sub)
    gen = sub.add_parser("generate", help="write the generated visual-CTR world (parquet + JPEGs)")
    gen.add_argument("--out", required=True, help="output directory")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--quick", action="store_true", help="a small world, generated in seconds")
    gen.add_argument("--items", type=int, help="number of items")
    gen.add_argument("--users", type=int, help="number of users")
    gen.add_argument("--requests-per-user", type=int)
    gen.add_argument("--image-size", type=int, help="rendered image side in pixels")
    gen.add_argument("--layout", choices=("parquet", "files"), default="parquet",
                     help="parquet: our format; files: a public-dataset layout (images/<item_id>.jpg, items.csv, "
                          "interactions.csv with timestamps, no impressions) for `courier-fast import`")
    for add, name in ((_add_import, "import"), (_add_train, "train")):
        try:
            add(sub)
        except ImportError as exc:  # a torch-only install: `info` and the ops work, this command says why not
            unavailable = sub.add_parser(name, help=f"unavailable here ({exc})", prefix_chars="\0", add_help=False)
            unavailable.add_argument("rest", nargs="*")
            unavailable.set_defaults(unavailable=exc)
    emb = sub.add_parser("embed", help="L2-normalised item embeddings + k-means cluster IDs from a checkpoint "
                                       "(streamed, resumable, torchrun-able)")
    emb.add_argument("--checkpoint", required=True,
                     help="checkpoint.pt or encoder.safetensors written by `courier-fast train` (only the encoder is used)")
    emb.add_argument("--data", required=True, help="a data directory (items.parquet)")
    emb.add_argument("--out", required=True, help="output: a .safetensors or .parquet file, or a directory (no "
                                                  "suffix) of parts + manifest.json for catalogue-scale runs")
    emb.add_argument("--clusters", type=int, default=32, help="k of k-means (0: no cluster IDs)")
    emb.add_argument("--kmeans", default="auto", choices=("auto", "faiss", "sklearn"),
                     help="k-means backend (auto: faiss when installed, else scikit-learn MiniBatchKMeans)")
    emb.add_argument("--simscore", metavar="TABLE", action="append", default=[],
                     help="also write TABLE's SimScore features (cosine of each shown item to each history "
                          "item) to <out stem>.simscore-TABLE.parquet (<out>/simscore-TABLE.parquet for a "
                          "directory); repeatable (e.g. ctr_train)")
    emb.add_argument("--batch-size", type=int, default=256)
    emb.add_argument("--chunk-size", type=int, default=16384, help="items per part (the unit of resume and sharding)")
    emb.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    emb.add_argument("--no-progress", action="store_true")
    ev = sub.add_parser("eval", help="downstream CTR on ctr_train -> ctr_test (cold items): AUC, GAUC, logloss")
    ev.add_argument("--data", required=True)
    ev.add_argument("--embeddings", help="an embedding file from `courier-fast embed` (omit: no image features)")
    ev.add_argument("--oracle", action="store_true", help="use the world's true attributes (oracle.parquet)")
    ev.add_argument("--features", default="all", metavar="FORM",
                    help="the form of the image features: all (default), one of vector / simscore / cluster "
                         "(the paper's forms, one at a time), or none (ID / category features only)")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    dm = sub.add_parser("demo", help="generate a world, pre-train every method, embed, evaluate, compare")
    dm.add_argument("--quick", action="store_true", help="the small world and budget (minutes on 2 CPU cores)")
    dm.add_argument("--seed", type=int, default=0)
    dm.add_argument("--workdir", help="where the world, runs and results go (default courier_demo/<mode>-seed<S>)")
    dm.add_argument("--json", dest="json_path", help="results JSON path (default <workdir>/results.json)")
    dm.add_argument("--data", help="run on this data directory (e.g. from `courier-fast import`) instead of "
                                   "generating the world")
    dm.add_argument("--feature-forms", action="store_true",
                    help="also evaluate each method's vector / simscore / cluster features alone (the paper's "
                         "forms; adds three CTR fits per method)")
    dm.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if getattr(args, "unavailable", None):
            raise args.unavailable
        return _run(parser, args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        print(f"courier-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # the model/data stack is not installed (e.g. --no-deps)
        print(f"courier-fast {args.command}: error: {exc}; install the package's dependencies "
              "(pip install -e . without --no-deps, see README 'Installing')", file=sys.stderr)
        return 2


def _add_selftest(sub):
    st = sub.add_parser("selftest", help="check every kernel backend against the float64 reference on a device "
                                         "(verdicts cached; backend='auto' uses only backends that passed)")
    st.add_argument("--device", default=None, choices=("cuda", "cpu"),
                    help="default: cuda when a GPU is visible, else cpu (Triton in its interpreter)")
    st.add_argument("--force", action="store_true", help="re-run the checks instead of reading the cache")
    st.add_argument("--json", action="store_true", help="print the verdicts as JSON")


def _selftest(args):
    import os
    import subprocess

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # the kernels read TRITON_INTERPRET when they are defined: run in a fresh process
        argv = [sys.executable, "-m", "courier_fast", "selftest", "--device", "cpu"]
        argv += ["--force"] * args.force + ["--json"] * args.json
        return subprocess.call(argv, env={**os.environ, "TRITON_INTERPRET": "1"})
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible")
    from courier_fast.ops.selfcheck.check import cache_file, selftest
    verdicts = selftest(device, force=args.force)
    if args.json:
        print(json.dumps(verdicts, indent=2))
    else:
        print(f"self-check on {device} (cache: {cache_file(device)[0]})")
        for op, per_backend in verdicts.items():
            for name, v in per_backend.items():
                print(f"  {op:<26}{name:<9}{'ok  ' if v['ok'] else 'FAIL'}  {v['reason']}")
    return 0 if all(v["ok"] for per in verdicts.values() for v in per.values()) else 1


def _add_import(sub):
    import dataclasses

    from courier_fast.data.importer import ImportConfig

    defaults = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(ImportConfig)
                         if f.default is not dataclasses.MISSING and f.name != "progress")
    im = sub.add_parser("import", help="a public-dataset layout (interactions + items + image folder) -> our format",
                        description="Builds items.parquet (image paths) and the pretrain / ctr_train / ctr_test "
                                    "session tables, out of core (DuckDB). Columns named click, request_id, "
                                    "category, title, image_path are used when the files have them. Options not "
                                    f"given take ImportConfig's defaults: {defaults}.")
    im.add_argument("--interactions", required=True, help="CSV / TSV / parquet / JSON-lines interaction log")
    im.add_argument("--items", required=True, help="CSV / TSV / parquet / JSON-lines item table")
    im.add_argument("--images", required=True, help="the directory of item images")
    im.add_argument("--out", required=True, help="output directory (must not exist, or be empty)")
    for flag, what in (("--user-col", "user id"), ("--item-col", "item id"), ("--time-col", "timestamp"),
                       ("--click-col", "0/1 click label (default: 'click' when present; else every row is a positive)"),
                       ("--request-col", "request id: rows of one request are one page view (impressions)"),
                       ("--items-item-col", "item id in the items file (default: --item-col)"),
                       ("--category-col", "item category (any type; mapped to ints)"), ("--title-col", "item title"),
                       ("--image-col", "image path, relative to --images or absolute")):
        im.add_argument(flag, help=f"column: {what}")
    im.add_argument("--image-pattern", help="image file of an item under --images, a Python format string of the id "
                                            "as written in the items file: '{item_id}.jpg' (default), "
                                            "'{item_id:.3}/{item_id}.jpg' (H&M)")
    im.add_argument("--interactions-format", choices=("csv", "tsv", "parquet", "jsonl"))
    im.add_argument("--items-format", choices=("csv", "tsv", "parquet", "jsonl"))
    im.add_argument("--delimiter", help="CSV delimiter (default ',' and tab for .tsv)")
    for which in ("interactions", "items"):
        im.add_argument(f"--{which}-no-header", dest=f"{which}_header", action="store_false", default=None,
                        help=f"the {which} CSV has no header row: its columns are column0, column1, ...")
    im.add_argument("--time-format", help="strptime format of the timestamps (default: numbers, or ISO dates)")
    im.add_argument("--history-len", type=int, help="history items per row")
    im.add_argument("--negatives", type=int, help="sampled non-clicked items per positive (logs without impressions)")
    im.add_argument("--min-history", type=int, help="leave out requests with fewer earlier positives")
    im.add_argument("--time-windows", type=int, help="negative-sampling windows per split (equal counts)")
    im.add_argument("--split", type=_floats, help="pretrain,ctr_train,ctr_test fractions of requests, in time order")
    im.add_argument("--split-times", type=lambda s: tuple(s.split(",")),
                    help="T1,T2: ctr_train starts at T1, ctr_test at T2 (as the timestamps are written)")
    im.add_argument("--seed", type=int)
    im.add_argument("--strict", action="store_true", default=None, help="fail on the first bad row")
    im.add_argument("--on-missing-image", choices=("raise", "skip"))
    im.add_argument("--memory-limit", help="DuckDB memory limit, e.g. 4GB (it spills to disk past it)")
    im.add_argument("--threads", type=int)
    im.add_argument("--no-progress", action="store_true")


def _floats(text):
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_train(sub):
    import dataclasses

    from courier_fast.models.methods import METHODS
    from courier_fast.models.courier import QUERIES
    from courier_fast.ops.dispatch import BACKENDS
    from courier_fast.training.loop import LOSS_WEIGHTS, LR_SCHEDULES, TrainConfig

    # an option not given is not passed: its default is TrainConfig's, kept in one place
    defaults = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(TrainConfig)
                         if f.default is not dataclasses.MISSING and f.name != "progress")
    tr = sub.add_parser("train", help="pre-train an image encoder (COURIER or a baseline); resumable, torchrun-able",
                        description=f"Options not given take TrainConfig's defaults: {defaults}.")
    tr.add_argument("--data", required=True, help="a data directory (items.parquet, pretrain.parquet)")
    tr.add_argument("--out", required=True, help="run directory: config.json, metrics.jsonl, checkpoint.pt")
    tr.add_argument("--method", choices=METHODS)
    tr.add_argument("--encoder", help="a timm model name")
    tr.add_argument("--embed-dim", type=int)
    tr.add_argument("--num-heads", type=int)
    tr.add_argument("--query", choices=QUERIES)
    tr.add_argument("--pretrained", help="local backbone weights (.pth/.safetensors); nothing is downloaded")
    tr.add_argument("--image-size", type=int, help="resize + centre-crop to S x S (0: the stored size)")
    tr.add_argument("--history-len", type=int, help="newest history clicks per row")
    tr.add_argument("--pv-len", type=int, help="page-view slots per row (default: the longest page)")
    tr.add_argument("--batch-size", type=int, help="request rows per process and step")
    tr.add_argument("--steps", type=int, help="optimiser steps (default: --epochs passes)")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--max-images", type=int, help="stop after this many encoder image passes")
    tr.add_argument("--lr", type=float)
    tr.add_argument("--weight-decay", type=float)
    tr.add_argument("--warmup-steps", type=int)
    tr.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="after warm-up (decay to 0 at the last step)")
    tr.add_argument("--grad-clip", type=float, help="clip the global gradient norm to this")
    tr.add_argument("--temperature", type=float, help="InfoNCE temperature (default: the method's)")
    for name in LOSS_WEIGHTS:
        tr.add_argument(f"--{name.replace('_', '-')}", type=float, help="courier's loss weight (default 1)")
    tr.add_argument("--backend", choices=("auto",) + BACKENDS, help="contrastive loss / attention backend")
    tr.add_argument("--ring", action="store_true", help="across ranks, pass negatives around a ring")
    tr.add_argument("--logq", action="store_true",
                    help="courier: subtract the log of each candidate's page-view frequency (logQ correction)")
    tr.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"))
    tr.add_argument("--grad-checkpointing", action="store_true")
    tr.add_argument("--encoder-micro-batch", type=int, metavar="K",
                    help="encode K images at a time: the encoder's activations of K images, the gradients of the "
                         "plain step, one extra encoder forward without a graph (GradCache; BatchNorm sees K-image "
                         "batches)")
    tr.add_argument("--freeze-backbone", action="store_true")
    tr.add_argument("--checkpoint-every", type=int)
    tr.add_argument("--log-every", type=int)
    tr.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--deterministic", action="store_true", default=None,
                    help="bitwise-repeatable GPU kernels (cuDNN / torch deterministic algorithms; slower)")
    tr.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                    help="how long a collective may wait across ranks (default: torch's, 10 min for NCCL)")
    tr.add_argument("--device", choices=("auto", "cpu", "cuda"))
    tr.add_argument("--decoder", choices=("auto", "dali", "pil", "torchvision"))
    tr.add_argument("--on-error", choices=("raise", "skip"), help="a corrupt image: raise, or skip it (padding)")
    tr.add_argument("--no-progress", action="store_true")


def _run(parser, args):

    if args.command == "generate":
        import dataclasses
        import datetime
        import time

        from courier_fast.data.generate import WorldConfig, generate
        cfg = WorldConfig.quick() if args.quick else WorldConfig()
        overrides = {"items": args.items, "users": args.users,
                     "requests_per_user": args.requests_per_user, "image_size": args.image_size}
        for key, value in overrides.items():
            if value is not None and value <= 0:
                parser.error(f"--{key.replace('_', '-')} must be > 0")
        cfg = dataclasses.replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
        start = time.time()
        counts = generate(args.out, seed=args.seed, config=cfg, layout=args.layout)
        if args.layout == "files":
            from courier_fast.data.generate import EPOCH, split_days
            cuts = ",".join((EPOCH + datetime.timedelta(days=d)).date().isoformat() for d in split_days(cfg))
            print(f"wrote {args.out}: {counts['items']} images, items.csv, interactions.csv ({counts['interactions']} "
                  f"clicks) in {time.time() - start:.1f} s\nimport it with the native split:\n  courier-fast import "
                  f"--interactions {args.out}/interactions.csv --items {args.out}/items.csv --images {args.out}/images "
                  f"--out OUT --split-times {cuts}")
            return 0
        print(f"wrote {args.out}: {cfg.items} items, " + ", ".join(f"{k} {v} rows" for k, v in counts.items())
              + f" in {time.time() - start:.1f} s")
        return 0

    if args.command == "import":
        from courier_fast.data.importer import ImportConfig, import_dataset
        fields = {k: v for k, v in vars(args).items() if k not in ("command", "no_progress") and v is not None}
        report = import_dataset(ImportConfig(progress=not args.no_progress, **fields))
        print(format_import(report, args.out))
        return 0

    if args.command == "train":
        from courier_fast.training.loop import TrainConfig, train
        fields = {k: v for k, v in vars(args).items() if k not in ("command", "no_progress") and v is not None}
        summary = train(TrainConfig(progress=not args.no_progress, **fields))
        print(json.dumps(summary))
        return 0
    if args.command == "embed":
        return _embed(args)
    if args.command == "selftest":
        return _selftest(args)
    if args.command == "eval":
        from courier_fast.pipeline.evaluate import evaluate, oracle_embeddings
        if args.oracle and args.embeddings:
            parser.error("give --embeddings or --oracle, not both")
        emb = oracle_embeddings(args.data) if args.oracle else args.embeddings
        metrics = evaluate(args.data, emb, features=args.features)
        print(json.dumps(metrics) if args.json else
              "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        return 0
    if args.command == "demo":
        from courier_fast.pipeline.demo import demo
        demo(seed=args.seed, quick=args.quick, workdir=args.workdir, json_path=args.json_path,
             progress=not args.no_progress, data=args.data, feature_forms=args.feature_forms)
        return 0

    import courier_fast

    if args.command == "info":
        if args.json:
            backends = {k: {"available": ok, "reason": why} for k, (ok, why) in courier_fast.backends().items()}
            print(json.dumps({"build": courier_fast.build_info(), "backends": backends}, indent=2))
        else:
            from courier_fast.info import report
            print(report())
    return 0


def format_import(report, out):
    """The import report in a few lines."""
    rows = ", ".join(f"{k} {v}" for k, v in report["rows"].items())
    bad = report["bad_rows"]
    lines = [f"wrote {out}: {report['items']} items, {rows} rows ({report['interactions']} of "
             f"{report['interaction_rows']} interactions used) in {report['seconds']['total']:.1f} s",
             f"split times {report['split_times'][0]} / {report['split_times'][1]}; cold items in ctr_test: "
             f"{100 * report['cold_items_ctr_test']['slots']:.1f} % of shown slots, "
             f"{100 * report['cold_items_ctr_test']['items']:.1f} % of distinct items"]
    if report["missing_images"]:
        lines.append(f"skipped {report['missing_images']} items without an image file")
    if bad["total"]:
        f = bad["first"]
        lines.append(f"left out {bad['total']} bad rows {bad['by_reason']}; first: {f['file']} row {f['row']}, "
                     f"column '{f['column']}': {f['reason']}" + (f" {f['value']!r}" if f["value"] is not None else ""))
    if report["rows_short_of_negatives"]:
        lines.append(f"{report['rows_short_of_negatives']} rows got fewer than {report['options']['negatives']} "
                     f"negatives (too few other items in their time window)")
    lines.append(f"report: {out}/import.json")
    return "\n".join(lines)


def _embed(args):
    import os

    import numpy as np
    import pyarrow as pa

    from courier_fast.data import load_dataset, write_table
    from courier_fast.data.loader import padded_column
    from courier_fast.pipeline.embed import embed, is_directory_out
    from courier_fast.pipeline.embeddings import SUFFIXES, ItemEmbeddings, simscore

    directory = is_directory_out(args.out)
    if not directory and not args.out.endswith(SUFFIXES):
        raise ValueError(f"--out must end with one of {SUFFIXES} or be a directory (no suffix), got {args.out!r}")
    if args.clusters < 0 or args.batch_size <= 0 or args.chunk_size <= 0:
        raise ValueError("--clusters must be >= 0, --batch-size and --chunk-size > 0")
    tables = load_dataset(args.data, tables=tuple(args.simscore))  # validates before the long part
    result = embed(args.checkpoint, args.data, args.out, clusters=args.clusters, batch_size=args.batch_size,
                   device=args.device, chunk_size=args.chunk_size, kmeans=args.kmeans, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if directory:
        print(f"wrote {args.out}: {result['items']} items x {result['dim']} in {len(result['parts'])} parts"
              + (f", {result['clusters']} clusters ({result['kmeans']})" if result["clusters"] else ""))
    else:
        emb = result
        print(f"wrote {args.out}: {len(emb)} items x {emb.vectors.shape[1]}"
              + (f", {int(emb.cluster_ids.max()) + 1} clusters" if emb.cluster_ids is not None else ""))
    for name in args.simscore:
        t = tables[name]
        hist = padded_column(t.column("history"), 5, newest=True)
        pv = padded_column(t.column("pv_items"))
        if directory:  # only the items this table needs
            emb = ItemEmbeddings.load(args.out, item_ids=np.unique(np.concatenate([hist.ravel(), pv.ravel()])))
        sims = simscore(emb, hist, pv)
        rows = [[list(map(float, s[: (h >= 0).sum()])) for s, p in zip(rs, ps) if p >= 0]
                for rs, h, ps in zip(sims, hist, pv)]
        path = (os.path.join(args.out, f"simscore-{name}.parquet") if directory
                else f"{os.path.splitext(args.out)[0]}.simscore-{name}.parquet")
        write_table(pa.table({"user_id": t.column("user_id"), "pv_items": t.column("pv_items"),
                              "simscore": pa.array(rows, pa.list_(pa.list_(pa.float32())))}), path)
        print(f"wrote {path}: SimScore of {t.num_rows} requests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
