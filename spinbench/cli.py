"""`spinml spinbench ...`: the SpinBench commands (also `python -m spinbench.cli ...`).

- `world --user-seed N --out DIR`: write user N's request folder (request.yaml, references with
  exact masks, a test set per state) that `spinml run` accepts unchanged; prints the request's path.
"""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinml spinbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    world = sub.add_parser("world", help="write a SpinBench user's request folder (references, masks, test set)")
    world.add_argument("--user-seed", type=int, required=True, help="which user (>= 0): their dog and room")
    world.add_argument("--out", required=True, help="output folder")
    world.add_argument("--references-per-state", type=int, default=4, help="reference images per state (default 4)")
    world.add_argument("--test-per-state", type=int, default=25, help="test images per state (default 25)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "world":
        from spinbench.world import write_user_request

        if args.user_seed < 0:
            parser.error(f"--user-seed must be >= 0, got {args.user_seed}")
        if args.references_per_state < 1 or args.test_per_state < 0:
            parser.error("--references-per-state must be >= 1 and --test-per-state >= 0")
        print(write_user_request(args.user_seed, args.out, references_per_state=args.references_per_state,
                                 test_per_state=args.test_per_state))
        return 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
