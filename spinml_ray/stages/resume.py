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


def save_state(state: dict, key: str, state_uri: str, directory: str | None, filename: str) -> None:
    """Write `state` atomically to `state_uri` and, when given, into the checkpoint folder `directory`."""
    buffer = io.BytesIO()
    torch.save({**state, "key": key}, buffer)
    if directory:
        with open(os.path.join(directory, filename), "wb") as handle:
            handle.write(buffer.getvalue())
    storage.write_bytes(state_uri, buffer.getvalue())


IMPOSSIBLE_BYTES = 1 << 50  # 1 PiB: more than any machine has, so the allocator refuses it


def arm_fault(config: dict, name: str, at: int | None, kind: str = "kill") -> None:
    """Fault injection for resilience tests: when training reaches `at`, rank 0 dies once ("kill"),
    or every time asks the allocator for more memory than exists ("oom": the real out-of-memory error)."""
    if at is None:
        return
    marker = os.path.join(tempfile.gettempdir(), f"spinml-fault-{name}")
    if os.path.exists(marker):
        os.remove(marker)
    config.update(fault_at=at, fault_marker=marker, fault_kind=kind)


def die_if_armed(config: dict, position: int, rank: int) -> None:
    """Apply an armed fault (see `arm_fault`) when its position is reached."""
    marker = config.get("fault_marker")
    if not marker or rank != 0 or position != config["fault_at"]:
        return
    if config["fault_kind"] == "oom":
        torch.empty(IMPOSSIBLE_BYTES, dtype=torch.uint8)
    elif not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` (or what it wraps, as Ray's errors quote the worker's) is an out-of-memory error."""
    text = f"{type(error).__name__}: {error}"
    return any(sign in text for sign in ("OutOfMemoryError", "out of memory", "can't allocate memory"))


def training_failure(request_id: str, what: str, error: BaseException, lower: str):
    """The StageError for a failed Ray Train run: out-of-memory errors say which settings to lower
    (`lower`) and end with the allocator's own last line; others quote the error."""
    from spinml_ray.stages import StageError

    if not is_out_of_memory(error):
        return StageError(f"request {request_id}: {what} failed: {error}")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1][:300] if lines else type(error).__name__
    return StageError(f"request {request_id}: {what} ran out of memory; lower {lower}, "
                      f"or give its workers more memory ({last})")
