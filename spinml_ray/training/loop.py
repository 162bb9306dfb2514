"""Training one request's specialized model: a plain function that a unit test runs without a cluster.

`fit(job, workers)` trains, validates every epoch, keeps the best weights, and resumes from the job's
stored state. What a distributed runtime supplies (this worker's rank, its device, wrapping the model
and the data loader for DDP, the state it hands back after a restart, reporting a checkpoint) comes
in `Workers`; its defaults are one process on the CPU, and the Ray layer (`ray_layer/train.py`) fills
it from Ray Train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from spinml_ray import storage
from spinml_ray.training import resume
from spinml_ray.training.classifier import state_dict_bytes
from spinml_ray.training.job import TrainingJob
from spinml_ray.training.pretrained import resolve as starting_weights
from spinml_ray.training.tasks import task_of

STATE_FILE = "train_state.pt"


def unwrapped(model):
    """The model inside a DistributedDataParallel wrapper (`ray.train.torch.prepare_model`), else itself."""
    return model.module if hasattr(model, "module") else model


def _same(value, **_):
    return value


@dataclass
class Workers:
    """What a distributed runtime supplies to a training loop; the defaults are one local process."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    prepare_model: Callable = _same  # wraps the model for data parallelism
    prepare_loader: Callable = _same  # shards the data loader
    checkpoint: bytes | None = None  # the newest state the runtime hands back after a restart
    # report(metrics, {file name: bytes} or None): the state as the runtime's checkpoint (rank 0 passes it)
    report: Callable[[dict, dict | None], None] | None = None


def fit(job: TrainingJob, workers: Workers = Workers()) -> dict:
    """Train one request's model, resuming from its stored state; validate every epoch, keep the best.

    Rank 0 keeps the newest state (with the best weights so far) at `job.run.state_uri`, reports it
    through `workers.report` when the job asks for checkpoints, and at the end writes the best weights
    to `job.run.best_uri` and this summary beside them (`best_uri` + ".json")."""
    run, task = job.run, task_of(job.task)
    torch.manual_seed(job.seed)
    torch.set_num_threads(run.threads)
    x_train, y_train, x_val, y_val = task.dataset(storage.read_committed_table(job.synthetic), job)
    pretrained, pretrained_said = starting_weights(job.pretrained, job.model, job.architecture, job.task)
    model = workers.prepare_model(task.build(job.architecture, job.num_classes, pretrained))
    loader = torch.utils.data.DataLoader(task.data(x_train, y_train), batch_size=job.batch_size, shuffle=True,
                                         collate_fn=task.collate)
    loader = workers.prepare_loader(loader, move_to_device=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=job.learning_rate)
    plain = unwrapped(model)
    key = resume.state_key(job.identity())
    state = resume.latest_state(run.state_uri, key, workers.device, workers.checkpoint)
    first_epoch, best = 0, None
    if state:
        plain.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_epoch, best = state["epoch"] + 1, state["best"]
    for epoch in range(first_epoch, job.epochs):
        resume.die_if_armed(run.fault, epoch, workers.rank)
        loss = task.train_epoch(model, loader, optimizer, workers.device)
        val = task.validate(plain, x_val, y_val, job.num_classes)
        if workers.rank == 0 and run.progress is not None:
            run.progress(epoch + 1, job.epochs)
        if best is None or val["score"] > best["score"]:
            best = {"epoch": epoch, "score": val["score"], "weights": state_dict_bytes(plain)}
        state = {"model": plain.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "best": best}
        saved = resume.save_state(state, key, run.state_uri) if workers.rank == 0 else None
        if run.report_checkpoints and workers.report is not None:
            workers.report({"epoch": epoch, "train_loss": loss, "val_score": val["score"],
                            "resumed_from_epoch": first_epoch}, saved and {STATE_FILE: saved})
    summary = {"best_epoch": best["epoch"], "best_val_score": best["score"], "resumed_from_epoch": first_epoch,
               "pretrained": pretrained_said}
    if workers.rank == 0:
        storage.write_bytes(run.best_uri, best["weights"])
        storage.write_json(run.best_uri + ".json", summary)
    return summary
