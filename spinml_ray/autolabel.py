"""Trustworthy boxes for a detection request's synthetic images.

An image whose conditioning placed the target (the released region, edge map or inpainting hole;
see `synthesis/plan.geometry_box`) keeps that box. The others (L0_L0 images, and an L1 background
alone) go to the auto-labeller: the model source's SAM, unprompted, keeping only masks that SAM
itself scores as good (predicted IoU >= 0.88, stability >= 0.92), picked by the same documented rule
as sanitization (`segmentation.pick_automatic_mask`: the largest mask on the image centre, else the
best-scored one, never most of the frame), and at least `MIN_BOX_FRACTION` of the frame. An image
with no such mask, or any image when the model source has no SAM, is left out and counted.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from spinml_ray.images import box_of_mask, decode_rgb
from spinml_ray.segmentation import SegmentationError

MIN_BOX_FRACTION = 0.01

Segment = Callable[[np.ndarray], np.ndarray]


def trusted_boxes(rows: Iterable[dict], segment: Segment | None) -> tuple[dict[str, list[float]], dict[str, int]]:
    """({image_id: box}, counts) for rows with `image_id`, `box` (or None) and `image` (encoded bytes).

    counts: how many boxes came from the conditioning's `geometry`, how many from the `autolabel`ler,
    and how many images were `left_out` with no trustworthy box."""
    boxes: dict[str, list[float]] = {}
    counts = {"geometry": 0, "autolabel": 0, "left_out": 0}
    for row in rows:
        if row["box"] is not None:
            boxes[row["image_id"]] = list(row["box"])
            counts["geometry"] += 1
            continue
        box = _autolabel(decode_rgb(row["image"]), segment) if segment is not None else None
        if box is None:
            counts["left_out"] += 1
        else:
            boxes[row["image_id"]] = box
            counts["autolabel"] += 1
    return boxes, counts


def _autolabel(image: np.ndarray, segment: Segment) -> list[float] | None:
    try:
        mask = segment(image)
    except SegmentationError:
        return None
    if mask.sum() < MIN_BOX_FRACTION * mask.size:
        return None
    return box_of_mask(mask)
