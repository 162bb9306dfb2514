"""A training job: what identifies it (and so which stored state it may resume) apart from one run's options.

`TrainingJob`'s own fields are its identity: settings and inputs whose change makes a stored state
belong to another training. `RunOptions` holds what one run of it may choose freely (where its state
lives, threads, whether to report checkpoints, progress, an injected fault); a new field goes in one or
the other, and only the first restarts a resumed training.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

from spinml_ray.training.resume import Fault


@dataclass(frozen=True)
class RunOptions:
    state_uri: str  # the newest state (with the best weights so far), for resuming
    best_uri: str  # the best weights at the end, and its summary at `best_uri` + ".json"
    threads: int = 1  # torch threads (a fleet slot sets its own)
    report_checkpoints: bool = False  # report the state as the runtime's checkpoint every epoch
    progress: Callable[[int, int], None] | None = None  # (done, total) epochs, called on rank 0
    fault: Fault | None = None  # fault injection for resilience tests


@dataclass(frozen=True)
class TrainingJob:
    task: str  # "classification" | "detection" (`training.tasks`)
    synthetic: str  # the committed synthetic table it trains on
    model: str  # the model source (pretrained weights it may ship)
    architecture: str
    pretrained: str
    num_classes: int
    image_size: int
    batch_size: int
    learning_rate: float
    epochs: int
    seed: int
    val_fraction: float = 0.1
    boxes: dict[str, list[float]] | None = None  # detection: the trusted box of each image id that has one
    run: RunOptions = field(default=None, compare=False)  # type: ignore[assignment]

    def identity(self) -> dict:
        """The fields a stored state must match to be resumed: every field but `run`."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "run"}
