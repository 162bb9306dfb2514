"""Training fleet: specialized models trained per hour, the Ray Train fleet vs a sequential script loop.

For N small requests (each its own synthetic images: procedural duck scenes, two labels), the
baseline runs `artifact_style_train.py` once per request, one process after another (as the SpinML
artifact does); "sequential NHWC" is the same loop with the model laid out channels-last as the
fleet's are, which separates the layout's gain from the fleet's own. The fleet runs `ray_layer.train.run_train` for all N at once on a local Ray cluster
through a `fleet.TrainingFleet` of min(N, `--max-concurrent`) slots, each with the cluster's CPUs
divided among the slots (`resources.training_cpus`), or a GPU share on GPU machines. Both train
MobileNetV2 with the same settings on the same images. The fleet's time includes each epoch's state
written to storage, the final evaluation and the ONNX/TorchScript export (the baseline exports
nothing); "cold" also includes starting the slots (about 9 s each here), "warm" starts them first,
as in a long-running job. Starting the Ray cluster is printed separately (a batch job pays it once).

    .venv/bin/python bench/bench_fleet.py [--sizes 1,4,16] [--images-per-label 32] [--image-size 160]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow as pa  # noqa: E402
from PIL import Image  # noqa: E402

from spinml_ray import storage  # noqa: E402
from spinml_ray.examples import LABELS, make_scene  # noqa: E402
from spinml_ray.images import encode_png  # noqa: E402
from spinml_ray.spec import parse_request  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def write_request_data(root: str, index: int, per_label: int, settings: dict):
    """One request's synthetic images, as a committed `synthetic/` table and as label folders."""
    spec = parse_request({
        "request_id": f"fleet-{index:03d}", "tenant": "bench", "subject": "duck", "bundle": "unused",
        "labels": [{"name": name, "phrase": phrase} for name, phrase in LABELS.items()],
        "training": settings,
    })
    paths = storage.RequestPaths(os.path.join(root, "fleet"), spec.tenant, spec.request_id)
    folder = os.path.join(root, "plain", spec.request_id)
    rows = []
    for label_index, label in enumerate(LABELS):
        os.makedirs(os.path.join(folder, label), exist_ok=True)
        for k in range(per_label):
            image, _ = make_scene(label, index * 10_000 + label_index * 1000 + k, size=(64, 64))
            Image.fromarray(image).save(os.path.join(folder, label, f"{k}.png"))
            rows.append({"image_id": f"{label}-{k}", "label_index": label_index, "image": encode_png(image)})
    part = storage.part_uri(paths.synthetic)
    storage.write_table(part, pa.Table.from_pylist(rows))
    storage.commit(paths.synthetic, [part], images=len(rows))
    return spec, paths, folder


def sequential(jobs, root: str, settings: dict, channels_last: bool = False) -> float:
    started = time.perf_counter()
    for spec, _, folder in jobs:
        subprocess.run([sys.executable, os.path.join(HERE, "artifact_style_train.py"), folder,
                        os.path.join(root, f"{spec.request_id}.pth"), "--epochs", str(settings["epochs"]),
                        "--batch-size", str(settings["batch_size"]), "--image-size", str(settings["image_size"]),
                        *(["--channels-last"] if channels_last else [])],
                       check=True)
    return time.perf_counter() - started


def fleet(jobs, max_concurrent: int, root: str, warm: bool) -> float:
    """All N requests through a `TrainingFleet`, as a batch job trains them: `warm=False` counts
    starting its slots; `warm=True` starts them first (the steady state of a long-running job)."""
    import ray

    from spinml_ray.ray_layer.fleet import TrainingFleet
    from spinml_ray.ray_layer.train import run_train
    from spinml_ray.resources import training_cpus

    concurrent = min(len(jobs), max_concurrent)
    cpus = training_cpus(ray.cluster_resources().get("CPU", 1), concurrent)
    trainers = TrainingFleet(concurrent, cpus_per_slot=cpus, runs_uri=os.path.join(root, f"_fleet_{warm}"), idle_s=30)
    if warm:
        trainers.start()
    started = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(lambda job: run_train(job[0], job[1], fleet=trainers), jobs))
    seconds = time.perf_counter() - started
    trainers.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1,4,16")
    parser.add_argument("--images-per-label", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-concurrent", type=int, default=os.cpu_count())
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    settings = {"architecture": "mobilenet_v2", "epochs": args.epochs, "batch_size": 128, "learning_rate": 1e-3,
                "image_size": args.image_size}
    import ray

    from spinml_ray.ray_layer.cluster import connect

    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        connect(num_cpus=os.cpu_count())
        ray_start = time.perf_counter() - started
        results = []
        for n in sizes:
            jobs = [write_request_data(os.path.join(root, f"n{n}"), i, args.images_per_label, settings) for i in range(n)]
            seq = sequential(jobs, os.path.join(root, f"n{n}"), settings)
            seq_nhwc = sequential(jobs, os.path.join(root, f"n{n}"), settings, channels_last=True)
            cold = fleet(jobs, args.max_concurrent, os.path.join(root, f"n{n}"), warm=False)
            warm = fleet(jobs, args.max_concurrent, os.path.join(root, f"n{n}"), warm=True)
            results.append((n, seq, seq_nhwc, cold, warm))
        ray.shutdown()
    print(f"\n{os.cpu_count()} CPUs; per request {2 * args.images_per_label} images, MobileNetV2 at "
          f"{args.image_size} px, {args.epochs} epochs, batch 128; fleet at most {args.max_concurrent} at once; "
          f"starting Ray took {ray_start:.1f} s (not counted)\n")
    print("| N | sequential s | models/h | sequential NHWC s | fleet, cold s | models/h | vs sequential "
          "| vs seq. NHWC | fleet, warm s | models/h | vs sequential | vs seq. NHWC |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, seq, seq_nhwc, cold, warm in results:
        print(f"| {n} | {seq:.1f} | {3600 * n / seq:.0f} | {seq_nhwc:.1f} "
              f"| {cold:.1f} | {3600 * n / cold:.0f} | {seq / cold:.2f}x | {seq_nhwc / cold:.2f}x "
              f"| {warm:.1f} | {3600 * n / warm:.0f} | {seq / warm:.2f}x | {seq_nhwc / warm:.2f}x |")


if __name__ == "__main__":
    main()
