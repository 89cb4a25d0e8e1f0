"""`bin-counter <command>` (= `python -m bin_counter <command>`): parses arguments and calls one function."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from bin_counter import BinCounterError

log = logging.getLogger("bin_counter")


def _optional_bool(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


def add_prepare(sub) -> None:
    p = sub.add_parser("prepare", help="download/validate/split ABID images into DATA_DIR")
    p.add_argument("--source", default="sample", help="`sample` (bundled), a directory in ABID's layout, or s3://bucket[/prefix] (default ABID's public bucket: s3://aft-vbi-pds)")
    p.add_argument("--out", default="data", help="DATA_DIR to write (default: data)")
    p.add_argument("--file-list", help="the study's file_list.json or a JSON list of ids")
    p.add_argument("--classes", default="1-5", help="counts kept, e.g. 1-5, 0-5, 1-10 (default 1-5)")
    p.add_argument("--top-bucket", action="store_true", help="fold counts above the top class into it")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test ratios (default 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-per-class", type=int, help="keep at most N images per count")
    p.add_argument("--workers", type=int, default=8, help="parallel downloads/validations (default 8)")
    p.add_argument("--upload", help="copy the prepared splits to s3://bucket/prefix")
    p.add_argument("--anonymous", type=_optional_bool, default=None,
                   help="read S3 without credentials (default: only for ABID's public bucket)")
    p.set_defaults(func=cmd_prepare)


def cmd_prepare(args) -> None:
    from bin_counter.config import PrepareConfig
    from bin_counter.prepare import parse_split, run

    cfg = PrepareConfig(source=args.source, out=args.out, file_list=args.file_list, classes=args.classes,
                        top_bucket=args.top_bucket, split=parse_split(args.split), seed=args.seed,
                        limit_per_class=args.limit_per_class, workers=args.workers, upload=args.upload,
                        anonymous=args.anonymous)
    run(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bin-counter", description="Count objects in Amazon bin photos (ABID), tracked with MLflow.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


COMMANDS = [add_prepare]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    for noisy in ("botocore", "urllib3", "alembic", "mlflow.store", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from bin_counter import tracking

    try:
        tracking.configure()
        args.func(args)
    except BinCounterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
