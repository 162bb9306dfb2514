"""Trustworthy boxes for a detection request's synthetic images.

An image whose conditioning placed the target (the released region, edge map or inpainting hole;
see `synthesis/plan.geometry_box`) keeps that box. The others (L0_L0 images, and an L1 background
alone) go to the auto-labeller, the model source's SAM:

- prompted by cross-attention, when synthesis recorded where the diffusion model drew the subject's
  words (`synthesis/attention.py`, the `attention` column): the attention peak is a positive point
  and the part of the map around it above half the peak gives a box. SAM's mask is kept only if SAM
  scores it as good (predicted IoU >= 0.88) and it covers the attention peak;
- unprompted otherwise: SAM's automatic masks, kept only if SAM scores them as good (predicted IoU
  >= 0.88, stability >= 0.92) and picked by the same documented rule as sanitization
  (`segmentation.pick_automatic_mask`: the largest mask on the image centre, else the best-scored
  one, never most of the frame).

Either way the mask must cover between `MIN_BOX_FRACTION` and `MAX_BOX_FRACTION` of the frame. An
image with no such mask, or any image when the model source has no SAM, is left out and counted.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import cv2
import numpy as np

from spinml_ray.images import box_of_mask, decode_png, decode_rgb
from spinml_ray.segmentation import MAX_AUTOMATIC_FRACTION, MIN_PREDICTED_IOU, SegmentationError

MIN_BOX_FRACTION = 0.01
MAX_BOX_FRACTION = MAX_AUTOMATIC_FRACTION
ATTENTION_THRESHOLD = 0.5  # of the peak


class Labeller(Protocol):
    """What the auto-labeller needs of SAM (`segmentation.LazySegmenter` is one)."""

    def __call__(self, image: np.ndarray) -> np.ndarray: ...

    def prompted(self, image: np.ndarray, box=None, points=None) -> tuple[np.ndarray, float]: ...


def trusted_boxes(rows: Iterable[dict], labeller: Labeller | None) -> tuple[dict[str, list[float]], dict[str, int]]:
    """({image_id: box}, counts) for rows with `image_id`, `box` (or None), `image` (encoded bytes) and
    optionally `attention` (the subject's cross-attention map, PNG bytes, or None).

    counts: how many boxes came from the conditioning's `geometry`, how many from the `autolabel`ler,
    and how many images were `left_out` with no trustworthy box."""
    boxes: dict[str, list[float]] = {}
    counts = {"geometry": 0, "autolabel": 0, "left_out": 0}
    for row in rows:
        if row["box"] is not None:
            boxes[row["image_id"]] = list(row["box"])
            counts["geometry"] += 1
            continue
        box = None
        if labeller is not None:
            image = decode_rgb(row["image"])
            attention = row.get("attention")
            mask = (_from_attention(image, decode_png(attention), labeller) if attention is not None
                    else _unprompted(image, labeller))
            if mask is not None and MIN_BOX_FRACTION * mask.size <= mask.sum() <= MAX_BOX_FRACTION * mask.size:
                box = box_of_mask(mask)
        if box is None:
            counts["left_out"] += 1
        else:
            boxes[row["image_id"]] = box
            counts["autolabel"] += 1
    return boxes, counts


def attention_prompt(heat: np.ndarray, shape: tuple[int, int]) -> tuple[list[float], list[float]] | None:
    """(point [x, y], box [x0, y0, x1, y1]) in a `shape` (height, width) image for a cross-attention map:
    the map's peak, and the box of the connected part around it at or above half the peak."""
    height, width = shape
    heat = cv2.resize(heat.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    peak = float(heat.max())
    if not np.isfinite(peak) or peak <= 0:
        return None
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    _, components = cv2.connectedComponents((heat >= ATTENTION_THRESHOLD * peak).astype(np.uint8))
    return [float(x), float(y)], box_of_mask(components == components[y, x])


def _from_attention(image: np.ndarray, heat: np.ndarray, labeller: Labeller) -> np.ndarray | None:
    prompt = attention_prompt(heat, image.shape[:2])
    if prompt is None:
        return None
    (x, y), box = prompt
    mask, score = labeller.prompted(image, box=box, points=[[x, y]])
    return mask if score >= MIN_PREDICTED_IOU and mask[int(y), int(x)] else None


def _unprompted(image: np.ndarray, labeller: Labeller) -> np.ndarray | None:
    try:
        return labeller(image)
    except SegmentationError:
        return None
