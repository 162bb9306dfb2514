"""The tasks a request can train for, each a module exposing the same functions.

| function | what it does |
|---|---|
| `build(architecture, num_classes, pretrained)` | the model, from the starting weights when given |
| `dataset(table, job)` | (train inputs, train targets, val inputs, val targets) from the synthetic table |
| `data(inputs, targets)`, `collate` | the torch Dataset and its collate function (None: the default) |
| `train_epoch(model, loader, optimizer, device)` | one pass; the mean loss |
| `validate(model, inputs, targets, num_classes)` | the evaluation, with `score` for picking the best epoch |
| `test_set(uri, labels, size)` | the request's real test set, as inputs and targets |
| `export(model, image_size)` | (ONNX bytes, TorchScript bytes) for the device |
"""

from __future__ import annotations

from types import ModuleType

from spinml_ray.training import classifier, detector

TASKS: dict[str, ModuleType] = {"classification": classifier, "detection": detector}


def task_of(name: str) -> ModuleType:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task {name!r} is not one of {sorted(TASKS)}") from None
