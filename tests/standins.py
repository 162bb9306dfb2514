"""Stand-ins for SAM that answer as a confident SAM would, for the auto-labeller (`autolabel.Labeller`).

The tiny preset's SAM has seeded random weights: its own score of a mask (predicted IoU) stays far
below the auto-labeller's gate (`segmentation.MIN_PREDICTED_IOU`), so with it no box ever comes from
SAM. These stand-ins pass the gate when the test means them to, and count every call, so that a
test can assert which of the auto-labeller's paths was taken (prompted by attention, or unprompted).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np


def box_iou(a, b) -> float:
    """IoU of two [x0, y0, x1, y1] boxes."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _key(image: np.ndarray) -> tuple:
    return image.shape, hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


class SubjectSam:
    """A SAM that finds the subject drawn in each known image: its true mask, scored `score`, whatever
    the prompt (as SAM does when the subject is plain; the auto-labeller's gate then checks that the mask
    covers the attention peak). An image it was not given fails the test: the labeller must hand SAM the
    row's own decoded pixels.

    `prompts` records (box, points) of each prompted call, `unprompted` counts calls without a prompt."""

    available = True

    def __init__(self, subjects: Iterable[tuple[np.ndarray, np.ndarray]], score: float = 0.97):
        self.masks = {_key(image): mask.astype(bool) for image, mask in subjects}
        self.score = score
        self.prompts: list[tuple] = []
        self.unprompted = 0

    def _subject(self, image: np.ndarray) -> np.ndarray:
        mask = self.masks.get(_key(image))
        if mask is None:
            raise AssertionError(f"SAM was handed a {image.shape} image that is none of the drawn ones")
        return mask.copy()

    def __call__(self, image: np.ndarray) -> np.ndarray:
        self.unprompted += 1
        return self._subject(image)

    def prompted(self, image: np.ndarray, box=None, points=None) -> tuple[np.ndarray, float]:
        self.prompts.append((box, points))
        return self._subject(image), self.score


class DiscSam:
    """A SAM for images with no known subject (e.g. the tiny model's): a disc of `radius` around the
    first prompt point (moved right by `offset`), scored `score`. It is never asked unprompted (rows with
    an attention map are not segmented without a prompt): that fails the test."""

    available = True

    def __init__(self, score: float, radius: int = 8, offset: int = 0):
        self.score, self.radius, self.offset = score, radius, offset
        self.prompts: list[tuple] = []

    def prompted(self, image: np.ndarray, box=None, points=None) -> tuple[np.ndarray, float]:
        self.prompts.append((box, points))
        ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
        x, y = points[0][0] + self.offset, points[0][1]
        return (xs - x) ** 2 + (ys - y) ** 2 <= self.radius**2, self.score

    def __call__(self, image: np.ndarray) -> np.ndarray:
        raise AssertionError("rows with an attention map are not segmented unprompted")
