"""Training state that survives a dead worker and a re-run job.

A worker can die before the runtime registers its last report, and a whole job can be killed; so each
training loop keeps its newest state both in the checkpoint it reports and at a fixed URI in storage.
On start, `latest_state` takes the checkpoint the runtime hands back, else the stored copy, and only if
its key (a digest of the settings and inputs) matches this run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass

import torch

from spinml_ray import storage
from spinml_ray.errors import StageError


def state_key(settings: dict, *blobs: bytes) -> str:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for blob in blobs:
        digest.update(hashlib.sha256(blob).digest())
    return digest.hexdigest()


def latest_state(state_uri: str, key: str, device: str = "cpu", checkpoint: bytes | None = None) -> dict | None:
    """The state to resume from: `checkpoint` (what the runtime handed back) if given, else the copy
    at `state_uri`; None when neither exists or its key is not `key`."""
    if checkpoint is None:
        if not storage.exists(state_uri):
            return None
        checkpoint = storage.read_bytes(state_uri)
    state = torch.load(io.BytesIO(checkpoint), map_location=device, weights_only=False)
    return state if state.get("key") == key else None


def save_state(state: dict, key: str, state_uri: str) -> bytes:
    """Write `state` (with its key) atomically to `state_uri`; returns the bytes, for a checkpoint."""
    buffer = io.BytesIO()
    torch.save({**state, "key": key}, buffer)
    storage.write_bytes(state_uri, buffer.getvalue())
    return buffer.getvalue()


IMPOSSIBLE_BYTES = 1 << 50  # 1 PiB: more than any machine has, so the allocator refuses it


@dataclass(frozen=True)
class Fault:
    """An injected fault for resilience tests: at position `at`, rank 0 dies once ("kill"), or every
    time asks the allocator for more memory than exists ("oom": the real out-of-memory error)."""

    at: int
    marker: str  # exists once the kill has happened, so the restarted worker goes on
    kind: str = "kill"


def arm_fault(name: str, at: int | None, kind: str = "kill") -> Fault | None:
    if at is None:
        return None
    marker = os.path.join(tempfile.gettempdir(), f"spinml-fault-{name}")
    if os.path.exists(marker):
        os.remove(marker)
    return Fault(at, marker, kind)


def die_if_armed(fault: Fault | None, position: int, rank: int) -> None:
    """Apply an armed fault when its position is reached."""
    if fault is None or rank != 0 or position != fault.at:
        return
    if fault.kind == "oom":
        torch.empty(IMPOSSIBLE_BYTES, dtype=torch.uint8)
    elif not os.path.exists(fault.marker):
        open(fault.marker, "w").close()
        os._exit(1)


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` (or what it wraps, as Ray's errors quote the worker's) is an out-of-memory error."""
    text = f"{type(error).__name__}: {error}"
    return any(sign in text for sign in ("OutOfMemoryError", "out of memory", "can't allocate memory"))


def training_failure(request_id: str, what: str, error: BaseException, lower: str) -> StageError:
    """The StageError for a failed training run: out-of-memory errors say which settings to lower
    (`lower`) and end with the allocator's own last line; others quote the error."""
    if not is_out_of_memory(error):
        return StageError(f"request {request_id}: {what} failed: {error}")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    last = lines[-1][:300] if lines else type(error).__name__
    return StageError(f"request {request_id}: {what} ran out of memory; lower {lower}, "
                      f"or give its workers more memory ({last})")
