"""Stage 2 (Ray Serve): send the request's work items to the diffusion deployment, store the images.

The job reads only the sanitized bundle, plans the work items (`synthesis/plan.py`), sends them
through a deployment handle with a bounded number in flight, and writes `synthetic/` in Parquet
parts committed by a manifest. Each row records the prompt, seed and settings that regenerate it,
the digest of the conditioning sent next to the digest the deployment says it received, and the
target's box where the conditioning's geometry fixes it (`plan.geometry_box`; detection trains on it).
"""

from __future__ import annotations

import pyarrow as pa

from spinml_ray import storage
from spinml_ray.images import digest
from spinml_ray.spec import RequestSpec
from spinml_ray.stages import StageError
from spinml_ray.synthesis.plan import geometry_box, index_bundle, plan_work_items
from spinml_ray.synthesis.service import submit
from spinml_ray.synthesis.workitems import WorkItem

PART_ROWS = 256

SYNTHETIC_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("label", pa.string()),
        ("label_index", pa.int32()),
        ("pool", pa.string()),
        ("kind", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("resolution", pa.int32()),
        ("steps", pa.int32()),
        ("guidance", pa.float64()),
        ("strength", pa.float64()),
        ("source_ref", pa.string()),
        ("condition_sha256", pa.string()),
        ("received_sha256", pa.string()),
        ("box", pa.list_(pa.float64(), 4)),
        ("attention", pa.binary()),
        ("image", pa.binary()),
    ]
)


def condition_digest(item: WorkItem) -> str:
    sent = b"".join(x for x in (item.control_image, item.init_image, item.mask_image) if x is not None)
    return digest(sent) if sent else ""


def run_synthesize(spec: RequestSpec, paths: storage.RequestPaths, handle, max_in_flight: int = 64) -> dict:
    """Generate every synthetic image of the request through `handle`; returns the committed manifest."""
    from spinml_ray.stages.personalize import adapter_for

    sanitized = storage.read_committed_table(paths.sanitized).to_pylist()
    adapter, token = adapter_for(paths)
    by_ref = index_bundle(sanitized)
    items = plan_work_items(spec, by_ref, adapter, token)
    target_pixels = spec.synthesis.l2_target == "image_guided"
    boxes = {ref: geometry_box(rows["target"], rows["background"], spec.synthesis.resolution, target_pixels)
             for ref, rows in by_ref.items()}
    if spec.task == "detection":  # where no geometry places the subject, ask where the model drew it
        items = [i if boxes.get(i.source_ref) else i.model_copy(update={"attend": spec.subject}) for i in items]
    label_index = {name: i for i, name in enumerate(spec.label_names)}
    rows, parts, failures = [], [], []

    def flush():
        if rows:
            part = storage.part_uri(paths.synthetic)
            storage.write_table(part, pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA))
            parts.append(part)
            rows.clear()

    for start in range(0, len(items), max_in_flight):
        window = items[start : start + max_in_flight]
        responses = [submit(handle, item) for item in window]
        for item, response in zip(window, responses):
            try:
                generated = response.result()
            except Exception as exc:
                failures.append(f"{item.image_id}: {exc}")
                continue
            sent = condition_digest(item)
            if generated.received_sha256 != sent:
                raise StageError(f"{item.image_id}: the deployment received other conditioning than was sent")
            row = item.model_dump(exclude={"control_image", "init_image", "mask_image", "request_id", "tenant", "attend"})
            rows.append(
                {
                    **row,
                    "label_index": label_index[item.label],
                    "kind": generated.kind,
                    "condition_sha256": sent,
                    "received_sha256": generated.received_sha256,
                    "box": boxes.get(item.source_ref) if item.source_ref else None,
                    "attention": generated.attention,
                    "image": generated.image,
                }
            )
            if len(rows) >= PART_ROWS:
                flush()
    flush()
    if failures:
        raise StageError(f"request {spec.request_id}: {len(failures)} image(s) failed: " + "; ".join(failures[:5]))
    return storage.commit(paths.synthetic, parts, images=len(items), privacy=spec.privacy.config,
                          alpha=spec.privacy.alpha, adapter=adapter)
