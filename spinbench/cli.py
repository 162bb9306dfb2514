"""`spinml spinbench ...`: the SpinBench commands (also `python -m spinbench.cli ...`).

- `world --user-seed N --out DIR`: write user N's request folder (request.yaml, references with
  exact masks, a test set per state) that `spinml run` accepts unchanged; prints the request's path.
- `run --user-seed N --out DIR [--configs L0_L0,L2_L0,...] [--alphas 0.25,0.5] [--seeds K] [--baselines]`:
  run the benchmark for user N through the batch job; writes DIR/results.json, results.md and
  accuracy.png (see spinbench/bench.py).
"""

from __future__ import annotations

import argparse
import sys
import typing

from spinml_ray.cli import positive_int as _positive
from spinml_ray.cli import sweep_arg
from spinml_ray.spec import SynthesisSpec

L2_TARGETS = typing.get_args(SynthesisSpec.model_fields["l2_target"].annotation)
PLACEMENTS = typing.get_args(SynthesisSpec.model_fields["placement"].annotation)

_configs, _floats = sweep_arg("parse_configs"), sweep_arg("parse_alphas")


def _synthesis(**settings) -> dict:
    """The request's synthesis fields given on the command line (None: not given, the default holds)."""
    return {name: value for name, value in settings.items() if value is not None}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinml spinbench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    world = sub.add_parser("world", help="write a SpinBench user's request folder (references, masks, test set)")
    world.add_argument("--user-seed", type=int, required=True, help="which user (>= 0): their dog and room")
    world.add_argument("--out", required=True, help="output folder")
    world.add_argument("--references-per-state", type=_positive, default=4,
                       help="reference images per state (default 4)")
    world.add_argument("--test-per-state", type=int, default=25, help="test images per state (default 25)")
    world.add_argument("--privacy", type=_config, default="L1_L0", help="target_background levels (default L1_L0)")
    world.add_argument("--images-per-label", type=_positive, default=None,
                       help="synthetic images per state (default 16)")
    world.add_argument("--l2-target", choices=L2_TARGETS, default=None,
                       help="synthesis.l2_target: how an L2 target is drawn (default: the system's)")
    world.add_argument("--placement", choices=PLACEMENTS, default=None,
                       help="synthesis.placement: where each image puts the target (default: the system's)")
    run = sub.add_parser("run", help="run the benchmark for one user through the batch job")
    run.add_argument("--user-seed", type=int, required=True)
    run.add_argument("--out", required=True, help="output folder (world, storage, results)")
    run.add_argument("--configs", type=_configs, default=None, help="comma-separated, default: all six")
    run.add_argument("--alphas", type=_floats, default=(), help="alphas besides 0, swept at L2_L0 (e.g. 0.25,0.5)")
    run.add_argument("--seeds", type=_positive, default=5, help="seeds per configuration (default 5)")
    run.add_argument("--baselines", action="store_true", help="also run the baselines on the same test set")
    run.add_argument("--model", default="spinbench", help="model source (default: the shipped spinbench model)")
    run.add_argument("--storage", default=None, help="storage root (default OUT/storage)")
    run.add_argument("--address", default=None, help="Ray cluster (default: start a local one)")
    run.add_argument("--num-cpus", type=int, default=None)
    run.add_argument("--max-concurrent", type=int, default=None, help="requests in flight (default: CPUs / 2)")
    run.add_argument("--images-per-label", type=_positive, default=32)
    run.add_argument("--steps", type=_positive, default=20, help="sampling steps per image")
    run.add_argument("--epochs", type=_positive, default=None,
                     help="classifier epochs (requests and baselines; default 15)")
    run.add_argument("--references-per-state", type=_positive, default=4)
    run.add_argument("--test-per-state", type=int, default=25)
    run.add_argument("--l2-target", choices=L2_TARGETS, default=None,
                     help="synthesis.l2_target of every request (default: the system's)")
    run.add_argument("--placement", choices=PLACEMENTS, default=None,
                     help="synthesis.placement of every request (default: the system's)")
    run.add_argument("--prompt-decorations", choices=("on", "off"), default=None,
                     help="synthesis.prompt_decorations of every request (default: the system's)")
    run.add_argument("--http-port", type=int, default=8000, help="the synthesis app's HTTP port (default 8000)")
    return parser


def _config(text: str) -> str:
    configs = _configs(text)
    if len(configs) != 1:
        raise argparse.ArgumentTypeError(f"one configuration Lx_Ly, got {text!r}")
    return configs[0]


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "world":
        from spinbench.world import write_user_request

        if args.user_seed < 0:
            parser.error(f"--user-seed must be >= 0, got {args.user_seed}")
        if args.test_per_state < 0:
            parser.error("--test-per-state must be >= 0")
        target, background = args.privacy.split("_")
        synthesis = _synthesis(images_per_label=args.images_per_label, l2_target=args.l2_target,
                               placement=args.placement)
        print(write_user_request(args.user_seed, args.out, references_per_state=args.references_per_state,
                                 test_per_state=args.test_per_state,
                                 privacy={"target": target, "background": background}, synthesis=synthesis))
        return 0
    if args.command == "run":
        from spinbench.baselines import Training
        from spinbench.bench import CONFIGS, plan, run_benchmark

        if args.test_per_state < 1:
            parser.error("--test-per-state must be >= 1")
        runs = plan(args.configs or CONFIGS, args.alphas, args.seeds)
        decorations = None if args.prompt_decorations is None else args.prompt_decorations == "on"
        synthesis = _synthesis(images_per_label=args.images_per_label, steps=args.steps,
                               l2_target=args.l2_target, prompt_decorations=decorations, placement=args.placement)
        results = run_benchmark(
            args.user_seed, args.out, runs, model=args.model, storage_root=args.storage, address=args.address,
            num_cpus=args.num_cpus, baselines=args.baselines, max_concurrent=args.max_concurrent,
            synthesis=synthesis, http_port=args.http_port,
            training=Training(epochs=args.epochs) if args.epochs else Training(),
            references_per_state=args.references_per_state, test_per_state=args.test_per_state)
        print(open(f"{args.out}/results.md").read())
        failed = sum(len(row["failed"]) for row in results["configurations"].values())
        return 1 if failed else 0
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
