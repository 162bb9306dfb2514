"""Detection without Ray: boxes, the auto-labeller's gate, the detector, mAP, the test set, exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from standins import SubjectSam

from spinml_ray.autolabel import trusted_boxes
from spinml_ray.examples import make_scene
from spinml_ray.images import box_of_mask, encode_png
from spinml_ray.models.source import sam_loader
from spinml_ray.segmentation import LazySegmenter, SegmentationError
from spinml_ray.training import detector
from spinml_ray.training.export import detector_to_onnx, detector_to_torchscript, onnx_detections

SSD = "ssdlite320_mobilenet_v3_large"


def scenes(n: int, size=(64, 64)):
    """Encoded duck scenes, their exact boxes and label indices (alternating states)."""
    images, boxes, labels = [], [], []
    for i in range(n):
        label = ("floating", "resting")[i % 2]
        image, mask = make_scene(label, 300 + i, size=size)
        images.append(encode_png(image))
        boxes.append([box_of_mask(mask)])
        labels.append([i % 2])
    return images, boxes, labels


# ---------------------------------------------------------------- boxes and data


def test_box_of_mask_uses_pixel_edges():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:9] = True
    assert box_of_mask(mask) == [3.0, 2.0, 9.0, 5.0]
    assert box_of_mask(np.zeros((4, 4), bool)) is None


def test_prepare_scales_boxes_to_the_training_size_and_shifts_labels():
    image = encode_png(np.zeros((40, 80, 3), np.uint8))  # 80 wide, 40 high
    batch, targets = detector.prepare([image], [[[8.0, 4.0, 40.0, 20.0]]], [[1]], size=20)
    assert batch.shape == (1, 3, 20, 20) and batch.dtype == torch.uint8
    assert targets[0]["boxes"].tolist() == [[2.0, 2.0, 10.0, 10.0]]
    assert targets[0]["labels"].tolist() == [2]  # label index 1 -> detector class 2 (0 is background)


# ---------------------------------------------------------------- auto-labeller gate


def test_trusted_boxes_keeps_geometry_and_gates_the_autolabeller():
    image = encode_png(np.zeros((32, 32, 3), np.uint8))
    good = np.zeros((32, 32), bool)
    good[8:20, 4:16] = True
    speck = np.zeros((32, 32), bool)
    speck[0, 0] = True
    answers = {"b": good, "c": speck}
    asked = []

    def segment(array):
        asked.append(segment.current)
        answer = answers[segment.current]
        if answer is None:
            raise SegmentationError("nothing")
        return answer

    rows = [{"image_id": "a", "box": [1.0, 2.0, 3.0, 4.0], "image": image},
            {"image_id": "b", "box": None, "image": image},
            {"image_id": "c", "box": None, "image": image},
            {"image_id": "d", "box": None, "image": image}]
    answers["d"] = None

    def rows_in_turn():
        for row in rows:
            segment.current = row["image_id"]
            yield row

    boxes, counts = trusted_boxes(rows_in_turn(), segment)
    assert asked == ["b", "c", "d"]  # SAM is asked about every image without a box, and only those
    assert boxes == {"a": [1.0, 2.0, 3.0, 4.0], "b": [4.0, 8.0, 16.0, 20.0]}
    assert counts == {"geometry": 1, "autolabel": 1, "left_out": 2}  # a speck and nothing are left out

    boxes, counts = trusted_boxes(rows, None)  # no auto-labeller: only geometry counts
    assert set(boxes) == {"a"} and counts == {"geometry": 1, "autolabel": 0, "left_out": 3}


def test_a_confident_sam_boxes_each_drawn_subject_unprompted():
    """Images without a box or an attention map: SAM's automatic masks, through the size gate, give
    the box of the subject drawn in each image."""
    drawn = [make_scene(("floating", "resting")[i % 2], 300 + i, size=(64, 64)) for i in range(3)]
    rows = [{"image_id": "geo", "box": [1.0, 2.0, 30.0, 40.0], "image": encode_png(drawn[0][0])}]
    rows += [{"image_id": str(i), "box": None, "image": encode_png(image)} for i, (image, _) in enumerate(drawn)]
    sam = SubjectSam(drawn)
    boxes, counts = trusted_boxes(rows, sam)
    assert sam.unprompted == 3 and sam.prompts == []  # the unprompted path, once per image without a box
    assert counts == {"geometry": 1, "autolabel": 3, "left_out": 0}
    assert boxes["geo"] == [1.0, 2.0, 30.0, 40.0]
    for i, (_, mask) in enumerate(drawn):
        assert boxes[str(i)] == box_of_mask(mask)  # exactly the drawn subject's box

    huge = SubjectSam([(image, np.ones(mask.shape, bool)) for image, mask in drawn])  # SAM took the whole frame
    assert trusted_boxes(rows, huge) == ({"geo": [1.0, 2.0, 30.0, 40.0]}, {"geometry": 1, "autolabel": 0, "left_out": 3})
    assert huge.unprompted == 3


def test_the_tiny_sam_is_asked_and_never_passes_the_gate(model_cache):
    """The preset's SAM (seeded random weights) runs its automatic masks on every image; none is scored
    as good (predicted IoU >= 0.88), so every image is left out, none boxed by chance."""
    images, _, _ = scenes(3)
    rows = [{"image_id": str(i), "box": None, "image": data} for i, data in enumerate(images)]
    segmenter = LazySegmenter(sam_loader("tiny"))
    assert segmenter.available
    generated = []
    automatic = segmenter.loaded.automatic
    real_generate = automatic.generate

    def generate(image):
        generated.append(real_generate(image))
        return generated[-1]

    automatic.generate = generate
    boxes, counts = trusted_boxes(rows, segmenter)
    assert len(generated) == 3 and generated == [[], [], []]  # asked each time; no mask passed SAM's own thresholds
    assert boxes == {} and counts == {"geometry": 0, "autolabel": 0, "left_out": 3}


# ---------------------------------------------------------------- detector and mAP


def test_unknown_detector_and_foreign_weights_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a supported detector"):
        detector.build_detector("yolo", 2)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="junk.pth"):
        detector.build_detector(SSD, 2, str(tmp_path / "junk.pth"))


def test_pretrained_detector_keeps_the_backbone_and_renews_the_class_head(tmp_path):
    torch.manual_seed(1)
    source = detector.build_detector(SSD, 5)
    torch.save(source.state_dict(), tmp_path / "coco.pth")
    model = detector.build_detector(SSD, 2, str(tmp_path / "coco.pth"))
    own, theirs = model.state_dict(), source.state_dict()
    backbone = [k for k in own if k.startswith("backbone.")]
    assert backbone and all(torch.equal(own[k], theirs[k]) for k in backbone)
    heads = [k for k in own if own[k].shape != theirs[k].shape]
    assert heads and all("classification_head" in k for k in heads)


def test_map_is_one_for_exact_boxes_and_drops_with_a_shifted_box():
    truth = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0]]), "labels": torch.tensor([1])},
             {"boxes": torch.tensor([[5.0, 5.0, 25.0, 45.0]]), "labels": torch.tensor([2])}]
    exact = [{**t, "scores": torch.tensor([0.9])} for t in truth]
    result = detector.mean_average_precision(exact, truth, num_labels=3)
    assert result["map"] == pytest.approx(1.0) and result["map_50"] == pytest.approx(1.0)
    assert result["per_label_map"][:2] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert result["per_label_map"][2] is None  # label 3 is in neither truth nor predictions
    shifted = [dict(exact[0], boxes=torch.tensor([[16.0, 10.0, 56.0, 50.0]])), exact[1]]  # IoU 0.74 with its truth
    result = detector.mean_average_precision(shifted, truth, num_labels=3)
    assert result["map_50"] == pytest.approx(1.0)
    assert result["map_75"] == pytest.approx(0.5)  # one of the two labels misses at IoU 0.75
    assert result["map"] < 1.0


def test_detector_training_lowers_the_loss_on_fixed_scenes():
    torch.manual_seed(0)
    images, boxes, labels = scenes(4)
    batch, targets = detector.prepare(images, boxes, labels, size=64)
    model = detector.build_detector(SSD, 2)
    loader = torch.utils.data.DataLoader(detector.DetectionData(batch, targets), batch_size=4, collate_fn=detector.collate)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = [detector.train_epoch(model, loader, optimizer, "cpu") for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses
    result = detector.evaluate(model, batch, targets, num_labels=2)
    assert result["n"] == 4 and 0.0 <= result["map"] <= 1.0


# ---------------------------------------------------------------- test set


def write_test_set(root, boxes: dict | str | None):
    for label in ("floating", "resting"):
        (root / label).mkdir(parents=True)
        image, _ = make_scene(label, 1, size=(40, 60))
        (root / label / "0.png").write_bytes(encode_png(image))
    if boxes is not None:
        (root / "boxes.json").write_text(boxes if isinstance(boxes, str) else json.dumps(boxes))


def test_load_test_set_reads_images_boxes_and_labels(tmp_path):
    write_test_set(tmp_path, {"floating/0.png": [[1, 2, 30, 20]], "resting/0.png": []})
    images, boxes, labels = detector.load_test_set(str(tmp_path), ["floating", "resting"])
    assert len(images) == 2 and boxes == [[[1.0, 2.0, 30.0, 20.0]], []] and labels == [[0], []]


@pytest.mark.parametrize("boxes, error, problem", [
    (None, FileNotFoundError, "boxes.json: a detection test set needs"),
    ("{not json", ValueError, "not valid JSON"),
    ({"floating/0.png": [[1, 2, 30, 20]]}, ValueError, "no entry for 'resting/0.png'"),
    ({"floating/0.png": [[30, 2, 1, 20]], "resting/0.png": []}, ValueError, "'floating/0.png' = [[30, 2, 1, 20]]"),
])
def test_bad_detection_test_sets_are_named(tmp_path, boxes, error, problem):
    write_test_set(tmp_path, boxes)
    with pytest.raises(error) as info:
        detector.load_test_set(str(tmp_path), ["floating", "resting"])
    assert problem in str(info.value)


# ---------------------------------------------------------------- delivery


@pytest.mark.parametrize("architecture", [SSD, "fasterrcnn_mobilenet_v3_large_320_fpn"])
def test_exported_detector_matches_pytorch(architecture):
    import io

    from spinml_ray.training.export import SSDAnchors

    torch.manual_seed(0)
    model = detector.build_detector(architecture, 2).eval()
    image = torch.from_numpy(make_scene("floating", 5, size=(64, 64))[0]).permute(2, 0, 1).float() / 255.0
    with torch.no_grad():
        expected = model([image])[0]
    onnx = onnx_detections(detector_to_onnx(model, 64), image.numpy())
    if architecture == SSD:  # per-anchor outputs before NMS: they must be the model's own
        with torch.no_grad():
            boxes, scores = SSDAnchors(model)(image)
        np.testing.assert_allclose(onnx["scores"], scores.numpy(), atol=1e-5)
        np.testing.assert_allclose(onnx["boxes"], boxes.numpy(), atol=1e-3)
        assert onnx["scores"].shape[1] == 3 and onnx["boxes"].max() <= 64
        # the detector's final boxes are among the anchors' boxes (clipping and scaling agree)
        final = expected["boxes"][:5].numpy()
        assert all(np.abs(onnx["boxes"] - b).max(axis=1).min() < 1e-3 for b in final)
    else:
        np.testing.assert_allclose(onnx["boxes"], expected["boxes"].numpy(), atol=1e-3)
        np.testing.assert_allclose(onnx["scores"], expected["scores"].numpy(), atol=1e-4)
        np.testing.assert_array_equal(onnx["labels"], expected["labels"].numpy())
    scripted = torch.jit.load(io.BytesIO(detector_to_torchscript(model)))
    _, outputs = scripted([image])  # scripted torchvision detectors return (losses, detections)
    torch.testing.assert_close(outputs[0]["boxes"], expected["boxes"])
