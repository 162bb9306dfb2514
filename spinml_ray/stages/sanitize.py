"""Stage 1 (Ray Data): read the raw references, release what each object's level allows.

References stream through Ray Data as small JSON descriptors; each worker reads its references'
bytes from storage, sanitizes them and writes its own Parquet part to `sanitized/`, so image bytes
never pass through the driver. This is the only stage that opens the raw references. A reference
that cannot be used (unreadable, bad mask, ...) is recorded in `sanitized/rejections.parquet` with its
reason; the stage fails only when fewer valid references remain than the request needs.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa

from spinml_ray import storage
from spinml_ray.images import ImageError, decode_mask, decode_rgb
from spinml_ray.sanitizer import box_mask, sanitize_image
from spinml_ray.spec import RequestSpec

log = logging.getLogger(__name__)

SANITIZED_SCHEMA = pa.schema(
    [
        ("ref_id", pa.string()),
        ("label", pa.string()),
        ("object", pa.string()),
        ("level", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("payload", pa.binary()),
        ("region", pa.binary()),
        ("payload_sha256", pa.string()),
        ("mi", pa.float64()),
    ]
)
REJECTION_SCHEMA = pa.schema([("ref_id", pa.string()), ("uri", pa.string()), ("reason", pa.string())])


class StageError(RuntimeError):
    """A stage that cannot complete for this request; the message says why."""


def reference_items(spec: RequestSpec) -> list[dict]:
    return [
        {"ref_id": f"ref-{i:04d}", **ref.model_dump(mode="json")} for i, ref in enumerate(spec.references)
    ]


def sanitize_reference(item: dict, target: str, background: str) -> list[dict]:
    """Read one reference (and its mask) from storage and sanitize it; raises ImageError if unusable."""
    uri = item["uri"]
    try:
        image = decode_rgb(storage.read_bytes(uri), what=uri)
    except FileNotFoundError:
        raise ImageError(f"{uri}: file not found") from None
    mask = None
    if item.get("mask_uri"):
        try:
            mask = decode_mask(storage.read_bytes(item["mask_uri"]), image.shape[:2], what=item["mask_uri"])
        except FileNotFoundError:
            raise ImageError(f"{item['mask_uri']}: mask file not found") from None
    elif item.get("box"):
        mask = box_mask(tuple(item["box"]), image.shape[:2])
    return sanitize_image(item["ref_id"], image, mask, target, background, label=item.get("label"))


def sanitize_batch(batch: dict, out_dir: str, target: str, background: str) -> dict:
    """Ray Data batch function: sanitize the batch's references and write one Parquet part."""
    rows, rejections = [], []
    for raw in batch["item"]:
        item = json.loads(raw)
        try:
            rows.extend(sanitize_reference(item, target, background))
        except (ImageError, OSError) as exc:
            rejections.append({"ref_id": item["ref_id"], "uri": item["uri"], "reason": str(exc)})
    part = ""
    if rows:
        part = storage.part_uri(out_dir)
        storage.write_table(part, pa.Table.from_pylist(rows, schema=SANITIZED_SCHEMA))
    return {
        "part": np.array([part]),
        "rows": np.array([len(rows)]),
        "rejections": np.array([json.dumps(rejections)]),
    }


def run_sanitize(spec: RequestSpec, paths: storage.RequestPaths, batch_size: int = 8) -> dict:
    """Sanitize every reference of `spec` into `paths.sanitized`; returns the committed manifest."""
    import ray

    items = reference_items(spec)
    dataset = ray.data.from_items([{"item": json.dumps(item)} for item in items])
    results = dataset.map_batches(
        sanitize_batch,
        fn_kwargs={
            "out_dir": paths.sanitized,
            "target": spec.privacy.target.value,
            "background": spec.privacy.background.value,
        },
        batch_size=batch_size,
        batch_format="numpy",
    ).take_all()
    parts = [r["part"] for r in results if r["part"]]
    rejections = [rej for r in results for rej in json.loads(r["rejections"])]
    accepted = len(items) - len(rejections)
    rejection_uri = storage.join(paths.sanitized, "rejections.parquet")
    storage.write_table(rejection_uri, pa.Table.from_pylist(rejections, schema=REJECTION_SCHEMA))
    for rej in rejections:
        log.warning("reference %s rejected: %s", rej["ref_id"], rej["reason"])
    if accepted < spec.min_references:
        reasons = "; ".join(f"{r['ref_id']}: {r['reason']}" for r in rejections)
        raise StageError(
            f"request {spec.request_id}: {accepted} valid reference(s), {spec.min_references} needed ({reasons})"
        )
    return storage.commit(
        paths.sanitized,
        parts,
        privacy=spec.privacy.config,
        references=len(items),
        accepted=accepted,
        rejected=len(rejections),
        rejections="rejections.parquet",
    )
