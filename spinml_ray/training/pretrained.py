"""Where a specialized model's starting weights come from: `training.pretrained` of a request.

- `auto` (the default): the model source's `classifiers/{architecture}.pth` (`detectors/` to detect)
  when it ships one; else torchvision's own weights for the architecture (ImageNet for classifiers,
  COCO for detectors) from torch's hub cache (`$TORCH_HOME/hub/checkpoints`), downloaded into it
  where the node has internet; else random initialisation, with a warning in the worker's log and
  the reason in `metrics.json` (`"pretrained": "none (offline)"`). Offline means `HF_HUB_OFFLINE=1`
  or `SPINML_OFFLINE=1`: the project's offline switch, so no worker waits on a network that is not
  there.
- `none`: random initialisation.
- a URI (inside the request's folder, like every URI a request names): a torchvision state dict of
  the architecture, loaded with `weights_only` (no pickled code runs).

`resolve` returns the weights to load (a local path or URI, or None) and the words `metrics.json`
records; `load_state_dict` reads them. The model builders drop what does not fit (the 1000-way
ImageNet head, COCO's 91 classes).
"""

from __future__ import annotations

import io
import logging
import os

import torch

from spinml_ray import storage

log = logging.getLogger(__name__)

AUTO, NONE = "auto", "none"


def offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HF_HUB_OFFLINE", "SPINML_OFFLINE"))


def _shipped(model_source: str, architecture: str, task: str) -> str | None:
    from spinml_ray.models.source import resolve_part

    folder = resolve_part(model_source, "detectors" if task == "detection" else "classifiers")
    path = os.path.join(folder, f"{architecture}.pth") if folder else None
    return path if path and os.path.exists(path) else None


def _torchvision(architecture: str) -> tuple[str | None, str]:
    import torchvision

    weights = torchvision.models.get_model_weights(architecture).DEFAULT
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    name = f"torchvision {architecture} {weights.name}"
    if os.path.exists(cached):
        return cached, name
    if offline():
        return None, "none (offline)"
    try:
        weights.get_state_dict(progress=False)  # into torch's hub cache
    except Exception as exc:  # no route, proxy, disk: train anyway, and say so
        return None, f"none (download failed: {type(exc).__name__})"
    return (cached, name) if os.path.exists(cached) else (None, "none (download failed)")


def resolve(setting: str, model_source: str, architecture: str, task: str = "classification") -> tuple[str | None, str]:
    """(weights to load or None, what `metrics.json` says) for `training.pretrained`."""
    if setting == NONE:
        return None, NONE
    if setting != AUTO:
        return setting, setting
    shipped = _shipped(model_source, architecture, task)
    if shipped:
        return shipped, f"model source {'detectors' if task == 'detection' else 'classifiers'}/{architecture}.pth"
    weights, said = _torchvision(architecture)
    if weights is None:
        log.warning("no pretrained %s weights (%s): training starts from random weights", architecture, said)
    return weights, said


def load_state_dict(uri: str) -> dict:
    """A state dict from a local path or URI; tensors only (`weights_only`)."""
    state = torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{uri}: not a state dict")
    return state
