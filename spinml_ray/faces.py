"""Blurring bystanders' faces inside released pixels, with OpenCV's bundled Haar cascade (offline)."""

from __future__ import annotations

import functools
import os

import cv2
import numpy as np

CASCADE = "haarcascade_frontalface_default.xml"


@functools.lru_cache(maxsize=1)
def _detector() -> cv2.CascadeClassifier:
    path = os.path.join(cv2.data.haarcascades, CASCADE)
    detector = cv2.CascadeClassifier(path)
    if detector.empty():
        raise RuntimeError(f"{path}: OpenCV's face cascade could not be loaded")
    return detector


def detect_faces(image: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Face boxes (x, y, w, h) in an HxWx3 uint8 RGB image."""
    gray = cv2.equalizeHist(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))
    smallest = max(12, min(gray.shape) // 40)
    found = _detector().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(smallest, smallest))
    return [tuple(int(v) for v in box) for box in (found if len(found) else [])]


def blur_faces(image: np.ndarray, region: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(image with every detected face that reaches into `region` strongly blurred, their number).
    Only pixels inside `region` change (released pixels outside it are black and stay black)."""
    faces = detect_faces(image)
    if region is not None:
        faces = [(x, y, w, h) for x, y, w, h in faces if region[y : y + h, x : x + w].any()]
    if not faces:
        return image, 0
    out = image.copy()
    for x, y, w, h in faces:
        pad = max(w, h) // 6
        x0, y0 = max(0, x - pad), max(0, y - pad)
        x1, y1 = min(image.shape[1], x + w + pad), min(image.shape[0], y + h + pad)
        patch = out[y0:y1, x0:x1]
        # Pixelate to a 4x4 grid, then smooth: no facial structure (or identity) survives.
        small = cv2.resize(patch, (4, 4), interpolation=cv2.INTER_AREA)
        coarse = cv2.resize(small, (patch.shape[1], patch.shape[0]), interpolation=cv2.INTER_LINEAR)
        blurred = cv2.GaussianBlur(coarse, (0, 0), max(2.0, max(w, h) / 8))
        keep = region[y0:y1, x0:x1, None] if region is not None else True
        out[y0:y1, x0:x1] = np.where(keep, blurred, patch)
    return out, len(faces)
