"""The `courier-fast` command line (also `python -m courier_fast`)."""
import argparse
import json
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="courier-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, compiled extension and available backends")
    info.add_argument("--json", action="store_true", help="print build_info() and backends as JSON")
    args = parser.parse_args(argv)

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
