"""Stage 3 (Ray Train): train the specialized model on `synthetic/` only, then evaluate it.

Classification trains a classifier (`training/classifier.py`); detection a detector
(`training/detector.py`) on the images that have a trustworthy box (`autolabel.py`, run first as a
Ray task; the left-out images are counted in the metrics). `fit` trains on `training.num_workers`
workers (DDP; GPUs when the cluster has them), in a `TorchTrainer` of the request's own or in a
slot of a batch job's training fleet (`fleet.py`). Every epoch's state goes to the request's
`train_runs/`, and the weights with the best validation score (accuracy, or mAP50-95) are kept.
The model is then evaluated on the real test set when the request names one (else on the synthetic
validation split, and the metrics say which), and `model/` receives `model.pt`, `model.onnx` and
`model.torchscript.pt` (for the device), `metrics.json` and `settings.json`, committed by a manifest.
"""

from __future__ import annotations

import io
import tempfile
import time

import torch

from spinml_ray import storage
from spinml_ray.spec import RequestSpec
from spinml_ray.stages import unwrapped
from spinml_ray.stages.resume import arm_fault, die_if_armed, latest_state, save_state, state_key, training_failure
from spinml_ray.training import classifier, detector
from spinml_ray.training import pretrained as starting_weights
from spinml_ray.training.classifier import images_to_uint8, split_train_val, state_dict_bytes
from spinml_ray.training.export import ONNX_FILE, TORCHSCRIPT_FILE, export

MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
BEST_FILE = "best.pt"
RUN_ONLY = ("state_uri", "best_uri", "threads", "report_checkpoints", "fault_at", "fault_marker", "fault_kind",
            "progress")


def _detecting(config: dict) -> bool:
    return config["task"] == "detection"


def _dataset(config: dict):
    """(train images, train targets, val images, val targets): class indices, or box targets."""
    table = storage.read_committed_table(config["synthetic"])
    if _detecting(config):
        boxes = config["boxes"]
        rows = [r for r in table.select(["image_id", "label_index", "image"]).to_pylist() if r["image_id"] in boxes]
        images, targets = detector.prepare([r["image"] for r in rows], [[boxes[r["image_id"]]] for r in rows],
                                           [[r["label_index"]] for r in rows], config["image_size"])
        train_idx, val_idx = split_train_val(len(targets), config["val_fraction"], config["seed"])
        return images[train_idx], [targets[i] for i in train_idx], images[val_idx], [targets[i] for i in val_idx]
    images = images_to_uint8(table.column("image").to_pylist(), config["image_size"])
    targets = torch.tensor(table.column("label_index").to_pylist(), dtype=torch.long)
    train_idx, val_idx = split_train_val(len(targets), config["val_fraction"], config["seed"])
    return images[train_idx], targets[train_idx], images[val_idx], targets[val_idx]


def _build(config: dict, pretrained: str | None = None) -> torch.nn.Module:
    build = detector.build_detector if _detecting(config) else classifier.build_model
    return build(config["architecture"], config["num_classes"], pretrained)


def _evaluate(config: dict, model, images, targets) -> dict:
    """The task's evaluation, with `score` (accuracy, or mAP50-95) for picking the best checkpoint."""
    if _detecting(config):
        result = detector.evaluate(model, images, targets, config["num_classes"])
        return {**result, "score": result["map"] or 0.0}
    result = classifier.evaluate(model, images, targets, config["num_classes"])
    return {**result, "score": result["accuracy"] or 0.0}


def fit(config: dict) -> dict:
    """Train one request's model, resuming from its stored state; validate every epoch, keep the best.

    Runs in a Ray Train worker: the request's own `TorchTrainer` (`train_loop`, which also reports
    each epoch's state as a Ray Train checkpoint) or a slot of the training fleet (`fleet.py`). Rank 0
    keeps the newest state (with the best weights so far) at `state_uri`, and at the end writes the
    best weights to `best_uri` and this summary beside them (`best_uri` + ".json")."""
    import ray.train
    import ray.train.torch

    torch.manual_seed(config["seed"])
    torch.set_num_threads(config["threads"])
    x_train, y_train, x_val, y_val = _dataset(config)
    pretrained, pretrained_said = starting_weights.resolve(config["pretrained"], config["model"],
                                                           config["architecture"], config["task"])
    model = ray.train.torch.prepare_model(_build(config, pretrained))
    if _detecting(config):
        data, collate, train_epoch = detector.DetectionData(x_train, y_train), detector.collate, detector.train_epoch
    else:
        data, collate, train_epoch = torch.utils.data.TensorDataset(x_train, y_train), None, classifier.train_epoch
    loader = torch.utils.data.DataLoader(data, batch_size=config["batch_size"], shuffle=True, collate_fn=collate)
    loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["learning_rate"])
    device = ray.train.torch.get_device()
    plain = unwrapped(model)
    rank = ray.train.get_context().get_world_rank()
    key = state_key({k: v for k, v in config.items() if k not in RUN_ONLY})
    state = latest_state(config["state_uri"], key, STATE_FILE, str(device))
    first_epoch, best = 0, None
    if state:
        plain.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_epoch, best = state["epoch"] + 1, state["best"]
    for epoch in range(first_epoch, config["epochs"]):
        die_if_armed(config, epoch, rank)
        loss = train_epoch(model, loader, optimizer, device)
        val = _evaluate(config, plain, x_val, y_val)
        if rank == 0 and config.get("progress") is not None:
            config["progress"](epoch + 1, config["epochs"])
        if best is None or val["score"] > best["score"]:
            best = {"epoch": epoch, "score": val["score"], "weights": state_dict_bytes(plain)}
        state = {"model": plain.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "best": best}
        if not config["report_checkpoints"]:  # a fleet slot: the stored state is the checkpoint
            if rank == 0:
                save_state(state, key, config["state_uri"], None, STATE_FILE)
            continue
        metrics = {"epoch": epoch, "train_loss": loss, "val_score": val["score"], "resumed_from_epoch": first_epoch}
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_state(state, key, config["state_uri"], tmp, STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
    summary = {"best_epoch": best["epoch"], "best_val_score": best["score"], "resumed_from_epoch": first_epoch,
               "pretrained": pretrained_said}
    if rank == 0:
        storage.write_bytes(config["best_uri"], best["weights"])
        storage.write_json(config["best_uri"] + ".json", summary)
    return summary


def train_loop(config: dict) -> None:
    """The worker loop of a request's own `TorchTrainer`."""
    fit(config)


def run_train(spec: RequestSpec, paths: storage.RequestPaths, use_gpu: bool | None = None,
              fault_injection_epoch: int | None = None, model: str = "tiny", fault_kind: str = "kill",
              fleet=None, progress=None) -> dict:
    """Train, evaluate and write `model/`; returns the metrics written to `model/metrics.json`.

    On GPU clusters each worker asks for `training.gpu_fraction` of a GPU, so several requests' small
    models share a card; on CPU clusters for one CPU each. With a `fleet` (`fleet.TrainingFleet`), a one-worker training runs in one of its long-lived slots
    instead of a `TorchTrainer` of its own. `fault_injection_epoch` kills rank 0's worker once, or
    with `fault_kind="oom"` runs it out of memory there (for resilience tests)."""
    import ray

    from spinml_ray.cluster import cluster_has_gpus
    from spinml_ray.stages import StageError

    if storage.read_manifest(paths.synthetic) is None:
        raise StageError(f"{paths.synthetic}: no committed synthetic images; run the synthesize stage first")
    training = spec.training
    use_gpu = cluster_has_gpus() if use_gpu is None else use_gpu
    config = {
        "task": spec.task,
        "synthetic": paths.synthetic,
        "model": model,
        "architecture": training.architecture,
        "pretrained": training.pretrained,
        "num_classes": len(spec.labels),
        "image_size": training.image_size,
        "batch_size": training.batch_size,
        "learning_rate": training.learning_rate,
        "epochs": training.epochs,
        "val_fraction": 0.1,
        "seed": spec.synthesis.seed,
        "state_uri": storage.join(paths.train_runs, "_resume", STATE_FILE),
        "best_uri": storage.join(paths.train_runs, "_resume", BEST_FILE),
        "threads": 1,  # a fleet slot sets its own
        "report_checkpoints": False,
        "progress": progress,  # (done, total) epochs, from rank 0
    }
    labelling = {}
    if spec.task == "detection":
        label = ray.remote(label_synthetic).options(num_cpus=1, num_gpus=training.gpu_fraction if use_gpu else 0)
        config["boxes"], labelling = ray.get(label.remote(paths.synthetic, model))
        if len(config["boxes"]) < 2:
            raise StageError(f"request {spec.request_id}: only {len(config['boxes'])} synthetic image(s) have a "
                             f"trustworthy box ({labelling}); detection needs boxes from the conditioning "
                             "(target at L1/L2, or background at L2) or an auto-labeller that finds the subject")
    arm_fault(config, f"train-{spec.tenant}-{spec.request_id}", fault_injection_epoch, fault_kind)
    started = time.time()
    moved = 0
    try:
        if fleet is not None and fleet.fits(training.num_workers, training.gpu_fraction):
            moved = fleet.train(f"{spec.tenant}/{spec.request_id}", config)
        else:
            _train_alone(spec, paths, config, use_gpu)
    except Exception as exc:  # Ray wraps the worker's error; report it as this request's failure
        raise training_failure(spec.request_id, "training", exc, "training.batch_size or training.image_size") from exc
    weights = storage.read_bytes(config["best_uri"])
    best_metrics = storage.read_json(config["best_uri"] + ".json")
    trained = _build(config)
    trained.load_state_dict(torch.load(io.BytesIO(weights), map_location="cpu"))
    if spec.test_set:
        images, targets = _test_set(spec)
        evaluated_on = "real test set"
    else:
        _, _, images, targets = _dataset(config)
        evaluated_on = "synthetic validation split"
    evaluation = _evaluate(config, trained, images, targets)
    del evaluation["score"]
    metrics = {
        "request_id": spec.request_id,
        "task": spec.task,
        "labels": spec.label_names,
        "evaluated_on": evaluated_on,
        **evaluation,
        **({"boxes": labelling} if labelling else {}),
        **best_metrics,
        "train_seconds": round(time.time() - started, 2),
        **({"requeued_after_node_loss": moved} if moved else {}),
    }
    settings = {
        "task": spec.task,
        "training": training.model_dump(mode="json"),
        "privacy": spec.privacy.model_dump(mode="json"),
        "synthesis": spec.synthesis.model_dump(mode="json"),
        "labels": spec.label_names,
        "use_gpu": use_gpu,
    }
    onnx, torchscript = export(spec.task, trained, training.image_size)
    storage.write_bytes(storage.join(paths.model, MODEL_FILE), weights)
    storage.write_bytes(storage.join(paths.model, ONNX_FILE), onnx)
    storage.write_bytes(storage.join(paths.model, TORCHSCRIPT_FILE), torchscript)
    storage.write_json(storage.join(paths.model, "metrics.json"), metrics)
    storage.write_json(storage.join(paths.model, "settings.json"), settings)
    storage.commit(paths.model, [MODEL_FILE, ONNX_FILE, TORCHSCRIPT_FILE, "metrics.json", "settings.json"],
                   task=spec.task, architecture=training.architecture, image_size=training.image_size,
                   labels=spec.label_names)
    for uri in (config["state_uri"], config["best_uri"], config["best_uri"] + ".json"):
        storage.delete(uri)  # complete: a later run starts afresh
    return metrics


def _train_alone(spec: RequestSpec, paths: storage.RequestPaths, config: dict, use_gpu: bool) -> None:
    """The request's own `TorchTrainer` (any number of workers), reporting a checkpoint every epoch."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    training = spec.training
    fs, runs_path = storage.filesystem(paths.train_runs)
    TorchTrainer(
        train_loop,
        train_loop_config={**config, "report_checkpoints": True},
        scaling_config=ScalingConfig(num_workers=training.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"GPU": training.gpu_fraction} if use_gpu
                                     else {"CPU": config["threads"]}),
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
    from spinml_ray.segmentation import LazySegmenter

    table = storage.read_committed_table(synthetic)
    columns = [c for c in ("image_id", "box", "image", "attention") if c in table.column_names]  # older tables: no maps
    rows = table.select(columns).to_pylist()
    segmenter = LazySegmenter(model)
    segment = segmenter if any(r["box"] is None for r in rows) and segmenter.available else None
    return trusted_boxes(rows, segment)


def _test_set(spec: RequestSpec):
    size = spec.training.image_size
    if spec.task == "detection":
        images, boxes, labels = detector.load_test_set(spec.test_set, spec.label_names)
        return detector.prepare(images, boxes, labels, size)
    images, targets = classifier.load_image_folder(spec.test_set, spec.label_names)
    return images_to_uint8(images, size), torch.tensor(targets)
