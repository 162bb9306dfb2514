"""Stage 2 (Ray Serve): send the request's work items to the diffusion deployment, store the images.

The job reads only the sanitized bundle, plans the work items (`synthesis/plan.py`), sends them
through a deployment handle with a bounded number in flight, and writes `synthetic/` in Parquet
parts committed by a manifest. Each row records the prompt, seed and settings that regenerate it,
the digest of the conditioning sent next to the digest the deployment says it received, and the
target's box where the conditioning's geometry fixes it (`WorkItem.box`, from the plan; detection trains on it).
"""

from __future__ import annotations

import logging

import pyarrow as pa

from spinml_ray import storage
from spinml_ray.errors import StageError
from spinml_ray.images import digest
from spinml_ray.ray_layer.cluster import failure_reason, lost_process
from spinml_ray.ray_layer.service import submit
from spinml_ray.spec import RequestSpec
from spinml_ray.synthesis.plan import index_bundle, plan_work_items
from spinml_ray.synthesis.workitems import SYNTHETIC_SCHEMA, WorkItem

PART_ROWS = 256
log = logging.getLogger(__name__)



def condition_digest(item: WorkItem) -> str:
    sent = b"".join(x for x in (item.control_image, item.init_image, item.mask_image) if x is not None)
    return digest(sent) if sent else ""


def generate(handle, items: list[WorkItem], attempts: int = 3) -> tuple[list, int]:
    """Each item's generated image or the exception it ended with, and how many sends were repeated.
    An item whose replica was lost (its node or process died) is sent again, up to `attempts` times
    in all: Serve starts a new replica and the handle waits for it. Rows are kept by the caller, so a
    retry duplicates nothing."""
    outcomes: dict[str, object] = {}
    waiting, resent = list(items), 0
    for attempt in range(attempts):
        responses = [(item, submit(handle, item)) for item in waiting]
        waiting = []
        for item, response in responses:
            try:
                outcomes[item.image_id] = response.result()
            except Exception as exc:
                lost = lost_process(exc) if attempt + 1 < attempts else None
                if lost:
                    log.warning("image %s: its replica was lost (%s); sending it again", item.image_id, lost)
                    waiting.append(item)
                else:
                    outcomes[item.image_id] = exc
        if not waiting:
            break
        resent += len(waiting)
    return [outcomes[item.image_id] for item in items], resent


def run_synthesize(spec: RequestSpec, paths: storage.RequestPaths, handle, max_in_flight: int = 64,
                   progress=None) -> dict:
    """Generate every synthetic image of the request through `handle`; returns the committed manifest.
    `progress(done, total)` hears of images as they come back."""
    from spinml_ray.ray_layer.personalize import adapter_for

    sanitized = storage.read_committed_table(paths.sanitized).to_pylist()
    adapter, token = adapter_for(paths)
    items = plan_work_items(spec, index_bundle(sanitized), adapter, token)
    if spec.task == "detection":  # where no geometry places the subject, ask where the model drew it
        items = [i if i.box else i.model_copy(update={"attend": spec.subject}) for i in items]
    label_index = {name: i for i, name in enumerate(spec.label_names)}
    rows, parts, failures, resent = [], [], [], 0

    def flush():
        if rows:
            part = storage.part_uri(paths.synthetic)
            storage.write_table(part, pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA))
            parts.append(part)
            rows.clear()

    for start in range(0, len(items), max_in_flight):
        window = items[start : start + max_in_flight]
        generated_window, resent_now = generate(handle, window)
        resent += resent_now
        for done, (item, generated) in enumerate(zip(window, generated_window), start + 1):
            if progress is not None:
                progress(done, len(items))
            if isinstance(generated, Exception):
                failures.append(f"{item.image_id}: {failure_reason(generated)}")
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
                          alpha=spec.privacy.alpha, adapter=adapter, resent=resent)
