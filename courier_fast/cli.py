"""The `courier-fast` command line (also `python -m courier_fast`)."""
import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="courier-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, compiled extension and available backends")
    info.add_argument("--json", action="store_true", help="print build_info() and backends as JSON")
    gen = sub.add_parser("generate", help="write the generated visual-CTR world (parquet + JPEGs)")
    gen.add_argument("--out", required=True, help="output directory")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--quick", action="store_true", help="a small world, generated in seconds")
    gen.add_argument("--items", type=int, help="number of items")
    gen.add_argument("--users", type=int, help="number of users")
    gen.add_argument("--requests-per-user", type=int)
    gen.add_argument("--image-size", type=int, help="rendered image side in pixels")
    args = parser.parse_args(argv)

    if args.command == "generate":
        import dataclasses
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
        counts = generate(args.out, seed=args.seed, config=cfg)
        print(f"wrote {args.out}: {cfg.items} items, " + ", ".join(f"{k} {v} rows" for k, v in counts.items())
              + f" in {time.time() - start:.1f} s")
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


if __name__ == "__main__":
    sys.exit(main())
