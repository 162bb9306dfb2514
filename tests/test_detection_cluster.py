"""A detection request end to end on the local Ray cluster: boxes from the conditioning, mAP, delivery."""

import io
import os

import numpy as np
import pytest
import torch
import yaml
from standins import DiscSam

from spinml_ray import storage
from spinml_ray.errors import StageError
from spinml_ray.examples import write_example
from spinml_ray.images import decode_png
from spinml_ray.training.detector import build_detector

pytestmark = pytest.mark.cluster


def run(request_uri, out, http_port):
    from spinml_ray.ray_layer.pipeline import run_request

    return run_request(request_uri, out, model="tiny", stages=("sanitize", "synthesize", "train"),
                       http_port=http_port, keep_serving=True)


def test_detection_request_trains_on_geometry_boxes_and_reports_map(tmp_path, synthesis, http_port, monkeypatch):
    write_example(str(tmp_path / "request"))
    out = str(tmp_path / "out")
    run(str(tmp_path / "request" / "detection.yaml"), out, http_port)
    base = os.path.join(out, "demo", "example-duck-detection")

    sanitized = {r["ref_id"]: r for r in storage.read_committed_table(os.path.join(base, "sanitized")).to_pylist()
                 if r["object"] == "target"}
    synthetic = storage.read_committed_table(os.path.join(base, "synthetic")).to_pylist()
    for row in synthetic:
        if row["pool"] == "L0_L0":
            assert row["box"] is None  # text only: nothing placed the duck ...
            heat = decode_png(row["attention"])  # ... so synthesis recorded where the model drew it
            assert heat.shape == (8, 8) and heat.max() == 255
            continue
        assert row["attention"] is None  # the geometry's box needs no map
        region = decode_png(sanitized[row["source_ref"]]["region"]) > 0  # the released L2 region
        ys, xs = np.nonzero(region)
        sy, sx = 64 / region.shape[0], 64 / region.shape[1]
        assert row["box"] == pytest.approx([xs.min() * sx, ys.min() * sy, (xs.max() + 1) * sx, (ys.max() + 1) * sy])

    model_dir = os.path.join(base, "model")
    metrics = storage.read_json(os.path.join(model_dir, "metrics.json"))
    assert metrics["task"] == "detection" and metrics["evaluated_on"] == "real test set" and metrics["n"] == 8
    # the tiny preset's random SAM is never confident enough for the attention-prompted labeller's gate
    assert metrics["boxes"] == {"geometry": 12, "autolabel": 0, "left_out": 4}
    # the test set has boxes of both labels, so every figure is a number (None only for a label absent)
    for key in ("map", "map_50", "map_75"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    assert len(metrics["per_label_map"]) == 2 and all(0.0 <= v <= 1.0 for v in metrics["per_label_map"])

    # The labeller's task, run here in this process on the same committed table with a SAM confident
    # enough for the gate: the maps this synthesis stored prompt it, and the L0_L0 images get its boxes.
    from spinml_ray import segmentation
    from spinml_ray.ray_layer.train import label_synthetic

    sam = DiscSam(score=0.95)
    monkeypatch.setattr(segmentation, "LazySegmenter", lambda loader: sam)
    boxes, counts = label_synthetic(os.path.join(base, "synthetic"), "tiny")
    assert counts == {"geometry": 12, "autolabel": 4, "left_out": 0} and len(sam.prompts) == 4
    for row in synthetic:
        if row["pool"] != "L0_L0":
            assert boxes[row["image_id"]] == pytest.approx(row["box"])
    for prompt_box, ((x, y),) in sam.prompts:  # each prompt: the map's peak, inside the box around it
        assert 0 <= x < 64 and 0 <= y < 64 and prompt_box[0] <= x < prompt_box[2] and prompt_box[1] <= y < prompt_box[3]
    autolabelled = [boxes[r["image_id"]] for r in synthetic if r["pool"] == "L0_L0"]
    assert sorted(autolabelled) == sorted(
        [max(0.0, x - 8), max(0.0, y - 8), min(64.0, x + 9), min(64.0, y + 9)] for _, ((x, y),) in sam.prompts)

    assert sorted(storage.read_manifest(model_dir)["files"]) == [
        "metrics.json", "model.onnx", "model.pt", "model.torchscript.pt", "settings.json"]
    model = build_detector("ssdlite320_mobilenet_v3_large", 2).eval()
    model.load_state_dict(torch.load(io.BytesIO(storage.read_bytes(os.path.join(model_dir, "model.pt")))))
    scripted = torch.jit.load(io.BytesIO(storage.read_bytes(os.path.join(model_dir, "model.torchscript.pt"))))
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        expected = model([image])[0]
    torch.testing.assert_close(scripted([image])[1][0]["boxes"], expected["boxes"])
    from spinml_ray.training.export import onnx_detections

    delivered = onnx_detections(storage.read_bytes(os.path.join(model_dir, "model.onnx")), image.numpy())
    assert delivered["boxes"].shape[1] == 4 and delivered["scores"].shape[1] == 3


def test_detection_with_no_trustworthy_box_fails_with_the_counts(tmp_path, synthesis, http_port):
    request = write_example(str(tmp_path / "request"))
    document = yaml.safe_load(open(os.path.join(os.path.dirname(request), "detection.yaml")))
    document.update(request_id="duck-l0", privacy={"target": "L0", "background": "L0"},
                    synthesis={**document["synthesis"], "images_per_label": 2})
    path = tmp_path / "request" / "l0.yaml"
    path.write_text(yaml.safe_dump(document))
    with pytest.raises(StageError) as info:
        run(str(path), str(tmp_path / "out"), http_port)
    message = str(info.value)
    assert "duck-l0" in message and "trustworthy box" in message and "'left_out': 4" in message
    assert storage.read_manifest(str(tmp_path / "out" / "demo" / "duck-l0" / "model")) is None
