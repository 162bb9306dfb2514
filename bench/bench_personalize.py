"""Personalization (DreamBooth-LoRA) training speed: Ray Train with 1 and 2 workers vs a plain loop.

Same tiny model, same released crops (procedural scenes at L2), same settings; the plain loop is
`LoraTrainer` stepping in one process. Ray rows include starting the trainer and its workers, and
checkpointing every `--checkpoint-every` steps; with 2 workers each step processes twice the samples
(DDP, one batch per worker), so samples/s is the comparable figure.

    .venv/bin/python bench/bench_personalize.py [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from spinml_ray.examples import make_scene  # noqa: E402
from spinml_ray.models.source import resolve  # noqa: E402
from spinml_ray.personalization import LoraTrainer, target_crops  # noqa: E402
from spinml_ray.sanitizer import sanitize_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    args = parser.parse_args()
    rows = [r for i in range(4) for r in sanitize_image(f"r{i}", *make_scene("resting", i), "L2", "L0")]
    crops = target_crops(rows)
    settings = dict(rank=4, train_text_encoder=False, resolution=32, seed=0, token="sks", class_noun="duck",
                    batch_size=2, prior_preservation=False, prior_loss_weight=1.0, steps=args.steps,
                    learning_rate=1e-3, checkpoint_every=args.checkpoint_every)
    model_dir = resolve("tiny")
    cores = os.cpu_count()

    trainer = LoraTrainer(model_dir, settings, crops, [])
    optimizer = torch.optim.AdamW(trainer.trainable(), lr=settings["learning_rate"])
    trainer.train_step(optimizer)  # warm-up
    started = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(optimizer)
    seconds = time.perf_counter() - started
    rows_out = [("plain loop, 1 process", 1, seconds, args.steps / seconds)]

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from spinml_ray.personalization import AdapterJob
    from spinml_ray.ray_layer.personalize import personalize_loop

    ray.init(num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, 2):
            config = {"job": AdapterJob(model="tiny", settings=settings, instance=crops, class_images=[],
                                        out=os.path.join(tmp, f"adapter{workers}"),
                                        state_uri=os.path.join(tmp, f"state{workers}.pt"))}
            started = time.perf_counter()
            result = TorchTrainer(
                personalize_loop, train_loop_config=config,
                scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cores / workers}),
                run_config=RunConfig(name=f"bench{workers}", storage_path=os.path.join(tmp, "runs"))).fit()
            rows_out.append((f"Ray Train, {workers} worker(s)", workers, time.perf_counter() - started,
                             result.metrics["steps_per_s"]))
    ray.shutdown()

    base = rows_out[0][3] * settings["batch_size"]
    print(f"\nDreamBooth-LoRA on the tiny preset, {args.steps} steps, batch {settings['batch_size']} per worker, 32px, "
          f"rank 4, checkpoint every {args.checkpoint_every}, {cores} CPU cores, torch {torch.__version__}\n")
    print("| mode | wall s (incl. start-up) | steps/s, training | samples/s, training | samples/s vs plain loop |")
    print("|---|---:|---:|---:|---:|")
    for name, workers, seconds, rate in rows_out:
        samples = rate * settings["batch_size"] * workers
        print(f"| {name} | {seconds:.2f} | {rate:.2f} | {samples:.2f} | {samples / base:.2f}x |")


if __name__ == "__main__":
    main()
