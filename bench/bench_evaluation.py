"""SIM and replication over embeddings: batched (`evaluation.py`, one matrix product) against a naive
per-pair loop (a cosine per (synthetic, reference) pair, as a first script would), in the same run.

The workload is the report's: 1,000 synthetic images x 8 reference images per object, embeddings of
an image encoder's width (random here: the arithmetic does not depend on the values). Both compute
SIM (the mean over all pairs) and each synthetic image's nearest reference; the script checks that
they agree before it reports times.

    .venv/bin/python bench/bench_evaluation.py [--synthetic 1000] [--references 8] [--dim 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from spinml_ray import evaluation


def naive(synthetic: np.ndarray, references: np.ndarray) -> tuple[float, np.ndarray]:
    total, nearest = 0.0, np.full(len(synthetic), -1.0)
    for i, s in enumerate(synthetic):
        for r in references:
            cosine = float(np.dot(s, r) / (np.linalg.norm(s) * np.linalg.norm(r)))
            total += cosine
            nearest[i] = max(nearest[i], cosine)
    return total / (len(synthetic) * len(references)), nearest


def batched(synthetic: np.ndarray, references: np.ndarray) -> tuple[float, np.ndarray]:
    return evaluation.sim(synthetic, references), evaluation.replication(synthetic, references).nearest


def timed(function, *args, repeats: int) -> tuple[list[float], object]:
    seconds, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function(*args)
        seconds.append(time.perf_counter() - started)
    return seconds, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", type=int, default=1000)
    parser.add_argument("--references", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    synthetic = rng.normal(size=(args.synthetic, args.dim))
    references = rng.normal(size=(args.references, args.dim))
    slow, (slow_sim, slow_nearest) = timed(naive, synthetic, references, repeats=args.repeats)
    fast, (fast_sim, fast_nearest) = timed(batched, synthetic, references, repeats=args.repeats)
    assert abs(slow_sim - fast_sim) < 1e-9 and np.allclose(slow_nearest, fast_nearest, atol=1e-9), "results differ"
    print(f"{args.synthetic} synthetic x {args.references} references, {args.dim}-d embeddings, {args.repeats} runs each")
    print("| method | median s | min s | speed-up |")
    print("|---|---|---|---|")
    for name, seconds in (("naive per-pair loop", slow), ("batched (evaluation.py)", fast)):
        print(f"| {name} | {statistics.median(seconds):.4f} | {min(seconds):.4f} | "
              f"{statistics.median(slow) / statistics.median(seconds):.0f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
