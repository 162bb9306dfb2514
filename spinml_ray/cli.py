"""The `spinml` command: run a whole request, or one stage, on a Ray cluster (local by default)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from spinml_ray.images import ImageError
from spinml_ray.spec import SpecError

DEFAULT_STORAGE = os.environ.get("SPINML_STORAGE", "spinml-data")
DEFAULT_MODEL = os.environ.get("SPINML_MODEL", "tiny")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinml", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def request_command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("request", help="request YAML/JSON: local path or s3:// URI")
        p.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root, local path or s3://bucket/prefix "
                       "(default $SPINML_STORAGE or ./spinml-data)")
        p.add_argument("--address", default=None, help="Ray cluster address (default $RAY_ADDRESS, else start a local one)")
        p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a locally started Ray")
        return p

    for name, help_text in (
        ("run", "run every stage of a request"),
        ("sanitize", "stage 1: sanitize the references (Ray Data)"),
        ("synthesize", "stage 2: generate synthetic images (Ray Serve)"),
        ("train", "stage 3: train and evaluate the specialized model (Ray Train)"),
    ):
        p = request_command(name, help_text)
        if name in ("run", "synthesize"):
            p.add_argument("--model", default=DEFAULT_MODEL, help="model source: tiny, a directory, s3:// prefix or hub id")
            p.add_argument("--controlnet", default=None, help="ControlNet source (default: the model's controlnet/)")
            p.add_argument("--keep-serving", action="store_true", help="leave the synthesis app deployed")
            p.add_argument("--http-port", type=int, default=8000, help="Serve HTTP port on 127.0.0.1")

    example = sub.add_parser("example", help="write the example request and its procedural images")
    example.add_argument("out_dir", nargs="?", default="examples")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "example":
        from spinml_ray.examples import write_example

        print(write_example(args.out_dir))
        return 0
    from spinml_ray.cluster import connect
    from spinml_ray.pipeline import run_request
    from spinml_ray.stages.sanitize import StageError

    stages = ("sanitize", "synthesize", "train") if args.command == "run" else (args.command,)
    try:
        connect(args.address, num_cpus=args.num_cpus)
        summary = run_request(
            args.request,
            args.storage,
            model=getattr(args, "model", DEFAULT_MODEL),
            controlnet=getattr(args, "controlnet", None),
            stages=stages,
            keep_serving=getattr(args, "keep_serving", False),
            http_port=getattr(args, "http_port", 8000),
        )
    except (SpecError, ImageError, StageError, FileNotFoundError, ValueError) as exc:
        print(f"spinml: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    print(f"results: {summary['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
