"""Sanitization throughput: Ray Data with 1 and 2 workers against a plain single-process loop.

Same references (procedural scenes with exact masks, written to a temporary folder), same levels
(target L1, background L2: both objects released, MI computed for each), measured in one run.

    .venv/bin/python bench/bench_sanitize.py [--images 160]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from spinml_ray import storage  # noqa: E402
from spinml_ray.bundle import reference_items, sanitize_all  # noqa: E402
from spinml_ray.examples import LABELS, make_scene  # noqa: E402
from spinml_ray.images import encode_png  # noqa: E402
from spinml_ray.spec import parse_request  # noqa: E402


def make_request(folder: str, n: int, size=(240, 320)):
    refs = []
    for i in range(n):
        image, mask = make_scene(list(LABELS)[i % 2], i, size=size)
        storage.write_bytes(os.path.join(folder, f"ref{i}.png"), encode_png(image))
        storage.write_bytes(os.path.join(folder, f"mask{i}.png"), encode_png(mask))
        refs.append({"uri": os.path.join(folder, f"ref{i}.png"), "mask_uri": os.path.join(folder, f"mask{i}.png")})
    return parse_request({
        "request_id": "bench", "tenant": "bench", "subject": "duck",
        "labels": [{"name": "a", "phrase": "a"}, {"name": "b", "phrase": "b"}],
        "references": refs, "privacy": {"target": "L1", "background": "L2"},
    })


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--size", default="240,320", help="HEIGHT,WIDTH of the references")
    parser.add_argument("--ray-only", action="store_true", help="only Ray Data with 2 workers (scale/memory run)")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split(","))
    import ray

    from spinml_ray.ray_layer.sanitize import run_sanitize

    with tempfile.TemporaryDirectory() as tmp:
        spec = make_request(os.path.join(tmp, "refs"), args.images, size)
        results = []
        if not args.ray_only:
            items = reference_items(spec)
            started = time.perf_counter()
            rows, rejections = sanitize_all(items, "L1", "L2", spec.sanitization)
            results.append(("plain loop, 1 process", time.perf_counter() - started, None))
            assert not rejections and len(rows) == 2 * args.images
            del rows
        driver_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
        for workers in ((2,) if args.ray_only else (1, 2)):
            paths = storage.RequestPaths(os.path.join(tmp, f"out{workers}"), "bench", "bench")
            started = time.perf_counter()
            manifest = run_sanitize(spec, paths, workers=workers, batch_size=8)
            results.append((f"Ray Data, {workers} worker(s)", time.perf_counter() - started, manifest["worker_peak_rss_mb"]))
            assert manifest["accepted"] == args.images
        ray.shutdown()
        driver_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"\nSanitization of {args.images} references ({size[1]}x{size[0]}, target L1 + background L2, MI per object), "
          f"{os.cpu_count()} CPU cores\n")
    print("| mode | seconds | images/s | vs plain loop | worker peak RSS MiB |")
    print("|---|---:|---:|---:|---:|")
    base = None if args.ray_only else results[0][1]
    for name, seconds, rss in results:
        ratio = f"{base / seconds:.2f}x" if base else "-"
        print(f"| {name} | {seconds:.2f} | {args.images / seconds:.1f} | {ratio} | {rss or '-'} |")
    print(f"\ndriver peak RSS: {driver_before:.0f} MiB before Ray Data, {driver_after:.0f} MiB after")


if __name__ == "__main__":
    main()
