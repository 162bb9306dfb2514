"""What the demo shows once a request has run: accuracy next to chance, and one picture of the request.

`python -m spinbench.demo REQUEST --storage ROOT [--out demo.png]` prints the trained model's accuracy
on the user's real test set beside chance (and per state), and writes a sheet: the references as they
were released (each object's payload exactly, or an empty tile for L0), then a row of synthetic samples
per label. It reads only what the run stored.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from spinml_ray import storage
from spinml_ray.images import decode_rgb
from spinml_ray.spec import load_request

TILE = 64


def _tile(png: bytes | None) -> np.ndarray:
    from PIL import Image

    if png is None:
        return np.full((TILE, TILE, 3), 40, np.uint8)
    image = Image.fromarray(decode_rgb(png)).resize((TILE, TILE), Image.NEAREST)
    return np.asarray(image)


def sheet(sanitized: list[dict], synthetic: list[dict], labels: list[str], per_label: int = 8) -> np.ndarray:
    """Rows: the released target payloads, the released background payloads, then `per_label`
    synthetic images for each label (one row each)."""
    from spinbench.world import contact_sheet

    refs = sorted({r["ref_id"] for r in sanitized})[:per_label]
    by = {(r["ref_id"], r["object"]): r for r in sanitized}
    tiles = [_tile(by[(ref, obj)]["payload"]) for obj in ("target", "background") for ref in refs]
    tiles += [np.zeros((TILE, TILE, 3), np.uint8)] * ((-len(tiles)) % per_label)
    for label in labels:
        row = [_tile(r["image"]) for r in synthetic if r["label"] == label][:per_label]
        tiles += row + [np.zeros((TILE, TILE, 3), np.uint8)] * (per_label - len(row))
    return contact_sheet(tiles, columns=per_label, scale=2)


def report(request: str, storage_root: str, out: str | None = None) -> dict:
    spec = load_request(request)
    base = storage.RequestPaths(storage_root, spec.tenant, spec.request_id)
    metrics = storage.read_json(storage.join(base.model, "metrics.json"))
    chance = 1 / len(spec.labels)
    print(f"accuracy on {metrics['n']} real test images ({metrics['evaluated_on']}): {metrics['accuracy']:.3f} "
          f"(chance {chance:.3f}), privacy {spec.privacy.config}")
    for label, value in zip(spec.label_names, metrics["per_class_accuracy"]):
        print(f"  {label:>10}: {'-' if value is None else f'{value:.2f}'}")
    if out:
        from PIL import Image

        sanitized = storage.read_committed_table(base.sanitized).to_pylist()
        synthetic = storage.read_committed_table(base.synthetic).select(["label", "image"]).to_pylist()
        Image.fromarray(sheet(sanitized, synthetic, spec.label_names)).save(out)
        print(f"picture: {out} (rows: released target, released background, then synthetic images per label: "
              f"{', '.join(spec.label_names)})")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spinbench.demo", description=__doc__)
    parser.add_argument("request")
    parser.add_argument("--storage", required=True)
    parser.add_argument("--out", default=None, help="PNG sheet of what was released and generated")
    args = parser.parse_args(argv)
    report(args.request, args.storage, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
