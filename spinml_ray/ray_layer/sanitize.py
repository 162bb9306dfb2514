"""Stage 1 (Ray Data): read the raw references, release what each object's level allows.

References stream through Ray Data as small JSON descriptors in batches; an actor pool
(`ActorPoolStrategy`) of `SanitizeWorker`s reads each reference's bytes from storage, finds the
target (the user's mask, else SAM, loaded once per actor and on a GPU when the cluster has one),
sanitizes it (`bundle.sanitize_reference`) and writes its own Parquet part to `sanitized/`, so image
bytes never pass through the driver and memory stays bounded by the batch size. This is the only
stage that opens the raw references. A request may instead carry a `bundle` sanitized on the user's
device; it is validated (`bundle.validate_uploaded`) and becomes `sanitized/` as is.

Unusable references land in `sanitized/rejections.parquet` with their reason; the stage fails only
when fewer valid references remain than the request needs.
"""

from __future__ import annotations

import json
import logging
import resource

import numpy as np
import pyarrow as pa

from spinml_ray import storage
from spinml_ray.bundle import (
    REJECTION_SCHEMA,
    SANITIZED_SCHEMA,
    BadReference,
    reference_items,
    sanitize_all,
    validate_uploaded,
)
from spinml_ray.errors import StageError
from spinml_ray.ray_layer import metrics
from spinml_ray.resources import ResourcePlan
from spinml_ray.segmentation import LazySegmenter
from spinml_ray.spec import RequestSpec, SanitizationSpec

log = logging.getLogger(__name__)


class SanitizeWorker:
    """Ray Data actor: SAM is resolved on the worker's node and loaded once, on first need."""

    def __init__(self, out_dir: str, target: str, background: str, settings: dict, model: str, sam: str | None):
        self.out_dir, self.target, self.background = out_dir, target, background
        self.settings = SanitizationSpec.model_validate(settings)
        from spinml_ray.models.source import sam_loader

        self.segmenter = LazySegmenter(sam_loader(model, sam))

    def __call__(self, batch: dict) -> dict:
        items = [json.loads(raw) for raw in batch["item"]]
        rows, rejections = sanitize_all(items, self.target, self.background, self.settings, self.segmenter)
        for row in rows:  # what left, per level: the leakage a platform sees in aggregate
            if row.get("mi") is not None:
                metrics.record("spinml_released_mi", row["mi"], level=row["level"], object=row["object"])
        part = ""
        if rows:
            part = storage.part_uri(self.out_dir)
            storage.write_table(part, pa.Table.from_pylist(rows, schema=SANITIZED_SCHEMA))
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        return {"part": np.array([part]), "rows": np.array([len(rows)]), "items": np.array([len(items)]),
                "rejections": np.array([json.dumps(rejections)]), "peak_rss_mb": np.array([peak_mb])}


def _sanitize_references(spec: RequestSpec, paths: storage.RequestPaths, model: str, sam: str | None,
                         workers: int | None, batch_size: int, progress=None) -> tuple[list[str], list[dict], int, float]:
    import ray

    from spinml_ray.ray_layer.cluster import cluster_gpus

    items = reference_items(spec)
    needs_sam = any(not i.get("mask_uri") for i in items)
    plan = ResourcePlan.plan(ray.cluster_resources().get("CPU", 1), cluster_gpus(), workers=workers)
    dataset = ray.data.from_items([{"item": json.dumps(item)} for item in items], override_num_blocks=max(1, min(len(items), 200)))
    results_dataset = dataset.map_batches(
        SanitizeWorker,
        fn_constructor_kwargs={
            "out_dir": paths.sanitized,
            "target": spec.privacy.target.value,
            "background": spec.privacy.background.value,
            "settings": spec.sanitization.model_dump(),
            "model": model,
            "sam": sam,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.sanitize_pool(len(items), batch_size)),
        num_gpus=plan.sam.gpus if needs_sam else 0,
    )
    results, done = [], 0
    for result in results_dataset.iter_rows():
        results.append(result)
        done += int(result["items"])
        if progress is not None:
            progress(done, len(items))
    parts = [r["part"] for r in results if r["part"]]
    rejections = [rej for r in results for rej in json.loads(r["rejections"])]
    return parts, rejections, len(items), max((float(r["peak_rss_mb"]) for r in results), default=0.0)


def _accept_bundle(spec: RequestSpec, paths: storage.RequestPaths) -> tuple[list[str], list[dict], int, float]:
    try:
        table = storage.read_table(spec.bundle)
    except FileNotFoundError:
        raise StageError(f"{spec.bundle}: uploaded bundle not found") from None
    except Exception as exc:
        raise StageError(f"{spec.bundle}: not a Parquet bundle ({exc})") from None
    try:
        rows, rejections = validate_uploaded(table, spec, spec.bundle)
    except BadReference as exc:
        raise StageError(str(exc)) from None
    parts = []
    if rows:
        parts.append(storage.part_uri(paths.sanitized))
        storage.write_table(parts[0], pa.Table.from_pylist(rows, schema=SANITIZED_SCHEMA))
    return parts, rejections, len({r["ref_id"] for r in rows}) + len(rejections), 0.0


def run_sanitize(spec: RequestSpec, paths: storage.RequestPaths, model: str = "tiny", sam: str | None = None,
                 workers: int | None = None, batch_size: int = 8, progress=None) -> dict:
    """Sanitize the request's references (or accept its uploaded bundle) into `paths.sanitized`.

    SAM comes from `sam` when given, else from the model source's `sam/` folder (if it has one).
    `progress(done, total)` hears of references as their batches come back."""
    if spec.bundle:
        parts, rejections, total, peak_mb = _accept_bundle(spec, paths)
    else:
        parts, rejections, total, peak_mb = _sanitize_references(spec, paths, model, sam, workers, batch_size, progress)
    accepted = total - len(rejections)
    storage.write_table(storage.join(paths.sanitized, "rejections.parquet"),
                        pa.Table.from_pylist(rejections, schema=REJECTION_SCHEMA))
    for rej in rejections:
        log.warning("reference %s rejected: %s", rej["ref_id"], rej["reason"])
        metrics.record("spinml_references_rejected", reason=metrics.rejection_category(rej["reason"]))
    if accepted < spec.min_references:
        reasons = "; ".join(f"{r['ref_id']}: {r['reason']}" for r in rejections)
        raise StageError(f"request {spec.request_id}: {accepted} valid reference(s), {spec.min_references} needed ({reasons})")
    return storage.commit(
        paths.sanitized, parts, privacy=spec.privacy.config, references=total, accepted=accepted,
        rejected=len(rejections), rejections="rejections.parquet", source="bundle" if spec.bundle else "references",
        worker_peak_rss_mb=round(peak_mb, 1),
    )
