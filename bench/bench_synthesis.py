"""Synthesis throughput on CPU with the tiny preset: plain diffusers loop vs batched vs Ray Serve.

(a) a plain diffusers loop, one image per pipeline call;
(b) the same pipeline, `--batch` images per call (the engine's batched path, no Serve);
(c) the Serve deployment with `@serve.batch` (max batch `--batch`), fed by `--clients` concurrent
    clients sending one work item each at a time.
All three make the same images (same prompts, seeds, resolution, steps) in one run. Goal: (c) at
least 90% of (b)'s images per second.

    .venv/bin/python bench/bench_synthesis.py [--images 96 --batch 8 --clients 16 --steps 20]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from spinml_ray.synthesis.engine import DiffusionEngine  # noqa: E402
from spinml_ray.synthesis.workitems import WorkItem  # noqa: E402


def items(n: int, resolution: int, steps: int) -> list[WorkItem]:
    return [
        WorkItem(image_id=f"img-{i}", request_id=f"r{i % 7}", tenant="bench", label="a", pool="L0_L0",
                 prompt=f"A photo of a yellow rubber duck, view {i % 5}", seed=i, resolution=resolution,
                 steps=steps, guidance=5.0)
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (b) and (c), interleaved; medians")
    args = parser.parse_args()
    work = items(args.images, args.resolution, args.steps)
    cores = os.cpu_count()
    torch.set_num_threads(cores)

    import statistics

    import ray
    from ray import serve

    from spinml_ray.ray_layer.service import build_app, submit

    engine = DiffusionEngine("tiny")
    engine.generate(work[: args.batch])  # warm-up
    ray.init(num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    serve.run(build_app("tiny", cpus_per_replica=cores, max_batch_size=args.batch, batch_wait_timeout_s=0.02),
              name="bench", route_prefix="/bench")
    handle = serve.get_deployment_handle("DiffusionDeployment", app_name="bench")
    [submit(handle, item).result() for item in work[: args.batch]]  # warm-up

    def run_plain():
        for item in work:
            engine.generate([item])

    def run_batched():
        for start in range(0, len(work), args.batch):
            engine.generate(work[start : start + args.batch])

    def run_served():
        queue = list(work)
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    if not queue:
                        return
                    item = queue.pop()
                submit(handle, item).result()

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        [t.start() for t in threads]
        [t.join() for t in threads]

    def timed(fn) -> float:
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    plain = timed(run_plain)
    rounds = [(timed(run_batched), timed(run_served)) for _ in range(args.repeats)]  # interleaved
    batched = statistics.median(b for b, _ in rounds)
    served = statistics.median(c for _, c in rounds)
    serve.shutdown()
    ray.shutdown()

    n = args.images
    print(f"\nTiny preset, {n} images at {args.resolution}px, {args.steps} steps, batch {args.batch}, "
          f"{args.clients} clients, {cores} CPU cores, torch {torch.__version__}; (b), (c): median of "
          f"{args.repeats} interleaved rounds {[(round(b, 2), round(c, 2)) for b, c in rounds]}\n")
    print("| path | seconds | images/s | vs (b) |")
    print("|---|---:|---:|---:|")
    for name, seconds in (("(a) plain diffusers loop, batch 1", plain), (f"(b) batched pipeline, batch {args.batch}", batched),
                          (f"(c) Ray Serve, @serve.batch {args.batch}, {args.clients} clients", served)):
        print(f"| {name} | {seconds:.2f} | {n / seconds:.2f} | {batched / seconds:.2f} |")
    ratio = batched / served
    print(f"\ngoal: (c) >= 0.90 x (b): {ratio:.2f} -> {'MET' if ratio >= 0.9 else 'NOT MET'}")


if __name__ == "__main__":
    main()
