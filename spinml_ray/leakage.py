"""SpinML mutual-information (MI) leakage meter.

Implements the SpinML artifact's per-object privacy metric (docs/DESIGN.md, "Levels: what leaves, per object"):

1. letterbox the object image (object pixels, black elsewhere) and the raw image to
   512x512 (LANCZOS, aspect ratio kept, pasted centred on black);
2. the shared representation is ``cv2.Canny(gray, 100, 200)`` of the letterboxed object
   image stacked to 3 channels for L1, and the letterboxed object image itself for L2;
3. MI(shared, object) from ``numpy.histogram2d(shared, object, bins=256)`` (default
   range), in nats;
4. normalised by MI(raw, raw) (the binned entropy of the letterboxed raw image).
   L0 shares nothing and scores 0.

:func:`mutual_information` is a vectorised, histogram-of-values version that reproduces
``numpy.histogram2d``'s binning exactly (same ``linspace`` edges, same right-edge rule,
same +-0.5 widening of constant inputs); :func:`reference_mutual_information` is the slow
artifact-style formula kept only as a parity/benchmark baseline.
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "LEVELS",
    "letterbox",
    "reference_mutual_information",
    "mutual_information",
    "object_leakage",
]

LEVELS = ("L0", "L1", "L2")
_LETTERBOX_SIZE = 512


def letterbox(img: np.ndarray, size: int = _LETTERBOX_SIZE) -> np.ndarray:
    """Resize ``img`` (HxWx3 uint8) with LANCZOS to fit ``size``x``size``, centred on black.

    ``scale = min(size / w, size / h)`` and the new size is ``(int(w * scale),
    int(h * scale))``, i.e. rounded *down* (Python ``int`` truncation, as in the artifact);
    each side is clamped to at least 1 pixel so extreme aspect ratios do not crash PIL.
    The resized image is pasted at ``((size - nw) // 2, (size - nh) // 2)``.
    """
    arr = np.asarray(img)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"letterbox expects an HxWx3 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"letterbox expects a uint8 image, got dtype {arr.dtype}")
    h, w = arr.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"letterbox got an empty image of shape {arr.shape}")
    scale = min(size / w, size / h)
    nw = max(1, int(w * scale))
    nh = max(1, int(h * scale))
    resized = Image.fromarray(np.ascontiguousarray(arr)).resize(
        (nw, nh), Image.LANCZOS
    )
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(canvas, dtype=np.uint8)


def _flat_pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten two arrays and check they hold the same, non-zero number of values."""
    xf = np.asarray(x).ravel()
    yf = np.asarray(y).ravel()
    if xf.size != yf.size:
        raise ValueError(f"x and y must have the same number of values ({xf.size} != {yf.size})")
    if xf.size == 0:
        raise ValueError("mutual information of empty arrays is undefined")
    return xf, yf


def reference_mutual_information(x: np.ndarray, y: np.ndarray, bins: int = 256) -> float:
    """Artifact-style MI in nats: ``numpy.histogram2d`` plus a Python double loop.

    Slow on purpose. Kept ONLY as the parity baseline for tests and the benchmark;
    use :func:`mutual_information` everywhere else.
    """
    xf, yf = _flat_pair(x, y)
    hist, _, _ = np.histogram2d(xf, yf, bins=bins)
    pxy = hist / float(np.sum(hist))
    px = np.sum(pxy, axis=1)
    py = np.sum(pxy, axis=0)
    mi = 0.0
    for i in range(pxy.shape[0]):
        for j in range(pxy.shape[1]):
            if pxy[i, j] > 0:
                mi += pxy[i, j] * np.log(pxy[i, j] / (px[i] * py[j]))
    return float(mi)


def _value_to_bin(lo: int, hi: int, bins: int) -> np.ndarray:
    """Bin index, as ``numpy.histogram2d`` assigns it, for every integer in ``lo..hi``.

    Mirrors numpy's ``histogramdd``: edges ``np.linspace(first, last, bins + 1)`` where a
    constant input (``lo == hi``) is widened to ``(lo - 0.5, hi + 0.5)``; the bin is
    ``searchsorted(edges, v, side="right") - 1``, and a value equal to the last edge is
    moved into the last bin. Using numpy's own float edges (rather than an integer
    ``floor((v - lo) * bins / (hi - lo))``) keeps ties identical for any ``bins``.
    """
    first: float = float(lo)
    last: float = float(hi)
    if first == last:
        first -= 0.5
        last += 0.5
    edges = np.linspace(first, last, bins + 1)
    values = np.arange(lo, hi + 1, dtype=np.float64)
    idx = np.searchsorted(edges, values, side="right")
    idx[values == edges[-1]] -= 1
    return (idx - 1).astype(np.intp)


def _mi_from_counts(counts: np.ndarray) -> float:
    """MI in nats from a 2-D joint count table (same per-cell formula as the reference)."""
    counts = np.asarray(counts, dtype=np.float64)
    pxy = counts / float(np.sum(counts))
    px = np.sum(pxy, axis=1)
    py = np.sum(pxy, axis=0)
    ii, jj = np.nonzero(pxy > 0)
    p = pxy[ii, jj]
    return float(np.sum(p * np.log(p / (px[ii] * py[jj]))))


def _as_small_ints(a: np.ndarray) -> np.ndarray | None:
    """``a`` as uint8 when it is an integer/bool array with values in 0..255, else None."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
        if int(a.min()) >= 0 and int(a.max()) <= 255:
            return a.astype(np.uint8)
    return None


def _group_starts(value_bins: np.ndarray) -> np.ndarray | None:
    """Start offsets of runs of equal bins (for ``np.add.reduceat``); None if all distinct.

    ``value_bins`` is non-decreasing, so values sharing a histogram2d bin are contiguous.
    Bins that receive no value have zero counts and add nothing to MI, so merging the
    runs gives the same MI as scattering into the full ``bins x bins`` table.
    """
    if value_bins.size < 2 or bool(np.all(np.diff(value_bins) > 0)):
        return None
    return np.flatnonzero(np.r_[True, np.diff(value_bins) > 0])


# float32 represents every integer up to 2**24 exactly; above that, count with numpy.
_CALCHIST_MAX_VALUES = 2**24


def _joint_value_histogram(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """256x256 float64 counts of the (x, y) uint8 value pairs (exact integers).

    ``cv2.calcHist`` with unit-width bins over [0, 256) is the fastest exact counter; it
    returns float32, exact while the total is at most 2**24. Larger inputs use a
    ``np.bincount`` of the uint16 index ``x * 256 + y``.
    """
    if xs.size <= _CALCHIST_MAX_VALUES:
        hist = cv2.calcHist(
            [xs.reshape(-1, 1), ys.reshape(-1, 1)], [0, 1], None, [256, 256], [0, 256, 0, 256]
        )
        return hist.astype(np.float64)
    index = xs.astype(np.uint16)
    index <<= 8
    index |= ys
    return np.bincount(index, minlength=256 * 256).reshape(256, 256).astype(np.float64)


def mutual_information(x: np.ndarray, y: np.ndarray, bins: int = 256) -> float:
    """MI in nats of ``numpy.histogram2d(x, y, bins)`` with default ranges, vectorised.

    Fast path (integer/bool values in 0..255, e.g. uint8 images): one counting pass
    (:func:`_joint_value_histogram`) builds the 256x256 joint histogram of the raw
    values; its value axes are then grouped into histogram2d's bins
    (:func:`_value_to_bin`, exact numpy edge rules) with ``np.add.reduceat``. Other
    inputs fall back to ``numpy.histogram2d``. Either way the
    per-cell MI formula is the reference's, vectorised; results equal
    :func:`reference_mutual_information` up to float summation order (~1e-15).
    """
    if isinstance(bins, bool) or not (isinstance(bins, (int, np.integer)) and bins >= 1):
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    bins = int(bins)
    xf, yf = _flat_pair(x, y)
    xs = _as_small_ints(xf)
    ys = _as_small_ints(yf)
    if xs is None or ys is None:
        hist, _, _ = np.histogram2d(xf, yf, bins=bins)
        return _mi_from_counts(hist)

    joint = _joint_value_histogram(xs, ys)
    rows = np.flatnonzero(joint.any(axis=1))
    cols = np.flatnonzero(joint.any(axis=0))
    xlo, xhi = int(rows[0]), int(rows[-1])
    ylo, yhi = int(cols[0]), int(cols[-1])
    block = joint[xlo : xhi + 1, ylo : yhi + 1]
    starts_x = _group_starts(_value_to_bin(xlo, xhi, bins))
    if starts_x is not None:
        block = np.add.reduceat(block, starts_x, axis=0)
    starts_y = _group_starts(_value_to_bin(ylo, yhi, bins))
    if starts_y is not None:
        block = np.add.reduceat(block, starts_y, axis=1)
    return _mi_from_counts(block)


def _shared_representation(
    object_lb: np.ndarray, level: str, canny_low: float, canny_high: float
) -> np.ndarray:
    """What a level shares about the (letterboxed) object: Canny edges (L1) or pixels (L2)."""
    if level == "L1":
        gray = cv2.cvtColor(object_lb, cv2.COLOR_RGB2GRAY)
        edges = cv2.Canny(gray, canny_low, canny_high)
        return np.stack([edges, edges, edges], axis=-1)
    return object_lb


def object_leakage(
    object_rgb: np.ndarray,
    raw_rgb: np.ndarray,
    level: str,
    canny_low: float = 100,
    canny_high: float = 200,
    released_rgb: np.ndarray | None = None,
    about_rgb: np.ndarray | None = None,
) -> float:
    """Normalised MI leakage ``MI(shared, object) / MI(raw, raw)`` of one object at ``level``.

    ``object_rgb`` holds the object's pixels (black elsewhere), ``raw_rgb`` the raw image;
    both HxWx3 uint8 and letterboxed to 512x512 first. "L0" returns 0.0, "L1" uses the
    Canny edges of the letterboxed object, "L2" the letterboxed object itself. If the
    letterboxed raw image has zero binned entropy (a constant image) the ratio is
    undefined and 0.0 is returned. Raises ValueError for any other level.

    ``released_rgb`` (L2 only) is what is actually released when it differs from the object
    image (e.g. faces blurred); the shared representation is then that image, letterboxed.
    Without it (or when it equals the object image) the value is the artifact's.

    ``about_rgb`` measures what the object's release tells about *another* object of the image
    (cross-object MI, e.g. the target's edges about the background): ``MI(shared, about) / MI(raw, raw)``.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown privacy level {level!r}; expected one of {LEVELS}")
    if level == "L0":
        return 0.0
    object_lb = letterbox(object_rgb)
    raw_lb = letterbox(raw_rgb)
    raw_mi = mutual_information(raw_lb, raw_lb)
    if raw_mi <= 0.0:
        return 0.0
    if level == "L2" and released_rgb is not None:
        shared = letterbox(released_rgb)
    else:
        shared = _shared_representation(object_lb, level, canny_low, canny_high)
    return mutual_information(shared, object_lb if about_rgb is None else letterbox(about_rgb)) / raw_mi
