"""What a trained request's user receives: the best weights evaluated, exported and committed in `model/`.

`model.pt` (the state dict), `model.onnx` and `model.torchscript.pt` for the device, `metrics.json`
(evaluated on the real test set when the request names one, else on the synthetic validation split,
and the metrics say which) and `settings.json`, committed by a manifest; then the job's resume state
is deleted, so a later run starts afresh.
"""

from __future__ import annotations

import io

import torch

from spinml_ray import storage
from spinml_ray.spec import RequestSpec
from spinml_ray.training.export import ONNX_FILE, TORCHSCRIPT_FILE
from spinml_ray.training.job import TrainingJob
from spinml_ray.training.tasks import task_of

MODEL_FILE = "model.pt"


def trained_model(job: TrainingJob) -> torch.nn.Module:
    """The job's best weights (at `job.run.best_uri`) in a model of its architecture, on the CPU."""
    model = task_of(job.task).build(job.architecture, job.num_classes)
    model.load_state_dict(torch.load(io.BytesIO(storage.read_bytes(job.run.best_uri)), map_location="cpu"))
    return model


def deliver(spec: RequestSpec, paths: storage.RequestPaths, job: TrainingJob, extra: dict, use_gpu: bool) -> dict:
    """Evaluate the job's best model, write and commit `model/`; returns the metrics written.

    `extra`: what the run adds to the metrics (its seconds, the labelling's counts, moves after a lost node)."""
    task = task_of(job.task)
    weights = storage.read_bytes(job.run.best_uri)
    trained = trained_model(job)
    if spec.test_set:
        images, targets = task.test_set(spec.test_set, spec.label_names, job.image_size)
        evaluated_on = "real test set"
    else:
        _, _, images, targets = task.dataset(storage.read_committed_table(job.synthetic), job)
        evaluated_on = "synthetic validation split"
    evaluation = task.validate(trained, images, targets, job.num_classes)
    del evaluation["score"]
    metrics = {
        "request_id": spec.request_id,
        "task": spec.task,
        "labels": spec.label_names,
        "evaluated_on": evaluated_on,
        **evaluation,
        **storage.read_json(job.run.best_uri + ".json"),
        **extra,
    }
    settings = {
        "task": spec.task,
        "training": spec.training.model_dump(mode="json"),
        "privacy": spec.privacy.model_dump(mode="json"),
        "synthesis": spec.synthesis.model_dump(mode="json"),
        "labels": spec.label_names,
        "use_gpu": use_gpu,
    }
    onnx, torchscript = task.export(trained, job.image_size)
    storage.write_bytes(storage.join(paths.model, MODEL_FILE), weights)
    storage.write_bytes(storage.join(paths.model, ONNX_FILE), onnx)
    storage.write_bytes(storage.join(paths.model, TORCHSCRIPT_FILE), torchscript)
    storage.write_json(storage.join(paths.model, "metrics.json"), metrics)
    storage.write_json(storage.join(paths.model, "settings.json"), settings)
    storage.commit(paths.model, [MODEL_FILE, ONNX_FILE, TORCHSCRIPT_FILE, "metrics.json", "settings.json"],
                   task=spec.task, architecture=job.architecture, image_size=job.image_size, labels=spec.label_names)
    for uri in (job.run.state_uri, job.run.best_uri, job.run.best_uri + ".json"):
        storage.delete(uri)  # complete: a later run starts afresh
    return metrics
