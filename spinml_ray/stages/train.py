"""Stage 3 (Ray Train): train the specialized classifier on `synthetic/` only, then evaluate it.

A `TorchTrainer` runs `train_loop` on `training.num_workers` workers (DDP; GPUs when the cluster has
them). Every epoch reports metrics with a checkpoint to the request's `train_runs/`; the checkpoint
with the best validation accuracy is kept. The model is then evaluated on the real test set when the
request names one (else on the synthetic validation split, and the metrics say which), and
`model/` receives `model.pt`, `model.onnx` and `model.torchscript.pt` (for the device), `metrics.json`
and `settings.json`, committed by a manifest.
"""

from __future__ import annotations

import io
import os
import tempfile
import time

import torch

from spinml_ray import storage
from spinml_ray.spec import RequestSpec
from spinml_ray.stages.resume import arm_fault, die_if_armed, latest_state, save_state, state_key
from spinml_ray.training.export import ONNX_FILE, TORCHSCRIPT_FILE, to_onnx, to_torchscript
from spinml_ray.training.classifier import (
    build_model,
    evaluate,
    pretrained_weights,
    images_to_uint8,
    load_image_folder,
    split_train_val,
    state_dict_bytes,
    train_epoch,
)

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"


def _dataset(config: dict):
    table = storage.read_committed_table(config["synthetic"])
    images = images_to_uint8(table.column("image").to_pylist(), config["image_size"])
    targets = torch.tensor(table.column("label_index").to_pylist(), dtype=torch.long)
    train_idx, val_idx = split_train_val(len(targets), config["val_fraction"], config["seed"])
    return images[train_idx], targets[train_idx], images[val_idx], targets[val_idx]


def train_loop(config: dict) -> None:
    """Ray Train worker loop: train, validate, report a checkpoint every epoch; resume when restarted."""
    import ray.train
    import ray.train.torch

    torch.manual_seed(config["seed"])
    x_train, y_train, x_val, y_val = _dataset(config)
    pretrained = pretrained_weights(config["model"], config["architecture"])
    model = ray.train.torch.prepare_model(build_model(config["architecture"], config["num_classes"], pretrained))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train, y_train), batch_size=config["batch_size"], shuffle=True
    )
    loader = ray.train.torch.prepare_data_loader(loader)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    device = ray.train.torch.get_device()
    plain = model.module if hasattr(model, "module") else model
    rank = ray.train.get_context().get_world_rank()
    key = state_key({k: v for k, v in config.items() if k != "state_uri"})
    state = latest_state(config["state_uri"], key, STATE_FILE, str(device))
    first_epoch = 0
    if state:
        plain.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_epoch = state["epoch"] + 1
    for epoch in range(first_epoch, config["epochs"]):
        die_if_armed(config, epoch, rank)
        loss = train_epoch(model, loader, optimizer, device)
        val = evaluate(plain, x_val, y_val, config["num_classes"])
        metrics = {"epoch": epoch, "train_loss": loss, "val_accuracy": val["accuracy"] or 0.0,
                   "resumed_from_epoch": first_epoch}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                with open(os.path.join(tmp, MODEL_FILE), "wb") as handle:
                    handle.write(state_dict_bytes(plain))
                save_state({"model": plain.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch},
                           key, config["state_uri"], tmp, STATE_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def run_train(spec: RequestSpec, paths: storage.RequestPaths, use_gpu: bool | None = None,
              fault_injection_epoch: int | None = None, model: str = "tiny") -> dict:
    """Train, evaluate and write `model/`; returns the metrics written to `model/metrics.json`.

    On GPU clusters each worker asks for `training.gpu_fraction` of a GPU, so several requests' small
    models share a card. `fault_injection_epoch` kills rank 0's worker once (for resilience tests)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from spinml_ray.cluster import cluster_has_gpus

    from spinml_ray.stages import StageError

    if storage.read_manifest(paths.synthetic) is None:
        raise StageError(f"{paths.synthetic}: no committed synthetic images; run the synthesize stage first")
    training = spec.training
    config = {
        "synthetic": paths.synthetic,
        "model": model,
        "architecture": training.architecture,
        "num_classes": len(spec.labels),
        "image_size": training.image_size,
        "batch_size": training.batch_size,
        "learning_rate": training.learning_rate,
        "epochs": training.epochs,
        "val_fraction": 0.1,
        "seed": spec.synthesis.seed,
        "state_uri": storage.join(paths.train_runs, "_resume", STATE_FILE),
    }
    arm_fault(config, f"train-{spec.tenant}-{spec.request_id}", fault_injection_epoch)
    use_gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    fs, runs_path = storage.filesystem(paths.train_runs)
    started = time.time()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=training.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": training.gpu_fraction} if use_gpu else None),
        run_config=RunConfig(
            name=f"{spec.request_id}-{int(started)}",
            storage_path=runs_path,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_accuracy", checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=3),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps the worker's error; report it as this request's failure
        raise StageError(f"request {spec.request_id}: training failed: {exc}") from exc
    best = result.best_checkpoints[0] if result.best_checkpoints else (result.checkpoint, result.metrics)
    checkpoint, best_metrics = best
    with checkpoint.as_directory() as directory:
        with open(os.path.join(directory, MODEL_FILE), "rb") as handle:
            weights = handle.read()
    model = build_model(training.architecture, len(spec.labels))
    model.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu"))
    if spec.test_set:
        images, targets = load_image_folder(spec.test_set, spec.label_names)
        evaluation = evaluate(model, images_to_uint8(images, training.image_size), torch.tensor(targets), len(spec.labels))
        evaluated_on = "real test set"
    else:
        _, _, x_val, y_val = _dataset(config)
        evaluation = evaluate(model, x_val, y_val, len(spec.labels))
        evaluated_on = "synthetic validation split"
    metrics = {
        "request_id": spec.request_id,
        "labels": spec.label_names,
        "evaluated_on": evaluated_on,
        **evaluation,
        "best_epoch": best_metrics.get("epoch"),
        "best_val_accuracy": best_metrics.get("val_accuracy"),
        "resumed_from_epoch": (result.metrics or {}).get("resumed_from_epoch", 0),
        "train_seconds": round(time.time() - started, 2),
    }
    settings = {
        "training": training.model_dump(mode="json"),
        "privacy": spec.privacy.model_dump(mode="json"),
        "synthesis": spec.synthesis.model_dump(mode="json"),
        "labels": spec.label_names,
        "use_gpu": use_gpu,
    }
    storage.write_bytes(storage.join(paths.model, MODEL_FILE), weights)
    storage.write_bytes(storage.join(paths.model, ONNX_FILE), to_onnx(model, training.image_size))
    storage.write_bytes(storage.join(paths.model, TORCHSCRIPT_FILE), to_torchscript(model, training.image_size))
    storage.write_json(storage.join(paths.model, "metrics.json"), metrics)
    storage.write_json(storage.join(paths.model, "settings.json"), settings)
    storage.commit(paths.model, [MODEL_FILE, ONNX_FILE, TORCHSCRIPT_FILE, "metrics.json", "settings.json"],
                   architecture=training.architecture, image_size=training.image_size, labels=spec.label_names)
    storage.delete(config["state_uri"])  # complete: a later run starts afresh
    return metrics
