"""The sanitized bundle: one row per (reference, object), made here without Ray.

This is all the server ever learns about the references. `sanitize_reference` makes the rows of one
reference (reading it from storage, finding the target, applying the levels); `validate_uploaded`
checks a bundle made elsewhere (a device running `spinml sanitize --local`) before the server takes
it: the levels must be the request's, nothing may be released that a level withholds, and every
payload is re-encoded from its pixels so no metadata rides along.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import pyarrow as pa

from spinml_ray import storage
from spinml_ray.images import ImageError, decode_mask, decode_rgb, decode_untrusted_png, digest, encode_png
from spinml_ray.sanitizer import CannyThresholds, box_mask, sanitize_image
from spinml_ray.segmentation import SegmentationError
from spinml_ray.spec import Level, RequestSpec, SanitizationSpec

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
        ("faces_blurred", pa.int32()),
        ("mi", pa.float64()),
    ]
)
REJECTION_SCHEMA = pa.schema([("ref_id", pa.string()), ("uri", pa.string()), ("reason", pa.string())])
REQUIRED_COLUMNS = ("ref_id", "object", "level", "payload", "mi")

Segment = Callable[..., np.ndarray]


class BadReference(ValueError):
    """A reference (or an uploaded bundle row) that cannot be used; the message says why."""


def reference_items(spec: RequestSpec) -> list[dict]:
    return [{"ref_id": f"ref-{i:04d}", **ref.model_dump(mode="json")} for i, ref in enumerate(spec.references)]


def _read(uri: str, what: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except FileNotFoundError:
        raise BadReference(f"{uri}: {what} file not found") from None
    except OSError as exc:
        raise BadReference(f"{uri}: {what} file unreadable ({exc})") from None


def sanitize_reference(item: dict, target: str, background: str, settings: SanitizationSpec,
                       segment: Segment | None = None) -> list[dict]:
    """Rows for one reference item (see `reference_items`); raises BadReference when unusable.

    The target comes from the item's mask, else `segment(image, box, points)` (SAM). Without a
    segmenter a box alone is refused at any level above L0_L0 (its background would leave as the
    target) unless `settings.allow_box_as_mask`; its rows then say so (`box_as_mask`) to the preview."""
    uri = item["uri"]
    try:
        image = decode_rgb(_read(uri, "image"), what=uri)
        mask, box_as_mask = None, False
        if item.get("mask_uri"):
            mask = decode_mask(_read(item["mask_uri"], "mask"), image.shape[:2], what=item["mask_uri"])
        elif Level(target) != Level.L0 or Level(background) != Level.L0:
            if segment is None or not getattr(segment, "available", True):
                if not item.get("box"):
                    raise BadReference(f"{uri}: needs a mask, a box or points (no SAM checkpoint available)")
                if not settings.allow_box_as_mask:
                    raise BadReference(
                        f"{uri}: only a box marks the target and no segmenter is available, so the whole box "
                        f"(background inside it included) would be released as the target at {target}_{background}; "
                        "give a mask, or a SAM checkpoint (--sam), or set sanitization.allow_box_as_mask: true")
                mask, box_as_mask = box_mask(tuple(item["box"]), image.shape[:2]), True
            else:
                mask = segment(image, tuple(item["box"]) if item.get("box") else None, item.get("points"))
        rows = sanitize_image(
            item["ref_id"], image, mask, target, background, label=item.get("label"),
            canny=CannyThresholds(settings.canny_low, settings.canny_high), blur_faces=settings.blur_faces,
        )
    except (ImageError, SegmentationError) as exc:
        raise BadReference(str(exc)) from None
    if box_as_mask:  # for the preview only: not a bundle column, so it never leaves
        rows = [{**row, "box_as_mask": True} for row in rows]
    return rows


def sanitize_all(items: list[dict], target: str, background: str, settings: SanitizationSpec,
                 segment: Segment | None = None) -> tuple[list[dict], list[dict]]:
    """(rows, rejections) for reference items; one bad reference never stops the others."""
    rows, rejections = [], []
    for item in items:
        try:
            rows.extend(sanitize_reference(item, target, background, settings, segment))
        except BadReference as exc:
            rejections.append({"ref_id": item["ref_id"], "uri": item["uri"], "reason": str(exc)})
    return rows, rejections


def write_bundle(rows: list[dict], rejections: list[dict], out_dir: str) -> str:
    """`bundle.parquet` (and `rejections.parquet`) in out_dir, written atomically; returns the bundle URI."""
    uri = storage.join(out_dir, "bundle.parquet")
    storage.write_table(storage.join(out_dir, "rejections.parquet"), pa.Table.from_pylist(rejections, schema=REJECTION_SCHEMA))
    storage.write_table(uri, pa.Table.from_pylist(rows, schema=SANITIZED_SCHEMA))
    return uri


def _check_payload(row: dict, what: str) -> dict:
    """Re-encode an uploaded row's payload/region from pixels after checking they fit its level."""
    level = Level(row["level"])
    if level == Level.L0:
        if row.get("payload") is not None or row.get("region") is not None:
            raise BadReference(f"{what}: level L0 but the row carries image data; refused")
        return {**row, "payload": None, "region": None, "payload_sha256": None, "mi": 0.0, "width": None, "height": None}
    if row.get("payload") is None:
        raise BadReference(f"{what}: level {level.value} without a payload")
    try:
        payload = decode_untrusted_png(row["payload"], what)
    except ImageError as exc:
        raise BadReference(f"payload is not a PNG image within the pixel cap: {exc}") from None
    region = None
    if level == Level.L1:
        if payload.ndim != 2 or not set(np.unique(payload).tolist()) <= {0, 255}:
            raise BadReference(f"{what}: an L1 payload must be a single-channel 0/255 edge map")
    else:
        if payload.ndim != 3 or payload.shape[2] != 3:
            raise BadReference(f"{what}: an L2 payload must be an RGB image")
        if row.get("region") is None:
            raise BadReference(f"{what}: an L2 row needs its region mask")
        try:
            region = decode_untrusted_png(row["region"], what) > 0
        except ImageError as exc:
            raise BadReference(f"region is not a PNG image within the pixel cap: {exc}") from None
        if region.shape != payload.shape[:2] or payload[~region].any():
            raise BadReference(f"{what}: L2 pixels outside the released region; refused")
    clean = encode_png(payload)
    return {
        **row,
        "payload": clean,
        "region": encode_png(region) if region is not None else None,
        "payload_sha256": digest(clean),
        "width": payload.shape[1],
        "height": payload.shape[0],
    }


def validate_uploaded(table: pa.Table, spec: RequestSpec, source: str) -> tuple[list[dict], list[dict]]:
    """(rows accepted, rejections) of an uploaded bundle, for the request's privacy levels."""
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise BadReference(f"{source}: not a sanitized bundle (missing columns {missing})")
    wanted = {"target": spec.privacy.target.value, "background": spec.privacy.background.value}
    by_ref: dict[str, list[dict]] = {}
    for row in table.to_pylist():
        by_ref.setdefault(str(row["ref_id"]), []).append(row)
    accepted, rejections = [], []
    for ref_id, rows in sorted(by_ref.items()):
        try:
            objects = sorted(r["object"] for r in rows)
            if objects != ["background", "target"]:
                raise BadReference(f"{ref_id}: needs exactly one target and one background row, has {objects}")
            clean = []
            for row in rows:
                if row["level"] != wanted[row["object"]]:
                    raise BadReference(
                        f"{ref_id}: {row['object']} level {row['level']} differs from the request's {wanted[row['object']]}"
                    )
                base = {name: row.get(name) for name in SANITIZED_SCHEMA.names}
                base.update(ref_id=ref_id, faces_blurred=row.get("faces_blurred") or 0, mi=float(row["mi"] or 0.0))
                clean.append(_check_payload(base, f"{source} {ref_id} {row['object']}"))
            accepted.extend(clean)
        except BadReference as exc:
            rejections.append({"ref_id": ref_id, "uri": source, "reason": str(exc)})
    return accepted, rejections
