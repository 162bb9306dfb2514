"""Object-level sanitization: what each privacy level lets out of one reference image.

Pure functions over arrays, used by the Ray Data stage and usable on a device without Ray.
For each object (target, background) with its region mask:
- L0: nothing (no pixels, no edges, no mask);
- L1: the Canny edge map of the object's pixels (everything else black), kept only inside its region;
- L2: the object's pixels, everything outside its region blanked to black, plus its region mask.
The released payload is encoded as a PNG built from the array alone, so no metadata (EXIF, GPS, ICC,
text chunks) of the original file can survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from spinml_ray.faces import blur_faces as blur_face_regions
from spinml_ray.images import ImageError, digest, encode_png
from spinml_ray.leakage import object_leakage
from spinml_ray.spec import Level

OBJECTS = ("target", "background")
MIN_REGION_FRACTION = 0.001  # a target smaller than 0.1% of the image (or its background) is refused
MIN_REGION_PIXELS = 16


@dataclass(frozen=True)
class CannyThresholds:
    low: int = 100
    high: int = 200


def box_mask(box: tuple[int, int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """The target region given by a box (x0, y0, x1, y1), clipped to the image."""
    height, width = shape
    x0, y0, x1, y1 = box
    if x0 >= width or y0 >= height:
        raise ImageError(f"box {box} lies outside the {width}x{height} image")
    mask = np.zeros(shape, dtype=bool)
    mask[y0 : min(y1, height), x0 : min(x1, width)] = True
    return mask


def validate_target_mask(mask: np.ndarray, what: str = "mask") -> None:
    """Refuse a target region that is empty, too small, or leaves (almost) no background."""
    area = mask.size
    inside = int(mask.sum())
    smallest = max(MIN_REGION_PIXELS, int(MIN_REGION_FRACTION * area))
    if inside == 0:
        raise ImageError(f"{what}: empty (no target pixels)")
    if inside < smallest:
        raise ImageError(f"{what}: target covers {inside} pixels, fewer than the minimum {smallest}")
    if area - inside < smallest:
        raise ImageError(f"{what}: target covers the whole image ({inside} of {area} pixels)")


def release(image: np.ndarray, region: np.ndarray, level: Level, canny: CannyThresholds = CannyThresholds(),
            blur_faces: bool = False):
    """(payload, region, faces blurred) that `level` releases for the object occupying `region`.

    L0 releases (None, None, 0). At L2, faces detected in the image are blurred inside the region
    when `blur_faces` is set (detection runs on the whole image, so a face cut by the region's edge
    is still found).
    """
    level = Level(level)
    if level == Level.L0:
        return None, None, 0
    pixels = np.where(region[..., None], image, 0).astype(np.uint8)
    if level == Level.L1:
        gray = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
        edges = cv2.Canny(gray, canny.low, canny.high)
        edges[~region] = 0
        return edges, None, 0
    faces = 0
    if blur_faces:
        blurred, faces = blur_face_regions(image, region)
        pixels = np.where(region[..., None], blurred, 0).astype(np.uint8)
    return pixels, region.copy(), faces


def sanitize_image(
    ref_id: str,
    image: np.ndarray,
    target_mask: np.ndarray | None,
    target: Level,
    background: Level,
    label: str | None = None,
    canny: CannyThresholds = CannyThresholds(),
    blur_faces: bool = False,
) -> list[dict]:
    """One row per object: ref_id, label, object, level, width, height, payload, region, payload_sha256,
    faces_blurred, mi. An L0 row carries the label and level only (no size, no payload, mi 0).

    `target_mask` may be None only when both levels are L0 (then nothing about either object leaves).
    """
    levels = {"target": Level(target), "background": Level(background)}
    height, width = image.shape[:2]
    if target_mask is None:
        if any(level != Level.L0 for level in levels.values()):
            raise ImageError(f"{ref_id}: needs a mask or a box for levels {levels['target'].value}_{levels['background'].value}")
    else:
        validate_target_mask(target_mask, f"{ref_id} mask")
    rows = []
    for name in OBJECTS:
        level = levels[name]
        payload = region_png = None
        mi, faces = 0.0, 0
        if level != Level.L0:
            region = target_mask if name == "target" else ~target_mask
            released, released_region, faces = release(image, region, level, canny, blur_faces)
            payload = encode_png(released)
            region_png = encode_png(released_region) if released_region is not None else None
            obj = np.where(region[..., None], image, 0).astype(np.uint8)
            shown = released if faces else None
            mi = object_leakage(obj, image, level.value, canny.low, canny.high, released_rgb=shown)
        rows.append(
            {
                "ref_id": ref_id,
                "label": label,
                "object": name,
                "level": level.value,
                "width": width if payload is not None else None,  # an L0 row tells nothing, not even the size
                "height": height if payload is not None else None,
                "payload": payload,
                "region": region_png,
                "payload_sha256": digest(payload) if payload is not None else None,
                "faces_blurred": faces,
                "mi": float(mi),
            }
        )
    return rows
