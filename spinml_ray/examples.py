"""Procedural example data: scenes with an exact target mask, made in code (no downloads).

The subject is a yellow "rubber duck" (two ellipses) in one of two states, each with its own kind of
surrounding: `floating` on wavy water or `resting` on a wooden shelf. `write_example` writes a
complete request: reference images with masks (one JPEG carries EXIF orientation and GPS tags, to
exercise metadata stripping), a held-out test set with one folder per label and the ducks' boxes
(`test_set/boxes.json`), `request.yaml` (classify the duck's state) and `detection.yaml` (find the
duck and tell its state, with boxes).
"""

from __future__ import annotations

import json
import os

import numpy as np
import yaml
from PIL import Image

from spinml_ray.images import box_of_mask

LABELS = {"floating": "floating in water", "resting": "resting on a wooden shelf"}
GPS_IFD = 0x8825
ORIENTATION = 0x0112


def make_scene(label: str, seed: int, size: tuple[int, int] = (96, 128)) -> tuple[np.ndarray, np.ndarray]:
    """(HxWx3 uint8 image, HxW bool target mask) for one procedural scene."""
    if label not in LABELS:
        raise ValueError(f"label {label!r} is not one of {sorted(LABELS)}")
    rng = np.random.default_rng(seed)
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    if label == "floating":
        waves = np.sin(xx / rng.uniform(4, 8) + np.sin(yy / rng.uniform(6, 10)) * 2.0)
        base = np.stack([30 + 20 * waves, 90 + 30 * waves, 170 + 40 * waves], axis=-1)
    else:
        grain = np.sin(yy / rng.uniform(1.5, 3.0) + rng.uniform(0, 6)) * 15
        base = np.stack([140 + grain, 95 + grain, 55 + grain * 0.5], axis=-1)
    image = base + rng.normal(0, 6, base.shape)
    cy = rng.uniform(0.45, 0.6) * height
    cx = rng.uniform(0.35, 0.65) * width
    ry, rx = rng.uniform(0.14, 0.2) * height, rng.uniform(0.16, 0.24) * width
    body = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    hy, hx, hr = cy - ry * 1.1, cx + rx * 0.45, ry * 0.6
    head = ((yy - hy) / hr) ** 2 + ((xx - hx) / hr) ** 2 <= 1.0
    beak = (np.abs(yy - hy) <= hr * 0.25) & (xx >= hx + hr * 0.7) & (xx <= hx + hr * 1.4)
    mask = body | head | beak
    shade = 1.0 - 0.25 * np.clip((yy - cy) / (ry * 2), -1, 1)
    duck = np.stack([235 * shade, 200 * shade, 40 * shade], axis=-1)
    image = np.where(mask[..., None], duck, image)
    image[beak] = (230, 110, 20)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _save_with_exif(image: np.ndarray, path: str) -> None:
    """Save as JPEG stored sideways with an EXIF orientation tag (6) and a GPS position."""
    stored = Image.fromarray(image).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    gps = exif.get_ifd(GPS_IFD)
    gps.update({1: "N", 2: (37.0, 46.0, 29.7), 3: "W", 4: (122.0, 25.0, 9.9)})
    stored.save(path, format="JPEG", quality=95, exif=exif)


def write_example(out_dir: str, references_per_label: int = 2, test_per_label: int = 4, seed: int = 7) -> str:
    """Write the example request and its data under `out_dir`; returns the request file's path."""
    for sub in ("references", "masks"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    references = []
    for li, label in enumerate(LABELS):
        for k in range(references_per_label):
            name = f"{label}-{k}"
            image, mask = make_scene(label, seed * 1000 + li * 100 + k)
            if li == 0 and k == 0:
                ref_name = f"references/{name}.jpg"
                _save_with_exif(image, os.path.join(out_dir, ref_name))
            else:
                ref_name = f"references/{name}.png"
                Image.fromarray(image).save(os.path.join(out_dir, ref_name))
            Image.fromarray(mask.astype(np.uint8) * 255).save(os.path.join(out_dir, f"masks/{name}.png"))
            references.append({"uri": ref_name, "label": label, "mask_uri": f"masks/{name}.png"})
    boxes = {}
    for li, label in enumerate(LABELS):
        folder = os.path.join(out_dir, "test_set", label)
        os.makedirs(folder, exist_ok=True)
        for k in range(test_per_label):
            image, mask = make_scene(label, seed * 1000 + 50_000 + li * 100 + k)
            Image.fromarray(image).save(os.path.join(folder, f"{k}.png"))
            boxes[f"{label}/{k}.png"] = [box_of_mask(mask)]
    with open(os.path.join(out_dir, "test_set", "boxes.json"), "w") as handle:
        handle.write("{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in boxes.items()) + "\n}\n")
    request = {
        "request_id": "example-duck",
        "tenant": "demo",
        "task": "classification",
        "subject": "yellow rubber duck",
        "labels": [{"name": name, "phrase": phrase} for name, phrase in LABELS.items()],
        "references": references,
        "privacy": {"target": "L1", "background": "L0", "alpha": 0.25},
        "synthesis": {"images_per_label": 8, "resolution": 64, "steps": 8, "guidance": 5.0, "seed": 0},
        "training": {"architecture": "mobilenet_v2", "epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "image_size": 64},
        "test_set": "test_set",
    }
    detection = {
        **request,
        "request_id": "example-duck-detection",
        "task": "detection",
        "privacy": {"target": "L2", "background": "L0", "alpha": 0.25},
        "personalization": {"enabled": False},
        "training": {**request["training"], "architecture": "ssdlite320_mobilenet_v3_large", "batch_size": 4},
    }
    for name, document in (("detection.yaml", detection), ("request.yaml", request)):
        path = os.path.join(out_dir, name)
        with open(path, "w") as handle:
            handle.write("# Example SpinML request, written by `spinml example` (procedural scenes, exact masks).\n")
            yaml.safe_dump(document, handle, sort_keys=False)
    return path


if __name__ == "__main__":
    import sys

    print(write_example(sys.argv[1] if len(sys.argv) > 1 else "examples"))
