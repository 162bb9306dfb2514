"""Training state that survives a dead worker and a re-run job.

A Ray Train worker can die before the controller registers its last report, and a whole job can be
killed; so each training loop keeps its newest state both in the reported checkpoint and at a fixed
URI in storage. On start, `latest_state` takes the checkpoint Ray Train hands back, else the stored
copy, and only if its key (a digest of the settings and inputs) matches this run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile

import torch

from spinml_ray import storage


def state_key(settings: dict, *blobs: bytes) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for blob in blobs:
        digest.update(hashlib.sha256(blob).digest())
    return digest.hexdigest()


def latest_state(state_uri: str, key: str, filename: str, device: str = "cpu") -> dict | None:
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            with open(os.path.join(directory, filename), "rb") as handle:
                data = handle.read()
    elif storage.exists(state_uri):
        data = storage.read_bytes(state_uri)
    else:
        return None
    state = torch.load(io.BytesIO(data), map_location=device, weights_only=False)
    return state if state.get("key") == key else None


def save_state(state: dict, key: str, state_uri: str, directory: str, filename: str) -> None:
    """Write `state` into the checkpoint folder `directory` and, atomically, to `state_uri`."""
    buffer = io.BytesIO()
    torch.save({**state, "key": key}, buffer)
    with open(os.path.join(directory, filename), "wb") as handle:
        handle.write(buffer.getvalue())
    storage.write_bytes(state_uri, buffer.getvalue())


def arm_fault(config: dict, name: str, at: int | None) -> None:
    """Fault injection for resilience tests: rank 0 will die once when training reaches `at`."""
    if at is None:
        return
    marker = os.path.join(tempfile.gettempdir(), f"spinml-fault-{name}")
    if os.path.exists(marker):
        os.remove(marker)
    config.update(fault_at=at, fault_marker=marker)


def die_if_armed(config: dict, position: int, rank: int) -> None:
    """Kill this worker process (as if killed) the first time an armed fault's position is reached."""
    marker = config.get("fault_marker")
    if marker and rank == 0 and position == config["fault_at"] and not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)
