"""The `spinml` command: run a whole request, or one stage, on a Ray cluster (local by default).

`spinml sanitize --local ...` and `spinml sanitize REQUEST --preview` run without Ray, on the user's
side: they write exactly what would leave (a bundle and its preview), and nothing to the server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import sys

from pydantic import ValidationError

from spinml_ray.bundle import BadReference
from spinml_ray.images import ImageError
from spinml_ray.ray_layer.pipeline import STAGE_NAMES, STAGES
from spinml_ray.spec import SpecError

DEFAULT_STORAGE = os.environ.get("SPINML_STORAGE", "spinml-data")
DEFAULT_MODEL = os.environ.get("SPINML_MODEL", "tiny")
LEVELS = ("L0", "L1", "L2")


def _ints(text: str, count: int, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be {count} integers separated by commas, got {text!r}") from None
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"{name} must be {count} integers separated by commas, got {text!r}")
    return values


def _gpu_share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 8:
        raise argparse.ArgumentTypeError(f"--gpus-per-replica must be a number of GPUs from 0 to 8, got {text!r}")
    return value


_SHARED = {  # options that the stage subcommands and `sweep` take alike
    "--storage": dict(default=DEFAULT_STORAGE, help="storage root, local path or s3://bucket/prefix "
                      "(default $SPINML_STORAGE or ./spinml-data)"),
    "--address": dict(default=None, help="Ray cluster address (default $RAY_ADDRESS, else start a local one)"),
    "--num-cpus": dict(type=int, default=None, help="CPUs for a locally started Ray"),
    "--model": dict(default=DEFAULT_MODEL, help="model source: tiny, a directory, s3:// prefix or hub id"),
    "--http-port": dict(type=int, default=8000, help="Serve HTTP port on 127.0.0.1"),
}


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def _shadows(text: str) -> int:
    value = positive_int(text) if text.strip() != "0" else 0
    if value == 1:
        raise argparse.ArgumentTypeError("LiRA needs at least 2 shadow models (or 0 for none)")
    return value


def sweep_arg(parse: str):
    """An argparse type from `sweep.parse_configs` or `sweep.parse_alphas` (their errors, as usage errors)."""
    def convert(text: str):
        from spinml_ray import sweep

        try:
            return getattr(sweep, parse)(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinml", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("run", "run every stage of a request"), *((s.name, s.help) for s in STAGES)):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("request", nargs="?" if name == "sanitize" else None, help="request YAML/JSON: local path or s3:// URI")
        for option in ("--storage", "--address", "--num-cpus", "--model"):
            p.add_argument(option, **_SHARED[option])
        if name in ("run", "sanitize"):
            p.add_argument("--sam", default=None, help="SAM folder (sam.json + checkpoint); default: the model's sam/")
        if name in ("run", "synthesize", "personalize"):
            p.add_argument("--controlnet", default=None, help="ControlNet source (default: the model's controlnet/)")
            p.add_argument("--keep-serving", action="store_true", help="leave the synthesis app deployed")
            p.add_argument("--http-port", **_SHARED["--http-port"])
        if name == "sanitize":
            p.add_argument("--preview", action="store_true", help="write what would leave to --out; release nothing")
            p.add_argument("--local", action="store_true", help="sanitize one image on this machine, no Ray")
            p.add_argument("--image", help="--local: the image file")
            where = p.add_mutually_exclusive_group()
            where.add_argument("--mask", help="--local: PNG of the image's size, nonzero = target")
            where.add_argument("--box", type=lambda t: _ints(t, 4, "--box"), help="--local: X0,Y0,X1,Y1 around the target")
            p.add_argument("--target", choices=LEVELS, help="--local: the target's level")
            p.add_argument("--background", choices=LEVELS, help="--local: the background's level")
            p.add_argument("--canny", type=lambda t: _ints(t, 2, "--canny"), default=(100, 200), help="LOW,HIGH")
            p.add_argument("--no-blur-faces", action="store_true", help="keep faces in released L2 pixels")
            p.add_argument("--allow-box-as-mask", action="store_true",
                           help="--local with --box and no SAM: release the whole box as the target (background inside it too)")
            p.add_argument("--out", default="preview", help="--local/--preview: output folder")
    report = sub.add_parser("report", help="write the request's privacy and utility report (no Ray)")
    report.add_argument("request", help="request YAML/JSON: local path or s3:// URI")
    report.add_argument("--storage", default=DEFAULT_STORAGE, help="storage root the request ran in")
    report.add_argument("--model", default=DEFAULT_MODEL, help="model source whose encoders/ embeds images for SIM")
    report.add_argument("--references-from", default=None, metavar="DIR",
                        help="the folder of your copy of the request: its raw references (and masks) are read "
                        "from there for SIM, cross-object MI and replication; they never leave this machine")
    report.add_argument("--held-out", default=None, metavar="DIR",
                        help="images of the subject that personalization never saw (cropped, on black, as an "
                        "L2 target is released): membership inference against the adapter")
    report.add_argument("--shadow-models", type=_shadows, default=0, metavar="K",
                        help="LiRA against the trained model with K >= 2 shadow models (a training each; default 0)")
    report.add_argument("--out", default=None, metavar="DIR",
                        help="a local folder for the report (default: the request's report/ in --storage, or, "
                        "with --references-from, ./report-REQUEST_ID: what comes from raw references stays here)")
    sweep = sub.add_parser("sweep", help="run a request under several level configurations, alphas and seeds "
                           "as one batch job, and recommend one")
    sweep.add_argument("request", help="request YAML/JSON: local path or s3:// URI")
    sweep.add_argument("--configs", type=sweep_arg("parse_configs"), default="L0_L0,L1_L0,L2_L0",
                       help="level configurations TARGET_BACKGROUND, comma-separated (default L0_L0,L1_L0,L2_L0)")
    sweep.add_argument("--alphas", type=sweep_arg("parse_alphas"), default="0",
                       help="mixing fractions of L0_L0 images, comma-separated (default 0)")
    sweep.add_argument("--seeds", type=positive_int, default=3, help="seeds per configuration and alpha (default 3)")
    goal = sweep.add_mutually_exclusive_group()
    goal.add_argument("--target-accuracy", type=float, default=None,
                      help="recommend the least-leaking configuration whose mean accuracy reaches this")
    goal.add_argument("--within", type=float, default=0.95,
                      help="... or reaches this fraction of the best mean accuracy (default 0.95)")
    sweep.add_argument("--references-from", default=None, metavar="DIR",
                       help="your copy of the request's folder: adds SIM per object (raw references stay here)")
    sweep.add_argument("--max-concurrent", type=int, default=None, help="requests at a time (default: CPUs / 2)")
    for option in ("--storage", "--address", "--num-cpus", "--model", "--http-port"):
        sweep.add_argument(option, **_SHARED[option])
    serve_cmd = sub.add_parser("serve", help="deploy the synthesis service (HTTP API on 127.0.0.1 by default)")
    serve_cmd.add_argument("--model", default=DEFAULT_MODEL)
    serve_cmd.add_argument("--controlnet", default=None)
    serve_cmd.add_argument("--storage", default=DEFAULT_STORAGE, help="where API calls store their images")
    serve_cmd.add_argument("--address", default=None)
    serve_cmd.add_argument("--num-cpus", type=int, default=None)
    serve_cmd.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to serve other machines)")
    serve_cmd.add_argument("--http-port", type=int, default=8000)
    serve_cmd.add_argument("--replicas", type=int, default=1, help="diffusion replicas")
    serve_cmd.add_argument("--gpus-per-replica", type=_gpu_share, default=None,
                           help="GPU share per diffusion replica (default: 1 on clusters with two or more GPUs, "
                                "0.5 on a one-GPU machine so that training fits beside it; 0 on CPU clusters)")
    serve_cmd.add_argument("--autoscale", type=lambda t: _ints(t, 2, "--autoscale"), default=None,
                           help="MIN,MAX replicas: autoscale instead of --replicas")
    serve_cmd.add_argument("--max-batch-size", type=int, default=8)
    serve_cmd.add_argument("--batch-wait-s", type=float, default=0.05)
    serve_cmd.add_argument("--max-pending-images", type=int, default=256, help="beyond this the API answers 503")
    serve_cmd.add_argument("--detach", action="store_true", help="return once deployed; the app keeps running")
    batch = sub.add_parser("batch", help="run many requests in one job (a manifest, or a prefix to scan)")
    batch.add_argument("manifest", help="manifest file (list of request URIs) or a storage prefix with requests")
    batch.add_argument("--storage", default=DEFAULT_STORAGE)
    batch.add_argument("--model", default=DEFAULT_MODEL)
    batch.add_argument("--address", default=None)
    batch.add_argument("--num-cpus", type=int, default=None)
    batch.add_argument("--max-concurrent", type=int, default=None, help="requests in flight (default: CPUs / 2)")
    batch.add_argument("--name", default="batch", help="name of the stored summary (_batches/NAME.json)")
    batch.add_argument("--http-port", type=int, default=8000)
    example = sub.add_parser("example", help="write the example request and its procedural images")
    example.add_argument("out_dir", nargs="?", default="examples")
    sub.add_parser("spinbench", add_help=False, help="SpinBench's procedural benchmark (spinml spinbench -h)")
    return parser


def _sanitize_here(args, parser) -> dict:
    """--local and --preview: sanitize in this process and write the bundle/preview to --out."""
    from spinml_ray.bundle import reference_items, sanitize_all, write_bundle
    from spinml_ray.models.source import sam_loader
    from spinml_ray.preview import write_preview
    from spinml_ray.segmentation import LazySegmenter
    from spinml_ray.spec import SanitizationSpec, load_request

    if args.local:
        missing = [flag for flag, value in (("--image", args.image), ("--target", args.target),
                                            ("--background", args.background)) if not value]
        if missing:
            parser.error(f"--local needs {', '.join(missing)}")
        if not os.path.isfile(args.image):
            raise BadReference(f"{args.image}: image file not found")
        settings = SanitizationSpec(canny_low=args.canny[0], canny_high=args.canny[1], blur_faces=not args.no_blur_faces,
                                    allow_box_as_mask=args.allow_box_as_mask)
        items = [{"ref_id": "ref-0000", "uri": os.path.abspath(args.image), "label": None,
                  "mask_uri": os.path.abspath(args.mask) if args.mask else None,
                  "box": list(args.box) if args.box else None, "points": None}]
        target, background = args.target, args.background
    else:
        if not args.request:
            parser.error("sanitize needs REQUEST (or --local)")
        spec = load_request(args.request)
        if spec.bundle:
            raise SpecError(f"{args.request}: carries an already sanitized bundle; nothing to preview")
        items, settings = reference_items(spec), spec.sanitization
        target, background = spec.privacy.target.value, spec.privacy.background.value
    rows, rejections = sanitize_all(items, target, background, settings, LazySegmenter(sam_loader(args.model, args.sam)))
    png, page = write_preview(rows, args.out, rejections)
    result = {"preview": [png, page], "released_rows": len(rows), "rejected": rejections}
    if args.local:
        if rejections:
            raise BadReference(rejections[0]["reason"])
        result["bundle"] = write_bundle(rows, rejections, args.out)
    return result


def _serve(args) -> int:
    """Deploy the synthesis app on the cluster and keep it up (until Ctrl-C, or detached)."""
    import time

    from spinml_ray.ray_layer.cluster import connect
    from spinml_ray.ray_layer.service import ROUTE_PREFIX, SynthesisAppArgs, deploy, undeploy

    connect(args.address, num_cpus=args.num_cpus)
    autoscaling = None
    if args.autoscale:
        autoscaling = {"min_replicas": args.autoscale[0], "max_replicas": args.autoscale[1],
                       "target_ongoing_requests": 2 * args.max_batch_size}
    deploy(SynthesisAppArgs(
        model=args.model, controlnet=args.controlnet, storage_root=args.storage, num_replicas=args.replicas,
        gpus_per_replica=args.gpus_per_replica, max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_s, autoscaling=autoscaling, max_pending_images=args.max_pending_images),
        args.host, args.http_port)
    print(f"synthesis API: http://{args.host}:{args.http_port}{ROUTE_PREFIX}/v1/generate (GET {ROUTE_PREFIX}/healthz)")
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        undeploy()
    return 0


def _report(args) -> int:
    from spinml_ray import report
    from spinml_ray.errors import StageError
    from spinml_ray.spec import load_request
    from spinml_ray.training.classifier import IMAGE_EXTENSIONS

    try:
        spec = load_request(args.request)
        references, skipped = None, []
        if args.references_from:
            references, skipped = report.load_references(load_request(args.request, base_uri=args.references_from))
        held_out = None
        if args.held_out:
            files = sorted(f for f in os.listdir(args.held_out) if f.lower().endswith(IMAGE_EXTENSIONS))
            held_out = [pathlib.Path(args.held_out, f).read_bytes() for f in files]
        out_dir = args.out or (f"report-{spec.request_id}" if references is not None else None)
        out = report.write(spec, args.storage, args.model, references, skipped, held_out, args.shadow_models, out_dir)
    except (SpecError, StageError, FileNotFoundError, ValueError) as exc:
        print(f"spinml: error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {out}/index.html ({out}/report.json)")
    return 0


def _sweep(args, progress) -> int:
    from spinml_ray import sweep
    from spinml_ray.ray_layer.cluster import connect
    from spinml_ray.ray_layer.sweep import run_sweep
    from spinml_ray.spec import load_request

    try:
        sweep.require_test_set(load_request(args.request), args.request)  # before any cluster starts
    except SpecError as exc:
        print(f"spinml: error: {exc}", file=sys.stderr)
        return 2
    connect(args.address, num_cpus=args.num_cpus)
    results, out = run_sweep(args.request, args.storage, args.configs, args.alphas, args.seeds, model=args.model,
                             target_accuracy=args.target_accuracy, within=args.within,
                             references_from=args.references_from, max_concurrent=args.max_concurrent,
                             http_port=args.http_port, progress=progress)
    progress.close()
    print(sweep.markdown(results))
    print(f"sweep: {out}/index.html ({out}/sweep.json)")
    return 0 if results["recommendation"] and results["recommendation"].get("name") else 1


def _batch(args, progress) -> int:
    from spinml_ray.ray_layer.batch import format_summary, list_requests, run_batch
    from spinml_ray.ray_layer.cluster import connect

    try:
        requests = list_requests(args.manifest)
    except (SpecError, FileNotFoundError) as exc:
        print(f"spinml: error: {exc}", file=sys.stderr)
        return 2
    connect(args.address, num_cpus=args.num_cpus)
    summary = run_batch(requests, args.storage, model=args.model, max_concurrent=args.max_concurrent,
                        name=args.name, http_port=args.http_port, progress=progress)
    progress.close()
    print(format_summary(summary))
    failed = sum(row.get("state") != "done" for row in summary)
    print(f"{len(summary) - failed} of {len(summary)} requests done; summary: "
          f"{os.path.join(args.storage, '_batches', args.name + '.json')}")
    return 0 if not failed else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["spinbench"]:  # SpinBench reads its own arguments, options included (spinbench/cli.py)
        from spinbench.cli import main as spinbench_main

        return spinbench_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    with _progress(args) as progress:
        return _command(args, parser, progress)


@contextlib.contextmanager
def _progress(args):
    """Live progress on a terminal for commands that run stages; log lines elsewhere (and for the rest)."""
    from spinml_ray.ray_layer.progress import Progress

    shows_stages = args.command in ("run", "batch", "sweep", *STAGE_NAMES[1:]) or (
        args.command == "sanitize" and not (args.local or args.preview))
    progress = Progress(live=None if shows_stages else False)
    logging.basicConfig(level=logging.INFO, handlers=[progress.log_handler()],  # rich shows time and level itself
                        format="%(name)s: %(message)s" if progress.live else "%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        yield progress
    finally:
        progress.close()


def _command(args, parser, progress) -> int:
    if args.command == "example":
        from spinml_ray.examples import write_example

        print(write_example(args.out_dir))
        return 0
    from spinml_ray.errors import StageError

    if args.command == "serve":
        return _serve(args)
    if args.command == "report":
        return _report(args)
    if args.command == "sweep":
        return _sweep(args, progress)
    if args.command == "batch":
        return _batch(args, progress)
    try:
        if args.command == "sanitize" and (args.local or args.preview):
            print(json.dumps(_sanitize_here(args, parser), indent=2))
            return 0
        if args.request is None:
            parser.error(f"{args.command} needs REQUEST")
        from spinml_ray.ray_layer.cluster import connect
        from spinml_ray.ray_layer.pipeline import run_request
        from spinml_ray.spec import load_request

        load_request(args.request)  # bad input fails here, before any cluster starts
        connect(args.address, num_cpus=args.num_cpus)
        summary = run_request(
            args.request,
            args.storage,
            model=args.model,
            controlnet=getattr(args, "controlnet", None),
            sam=getattr(args, "sam", None),
            stages=STAGE_NAMES if args.command == "run" else (args.command,),
            keep_serving=getattr(args, "keep_serving", False),
            http_port=getattr(args, "http_port", 8000),
            progress=progress,
        )
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        print(f"spinml: error: {problems}", file=sys.stderr)
        return 2
    except (SpecError, ImageError, BadReference, StageError, FileNotFoundError, ValueError) as exc:
        print(f"spinml: error: {exc}", file=sys.stderr)
        return 2
    progress.close()  # the results below the last bars, not among them
    print(json.dumps(summary, indent=2, default=str))
    print(f"results: {summary['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
