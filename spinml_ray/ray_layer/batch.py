"""Many requests in one job: shared synthesis service, overlapping stages, per-request status, re-runs.

`run_batch` takes request URIs (from a manifest file, or found under a storage prefix), deploys the
synthesis application once for all of them, and runs up to `max_concurrent` requests at a time, each
through its remaining stages, so one request trains while others generate or sanitize. Models train
in the job's training fleet (`fleet.py`: long-lived Ray Train slots, one per concurrent request, each
with a GPU share or its share of the CPUs), so a small model does not pay a trainer's start; a slot
is started for a request while it is synthesized, so that start overlaps synthesis. A stage whose
output is already committed is skipped, so re-running a job finishes what is missing and repeats
nothing; its summary still gives the seconds each skipped stage took when it ran. One request's
failure (bad input, a crash) is recorded in its status and the others go on.

Each request's `status.json` (stage, state, seconds, error) is rewritten atomically as it moves; the
job logs one line per change, prefixed with the progress so far ("[3/10 done, 1 failed]"), and ends
with a summary table, also stored as `_batches/{name}.json`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import yaml

from spinml_ray import storage
from spinml_ray.ray_layer.cluster import failure_reason
from spinml_ray.ray_layer.pipeline import STAGE_NAMES, STAGES, request_paths, run_request, skipped
from spinml_ray.resources import TRAINING_GPU_FRACTION, Fleet, ResourcePlan
from spinml_ray.spec import SpecError, load_request

log = logging.getLogger(__name__)
REQUEST_SUFFIXES = (".yaml", ".yml", ".json")


def list_requests(source: str) -> list[str]:
    """Request URIs from a manifest file (a YAML/JSON list, or a mapping with `requests:`), or every
    request document under a storage prefix."""
    if storage.is_file(source):
        document = yaml.safe_load(storage.read_bytes(source))
        uris = document.get("requests") if isinstance(document, dict) else document
        if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
            raise SpecError(f"{source}: a manifest is a list of request URIs (or {{requests: [...]}})")
        try:  # a manifest names requests in its own folder only
            return [storage.confine(storage.parent(source), u, f"{source}: request") for u in uris]
        except storage.OutsidePrefix as exc:
            raise SpecError(str(exc)) from None
    found = [u for u in storage.list_files(source, recursive=True) if u.endswith(REQUEST_SUFFIXES)]
    if not found:
        raise SpecError(f"{source}: no manifest file and no request documents under it")
    return found


def retried(result: dict) -> str | None:
    """What a completed stage had to do again (from its summary), for the status table; None if nothing."""
    notes = []
    if result.get("resent"):
        notes.append(f"{result['resent']} image send(s) repeated after a lost replica")
    if result.get("requeued_after_node_loss"):
        notes.append(f"moved to another fleet slot {result['requeued_after_node_loss']} time(s) after a lost node")
    if result.get("resumed_from_epoch"):
        notes.append(f"resumed from its stored state at epoch {result['resumed_from_epoch']}")
    if result.get("resumed_from"):
        notes.append(f"resumed from its stored state at step {result['resumed_from']}")
    return "; ".join(notes) or None


def status_uri(paths: storage.RequestPaths) -> str:
    """Where the batch keeps a request's status (`BatchRun._update` writes it)."""
    return storage.join(paths.base, "status.json")


def earlier_seconds(paths: storage.RequestPaths) -> dict[str, float]:
    """The seconds each stage took when a previous job completed it, from the request's stored status
    (empty if there is none or it cannot be read), so a re-run's summary still says what each stage cost."""
    try:
        stages = storage.read_json(status_uri(paths)).get("stages", {})
        return {stage: info["seconds"] for stage, info in stages.items()
                if str(info.get("state", "")).startswith("done") and isinstance(info.get("seconds"), (int, float))}
    except Exception:  # no earlier status (a first run) or an unreadable one: nothing to carry over
        return {}


def training_fleet(fleet: Fleet, storage_root: str):
    """The batch's training fleet, as the resource plan sized it (`resources.ResourcePlan.fleet`)."""
    from spinml_ray.ray_layer.fleet import TrainingFleet

    return TrainingFleet(fleet.slots, cpus_per_slot=max(1, fleet.cpus_per_slot), use_gpu=fleet.use_gpu,
                         gpu_fraction=fleet.gpu_fraction or TRAINING_GPU_FRACTION,
                         runs_uri=storage.join(storage_root, "_fleet"))


class BatchRun:
    def __init__(self, storage_root: str, model: str, http_port: int, fleet=None, total: int = 0, progress=None):
        self.root, self.model, self.http_port, self.fleet, self.total = storage_root, model, http_port, fleet, total
        self.progress = progress
        self.lock = threading.Lock()
        self.rows: dict[str, dict] = {}
        self.paths: dict[str, storage.RequestPaths] = {}

    def _update(self, uri: str, paths: storage.RequestPaths | None, **changes) -> None:
        with self.lock:
            row = self.rows.setdefault(uri, {"request": uri, "stages": {}})
            stage = changes.pop("stage", None)
            if stage:
                row["stages"][stage] = {**row["stages"].get(stage, {}), **changes}
            else:
                row.update(changes)
            states = [r.get("state") for r in self.rows.values()]
            done, failed = states.count("done"), states.count("failed")
            what = f"{stage}: {changes.get('state')}" if stage else changes.get("state")
            log.info("[%d/%d done, %d failed] %s %s", done, max(self.total, len(self.rows)), failed, uri, what)
            snapshot = dict(row)
        if paths is not None:
            storage.write_json(status_uri(paths), snapshot)

    def run_one(self, uri: str) -> None:
        """Run the request's remaining stages; whatever goes wrong fails this request alone."""
        try:
            self._run_stages(uri)
        except Exception as exc:  # outside a stage's own work (storing its status, say): still recorded
            reason = failure_reason(exc)
            log.warning("request %s failed: %s", uri, reason)
            with contextlib.suppress(Exception):
                paths, row = self.paths.get(uri), self.rows.get(uri, {})
                for stage, info in row.get("stages", {}).items():
                    if info.get("state") == "running":
                        self._update(uri, paths, stage=stage, state="failed", error=reason)
                self._update(uri, paths, state="failed", error=reason)

    def summary(self, requests: list[str]) -> list[dict]:
        """A row per request, in the manifest's order (`not run` for any the job never reached)."""
        with self.lock:
            return [dict(self.rows.get(uri) or {"request": uri, "state": "not run", "stages": {}}) for uri in requests]

    def _run_stages(self, uri: str) -> None:
        try:
            spec = load_request(uri)
        except Exception as exc:  # bad input: recorded, the others go on
            self._update(uri, None, state="failed", error=str(exc))
            return
        paths = self.paths[uri] = request_paths(spec, self.root)
        before = earlier_seconds(paths)
        self._update(uri, paths, request_id=spec.request_id, tenant=spec.tenant, state="running", error=None)
        for entry in STAGES:
            stage = entry.name
            if why := skipped(entry, spec, paths, resume=True):  # a committed stage keeps the time it took
                self._update(uri, paths, stage=stage, state=why,
                             **({"seconds": before[stage]} if stage in before and why.startswith("done") else {}))
                continue
            self._update(uri, paths, stage=stage, state="running")
            started = time.time()
            job = f"{spec.tenant}/{spec.request_id}"
            warm = (stage == "synthesize" and self.fleet is not None
                    and self.fleet.fits(spec.training.num_workers, spec.training.gpu_fraction))
            # personalization trains outside the fleet, on the resources idle slots would hold
            room = self.fleet.making_room() if stage == "personalize" and self.fleet else contextlib.nullcontext()
            try:
                if warm:  # a slot starts for this request's training while it is synthesized
                    self.fleet.expect(job)
                with room:
                    result = run_request(uri, self.root, model=self.model, stages=(stage,), keep_serving=True,
                                         http_port=self.http_port, fleet=self.fleet, progress=self.progress)
            except Exception as exc:
                reason = failure_reason(exc)
                self._update(uri, paths, stage=stage, state="failed", seconds=round(time.time() - started, 2),
                             error=reason)
                self._update(uri, paths, state="failed", error=f"{stage}: {reason}")
                return
            finally:
                if warm:
                    self.fleet.forget(job)
            again = retried(result.get(stage, {}))
            self._update(uri, paths, stage=stage, state="done", seconds=round(time.time() - started, 2),
                         **({"retried": again} if again else {}))
        self._update(uri, paths, state="done")


def run_batch(requests: list[str], storage_root: str, model: str = "tiny", max_concurrent: int | None = None,
              name: str = "batch", http_port: int = 8000, progress=None) -> list[dict]:
    """Run every request; returns (and stores) the summary rows. `progress`: a `progress.Progress`."""
    import ray

    from spinml_ray.ray_layer.cluster import cluster_gpus
    from spinml_ray.ray_layer.service import ensure_running

    ensure_running(model, http_port=http_port, storage_root=storage_root)
    cpus = ray.cluster_resources().get("CPU", 2)
    plan = ResourcePlan.plan(cpus, cluster_gpus(), max_concurrent, len(requests))
    log.info("resources:\n%s", plan.describe())
    max_concurrent = plan.max_concurrent
    batch = BatchRun(storage_root, model, http_port, training_fleet(plan.fleet, storage_root), total=len(requests),
                     progress=progress)
    try:
        with ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="request") as pool:
            list(pool.map(batch.run_one, requests))
    finally:  # the summary is written whatever happened, with every request's true state
        try:
            batch.fleet.close()
        except Exception as exc:
            log.warning("the training fleet did not close cleanly: %s", failure_reason(exc))
        summary = batch.summary(requests)
        storage.write_json(storage.join(storage_root, "_batches", f"{name}.json"), summary)
    return summary


def format_summary(summary: list[dict]) -> str:
    lines = ["| request | state | " + " | ".join(STAGE_NAMES) + " | error |",
             "|---|---|" + "---|" * len(STAGE_NAMES) + "---|"]
    for row in summary:
        cells = []
        for stage in STAGE_NAMES:
            info = row["stages"].get(stage, {})
            cells.append(f"{info.get('state', '-')}" + (f" {info['seconds']}s" if "seconds" in info else "")
                         + (" (retried)" if info.get("retried") else ""))
        error = (row.get("error") or "").replace("|", "/")[:120]
        lines.append(f"| {row.get('request_id', row['request'])} | {row.get('state')} | " + " | ".join(cells) + f" | {error} |")
    return "\n".join(lines)
