"""Benchmark: SpinML MI leakage meter, artifact-style reference vs vectorised version.

Run from the repository root:  .venv/bin/python bench/bench_leakage.py

One procedural 512x512 RGB pair (fixed seed). Rows:
  * MI(shared, object) on the pair, i.e. one ``mutual_information`` call (goal: >= 20x);
  * a whole L1 + L2 leakage score for the pair (letterbox, Canny, 3 MI calls per level),
    reference path vs ``object_leakage``, for context (letterbox/Canny are shared costs).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spinml_ray.leakage import (  # noqa: E402
    letterbox,
    mutual_information,
    object_leakage,
    reference_mutual_information,
)

GOAL = 20.0
TOL = 1e-9


def make_pair(size: int = 512, seed: int = 2026) -> tuple[np.ndarray, np.ndarray]:
    """Procedural raw image (texture + noise + ellipse object) and its object image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    bg = np.stack(
        [
            110 + 70 * np.sin(xx / 11.0) * np.cos(yy / 19.0),
            120 + 60 * np.sin((xx + 2 * yy) / 23.0),
            90 + 50 * np.cos(xx / 7.0 + yy / 29.0),
        ],
        axis=-1,
    ) + rng.normal(0.0, 15.0, size=(size, size, 3))
    cy, cx, ry, rx = 0.55 * size, 0.45 * size, 0.3 * size, 0.22 * size
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    fg = np.stack(
        [210 + 35 * np.sin(yy / 6.0), 70 + 40 * np.cos(xx / 9.0), 50 + 30 * np.sin(xx / 4.0)],
        axis=-1,
    ) + rng.normal(0.0, 10.0, size=(size, size, 3))
    raw = np.clip(np.where(mask[..., None], fg, bg), 0, 255).astype(np.uint8)
    obj = np.where(mask[..., None], raw, 0).astype(np.uint8)
    return obj, raw


def median_time(fn: Callable[[], float], reps: int) -> tuple[float, float]:
    """Median wall time of ``fn`` over ``reps`` runs (after one warm-up) and its result."""
    result = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def reference_scores(obj: np.ndarray, raw: np.ndarray) -> tuple[float, float]:
    """L1 and L2 leakage via the artifact path with the slow reference MI."""
    o, r = letterbox(obj), letterbox(raw)
    edges = cv2.Canny(cv2.cvtColor(o, cv2.COLOR_RGB2GRAY), 100, 200)
    shared_l1 = np.stack([edges] * 3, axis=-1)
    h_raw = reference_mutual_information(r, r)
    return (
        reference_mutual_information(shared_l1, o) / h_raw,
        reference_mutual_information(o, o) / h_raw,
    )


def main() -> int:
    obj, raw = make_pair()
    o = letterbox(obj)
    edges = cv2.Canny(cv2.cvtColor(o, cv2.COLOR_RGB2GRAY), 100, 200)
    shared = np.stack([edges] * 3, axis=-1)
    x, y = shared, o  # the L1 pair: 512*512*3 values each

    rows = []
    t_ref, mi_ref = median_time(lambda: reference_mutual_information(x, y), reps=7)
    t_fast, mi_fast = median_time(lambda: mutual_information(x, y), reps=31)
    t_ref_raw, h_ref = median_time(lambda: reference_mutual_information(raw, raw), reps=5)
    t_fast_raw, h_fast = median_time(lambda: mutual_information(raw, raw), reps=31)
    rows.append(("MI(L1 edges, object), reference", t_ref, 1.0))
    rows.append(("MI(L1 edges, object), fast", t_fast, t_ref / t_fast))
    rows.append(("MI(raw, raw), reference", t_ref_raw, 1.0))
    rows.append(("MI(raw, raw), fast", t_fast_raw, t_ref_raw / t_fast_raw))

    t_ref_e2e, ref_scores = median_time(lambda: reference_scores(obj, raw), reps=3)
    t_fast_e2e, fast_scores = median_time(
        lambda: (object_leakage(obj, raw, "L1"), object_leakage(obj, raw, "L2")), reps=15
    )
    rows.append(("L1+L2 scores end to end, reference", t_ref_e2e, 1.0))
    rows.append(("L1+L2 scores end to end, object_leakage", t_fast_e2e, t_ref_e2e / t_fast_e2e))

    diffs = [
        abs(mi_ref - mi_fast),
        abs(h_ref - h_fast),
        abs(ref_scores[0] - fast_scores[0]),
        abs(ref_scores[1] - fast_scores[1]),
    ]
    agree = max(diffs) <= TOL

    print(f"numpy {np.__version__}, opencv {cv2.__version__}; inputs 512x512x3 uint8, seed 2026")
    print(f"MI(L1 edges, object) = {mi_fast:.12f} nats, H(raw) = {h_fast:.12f} nats")
    print(f"leakage L1 = {fast_scores[0]:.6f}, L2 = {fast_scores[1]:.6f}")
    print()
    print("| implementation | median seconds | speed-up |")
    print("|---|---|---|")
    for name, secs, speed in rows:
        print(f"| {name} | {secs:.5f} | {speed:.1f}x |")
    print()
    print(f"max |fast - reference| = {max(diffs):.3e} (tolerance {TOL:g}): "
          f"{'AGREE' if agree else 'DISAGREE'}")
    speedup = t_ref / t_fast
    met = speedup >= GOAL
    print(f"goal: mutual_information >= {GOAL:.0f}x faster than the reference: "
          f"{speedup:.1f}x -> {'MET' if met else 'NOT MET'}")
    return 0 if (agree and met) else 1


if __name__ == "__main__":
    raise SystemExit(main())
