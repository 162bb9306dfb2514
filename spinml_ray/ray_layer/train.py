"""Stage 3 (Ray Train): train the specialized model on `synthetic/` only, then deliver it.

The training itself is `training/loop.fit`, a plain function; this module runs it in Ray Train
workers (`training.num_workers`, DDP; GPUs when the cluster has them), in a `TorchTrainer` of the
request's own or in a slot of a batch job's training fleet (`fleet.py`), and then delivers the best
model (`training/delivery.py`). Detection first finds which synthetic images have a trustworthy box
(`autolabel.py`, as a Ray task, with the model source's SAM when there is one); the left-out images
are counted in the metrics.
"""

from __future__ import annotations

import os
import tempfile
import time

from spinml_ray import storage
from spinml_ray.errors import StageError
from spinml_ray.spec import RequestSpec
from spinml_ray.training.delivery import deliver
from spinml_ray.training.job import RunOptions, TrainingJob
from spinml_ray.training.loop import STATE_FILE, Workers, fit
from spinml_ray.training.resume import arm_fault, training_failure

BEST_FILE = "best.pt"


def ray_workers(state_file: str = STATE_FILE) -> Workers:
    """`Workers` of the calling Ray Train worker: its rank, device, DDP wrapping, the state file of the
    checkpoint Ray Train hands back after a restart, and reports."""
    import ray.train
    import ray.train.torch

    def report(metrics: dict, files: dict | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in (files or {}).items():
                with open(os.path.join(tmp, name), "wb") as handle:
                    handle.write(data)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if files else None)

    context, checkpoint, data = ray.train.get_context(), ray.train.get_checkpoint(), None
    if checkpoint:
        with checkpoint.as_directory() as directory, open(os.path.join(directory, state_file), "rb") as handle:
            data = handle.read()
    return Workers(rank=context.get_world_rank(), world_size=context.get_world_size(),
                   device=str(ray.train.torch.get_device()), prepare_model=ray.train.torch.prepare_model,
                   prepare_loader=ray.train.torch.prepare_data_loader, checkpoint=data, report=report)


def train_loop(config: dict) -> None:
    """The worker loop of a request's own `TorchTrainer` (`config["job"]`: the `TrainingJob`)."""
    fit(config["job"], ray_workers())


def training_job(spec: RequestSpec, paths: storage.RequestPaths, model: str, progress=None,
                 boxes: dict | None = None, fault=None) -> TrainingJob:
    training = spec.training
    resume_dir = storage.join(paths.train_runs, "_resume")
    return TrainingJob(
        task=spec.task, synthetic=paths.synthetic, model=model, architecture=training.architecture,
        pretrained=training.pretrained, num_classes=len(spec.labels), image_size=training.image_size,
        batch_size=training.batch_size, learning_rate=training.learning_rate, epochs=training.epochs,
        seed=spec.synthesis.seed, boxes=boxes,
        run=RunOptions(state_uri=storage.join(resume_dir, STATE_FILE), best_uri=storage.join(resume_dir, BEST_FILE),
                       progress=progress, fault=fault),
    )


def run_train(spec: RequestSpec, paths: storage.RequestPaths, use_gpu: bool | None = None,
              fault_injection_epoch: int | None = None, model: str = "tiny", fault_kind: str = "kill",
              fleet=None, progress=None) -> dict:
    """Train, evaluate and write `model/`; returns the metrics written to `model/metrics.json`.

    On GPU clusters each worker asks for `training.gpu_fraction` of a GPU, so several requests' small
    models share a card; on CPU clusters for one CPU each. With a `fleet` (`fleet.TrainingFleet`), a
    one-worker training runs in one of its long-lived slots instead of a `TorchTrainer` of its own.
    `fault_injection_epoch` kills rank 0's worker once, or with `fault_kind="oom"` runs it out of
    memory there (for resilience tests)."""
    import ray

    from spinml_ray.ray_layer.cluster import cluster_has_gpus

    if storage.read_manifest(paths.synthetic) is None:
        raise StageError(f"{paths.synthetic}: no committed synthetic images; run the synthesize stage first")
    training = spec.training
    use_gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    boxes, labelling = None, {}
    if spec.task == "detection":
        label = ray.remote(label_synthetic).options(num_cpus=1, num_gpus=training.gpu_fraction if use_gpu else 0)
        boxes, labelling = ray.get(label.remote(paths.synthetic, model))
        if len(boxes) < 2:
            raise StageError(f"request {spec.request_id}: only {len(boxes)} synthetic image(s) have a "
                             f"trustworthy box ({labelling}); detection needs boxes from the conditioning "
                             "(target at L1/L2, or background at L2) or an auto-labeller that finds the subject")
    fault = arm_fault(f"train-{spec.tenant}-{spec.request_id}", fault_injection_epoch, fault_kind)
    job = training_job(spec, paths, model, progress, boxes, fault)
    started = time.time()
    moved = 0
    try:
        if fleet is not None and fleet.fits(training.num_workers, training.gpu_fraction):
            moved = fleet.train(f"{spec.tenant}/{spec.request_id}", job)
        else:
            _train_alone(spec, paths, job, use_gpu)
    except Exception as exc:  # Ray wraps the worker's error; report it as this request's failure
        raise training_failure(spec.request_id, "training", exc, "training.batch_size or training.image_size") from exc
    extra = {**({"boxes": labelling} if labelling else {}), "train_seconds": round(time.time() - started, 2),
             **({"requeued_after_node_loss": moved} if moved else {})}
    return deliver(spec, paths, job, extra, use_gpu)


def _train_alone(spec: RequestSpec, paths: storage.RequestPaths, job: TrainingJob, use_gpu: bool) -> None:
    """The request's own `TorchTrainer` (any number of workers), reporting a checkpoint every epoch."""
    from dataclasses import replace

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    training = spec.training
    fs, runs_path = storage.filesystem(paths.train_runs)
    TorchTrainer(
        train_loop,
        train_loop_config={"job": replace(job, run=replace(job.run, report_checkpoints=True))},
        scaling_config=ScalingConfig(num_workers=training.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": training.gpu_fraction} if use_gpu
                                     else {"CPU": job.run.threads}),
        run_config=RunConfig(
            name=f"{spec.request_id}-{int(time.time())}",
            storage_path=runs_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_score", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=3),
        ),
    ).fit()


def label_synthetic(synthetic: str, model: str) -> tuple[dict[str, list[float]], dict[str, int]]:
    """`autolabel.trusted_boxes` over a committed synthetic table, with the model source's SAM (if any)."""
    from spinml_ray.autolabel import trusted_boxes
    from spinml_ray.models.source import sam_loader
    from spinml_ray.segmentation import LazySegmenter

    table = storage.read_committed_table(synthetic)
    columns = [c for c in ("image_id", "box", "image", "attention") if c in table.column_names]  # older tables: no maps
    rows = table.select(columns).to_pylist()
    segmenter = LazySegmenter(sam_loader(model))
    segment = segmenter if any(r["box"] is None for r in rows) and segmenter.available else None
    return trusted_boxes(rows, segment)
