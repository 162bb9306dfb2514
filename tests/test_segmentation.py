"""Tests for finding the target (spinml_ray/segmentation.py): the automatic-mask rule, the tiny SAM
loaded like a real one, box/point prompts, lazy loading, and the box fallback when no SAM exists."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from spinml_ray.bundle import BadReference, sanitize_all, sanitize_reference
from spinml_ray.examples import make_scene
from spinml_ray.images import decode_png
from spinml_ray.models.source import resolve_sam, sam_loader
from spinml_ray.models.tiny import write_tiny_sam
from spinml_ray.segmentation import (
    MAX_AUTOMATIC_FRACTION,
    LazySegmenter,
    SegmentationError,
    Segmenter,
    load_sam,
    pick_automatic_mask,
)
from spinml_ray.spec import SanitizationSpec

H, W = 40, 50


def rect(y0, y1, x0, x1, shape=(H, W)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


# ---------------------------------------------------------------- pick_automatic_mask


def test_empty_list_gives_none():
    assert pick_automatic_mask([], []) is None


def test_largest_mask_covering_the_centre_wins():
    small_central = rect(15, 25, 20, 30)  # covers (20, 25)
    large_central = rect(5, 35, 10, 40)
    larger_elsewhere = rect(0, 19, 0, 50)  # bigger still, but misses the centre (20, 25)
    masks = [small_central, larger_elsewhere, large_central]
    assert larger_elsewhere.sum() > large_central.sum() > small_central.sum()
    chosen = pick_automatic_mask(masks, [0.99, 0.98, 0.10])  # IoU does not matter when one covers the centre
    assert chosen is large_central


def test_centre_beats_predicted_iou():
    central = rect(18, 22, 23, 27)
    off_centre = rect(0, 10, 0, 10)
    assert pick_automatic_mask([off_centre, central], [0.99, 0.01]) is central


def test_background_sized_mask_is_never_chosen():
    almost_all = np.ones((H, W), bool)
    almost_all[:2, :2] = False  # > 90% and covers the centre
    assert almost_all.sum() > MAX_AUTOMATIC_FRACTION * H * W
    assert pick_automatic_mask([almost_all], [1.0]) is None
    off_centre = rect(0, 5, 0, 5)
    # even with the higher predicted IoU, and covering the centre, it loses to any admissible mask
    assert pick_automatic_mask([almost_all, off_centre], [0.99, 0.2]) is off_centre
    central = rect(15, 25, 20, 30)
    assert pick_automatic_mask([almost_all, central], [0.99, 0.2]) is central


def test_exactly_ninety_percent_is_still_admissible():
    mask = np.zeros((10, 10), bool)
    mask[:9, :] = True  # 90 of 100 pixels, covers (5, 5)
    assert pick_automatic_mask([mask], [0.5]) is mask


def test_without_a_central_mask_the_highest_iou_wins():
    a = rect(0, 5, 0, 5)
    b = rect(0, 15, 0, 15)  # the largest, but not the best predicted
    c = rect(30, 40, 40, 50)
    assert pick_automatic_mask([a, b, c], [0.3, 0.5, 0.9]) is c
    assert pick_automatic_mask([a, b, c], [0.3, 0.95, 0.9]) is b


# ---------------------------------------------------------------- the tiny SAM


@pytest.fixture(scope="module")
def tiny_sam_dir():
    path = resolve_sam("tiny")
    assert path is not None and os.path.isdir(path)
    return path


@pytest.fixture(scope="module")
def segmenter(tiny_sam_dir):
    return Segmenter(tiny_sam_dir, device="cpu")


@pytest.fixture(scope="module")
def scene():
    return make_scene("floating", 4)


def test_tiny_sam_folder_names_its_arch_and_checkpoint(tiny_sam_dir):
    with open(os.path.join(tiny_sam_dir, "sam.json")) as handle:
        config = json.load(handle)
    assert config["arch"] == "tiny"
    assert os.path.isfile(os.path.join(tiny_sam_dir, config["checkpoint"]))


def test_load_sam_builds_the_tiny_arch_with_the_saved_weights(tiny_sam_dir):
    from segment_anything.modeling import Sam

    sam = load_sam(tiny_sam_dir, device="cpu")
    assert isinstance(sam, Sam)
    assert not sam.training
    assert sam.image_encoder.img_size == 128
    with open(os.path.join(tiny_sam_dir, "sam.json")) as handle:
        checkpoint = os.path.join(tiny_sam_dir, json.load(handle)["checkpoint"])
    saved = torch.load(checkpoint, map_location="cpu")
    loaded = sam.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_write_tiny_sam_is_seeded(tmp_path):
    a = load_sam(write_tiny_sam(str(tmp_path / "a"), seed=1), device="cpu").state_dict()
    b = load_sam(write_tiny_sam(str(tmp_path / "b"), seed=1), device="cpu").state_dict()
    c = load_sam(write_tiny_sam(str(tmp_path / "c"), seed=2), device="cpu").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_unknown_arch_is_a_value_error_naming_it(tmp_path):
    (tmp_path / "sam.json").write_text(json.dumps({"arch": "vit_zz", "checkpoint": "x.pth"}))
    with pytest.raises(ValueError, match="vit_zz"):
        load_sam(str(tmp_path), device="cpu")


def test_missing_sam_json_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="sam.json"):
        load_sam(str(tmp_path), device="cpu")


def test_box_prompt_gives_a_mask_inside_the_box(segmenter, scene):
    image, _ = scene
    box = (30, 20, 90, 70)
    mask = segmenter.segment(image, box=box)
    assert mask.shape == image.shape[:2] and mask.dtype == bool
    outside = np.ones(mask.shape, bool)
    outside[20:70, 30:90] = False
    assert not mask[outside].any()


def test_point_prompt_gives_an_image_sized_mask(segmenter, scene):
    image, _ = scene
    mask = segmenter.segment(image, points=[(60, 50), (64, 52)])
    assert mask.shape == image.shape[:2] and mask.dtype == bool


class FakePredictor:
    """Stands in for SamPredictor: records the call, returns fixed masks and scores."""

    def __init__(self, masks, scores):
        self.masks, self.scores, self.calls = masks, scores, []

    def set_image(self, image):
        self.image = image

    def predict(self, **kwargs):
        self.calls.append(kwargs)
        return self.masks, self.scores, None


def test_box_prompt_is_clipped_to_the_box(segmenter, scene, monkeypatch):
    image, _ = scene
    everything = np.ones((1, *image.shape[:2]), bool)
    fake = FakePredictor(everything, np.array([0.5]))
    monkeypatch.setattr(segmenter, "predictor", fake)
    mask = segmenter.segment(image, box=(10, 5, 40, 30))
    expected = np.zeros(image.shape[:2], bool)
    expected[5:30, 10:40] = True
    assert np.array_equal(mask, expected)
    assert fake.calls[0]["multimask_output"] is False
    assert list(fake.calls[0]["box"]) == [10, 5, 40, 30]


def test_point_prompt_takes_the_best_scoring_mask(segmenter, scene, monkeypatch):
    image, _ = scene
    masks = np.stack([rect(0, 10, 0, 10, image.shape[:2]), rect(20, 60, 30, 90, image.shape[:2]), rect(0, 5, 0, 5, image.shape[:2])])
    fake = FakePredictor(masks, np.array([0.2, 0.9, 0.4]))
    monkeypatch.setattr(segmenter, "predictor", fake)
    mask = segmenter.segment(image, points=[[40, 30], [50, 35]])
    assert np.array_equal(mask, masks[1])
    call = fake.calls[0]
    assert call["multimask_output"] is True and call["box"] is None
    assert np.array_equal(call["point_coords"], [[40, 30], [50, 35]])
    assert np.array_equal(call["point_labels"], [1, 1])  # all points are positive


def test_automatic_path_follows_the_rule(tiny_sam_dir, scene, monkeypatch):
    image, _ = scene
    seg = Segmenter(tiny_sam_dir, device="cpu", points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    seen = []
    generate = seg.automatic.generate

    def recording(img):  # the real generator, its records kept for the check
        seen.append(generate(img))
        return seen[-1]

    monkeypatch.setattr(seg.automatic, "generate", recording)
    try:
        mask = seg.segment(image)
    except SegmentationError:
        mask = None
    (records,) = seen
    assert records, "with zero thresholds SAM keeps its masks"
    expected = pick_automatic_mask([r["segmentation"] for r in records], [r["predicted_iou"] for r in records])
    if expected is None:
        assert mask is None
        return
    assert mask is not None
    assert mask.shape == image.shape[:2] and mask.dtype == bool
    assert np.array_equal(mask, expected)
    assert mask.sum() <= MAX_AUTOMATIC_FRACTION * mask.size
    assert any(np.array_equal(mask, r["segmentation"]) for r in records)


def test_automatic_path_with_default_thresholds(segmenter, scene):
    image, _ = scene
    try:
        mask = segmenter.segment(image)
    except SegmentationError as exc:
        message = str(exc)
        assert "box" in message and "points" in message and "mask" in message
    else:
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        assert 0 < mask.sum() <= MAX_AUTOMATIC_FRACTION * mask.size


def test_automatic_path_finding_nothing_raises(segmenter, scene, monkeypatch):
    image, _ = scene
    monkeypatch.setattr(segmenter.automatic, "generate", lambda img: [])
    with pytest.raises(SegmentationError, match="box, points or a mask"):
        segmenter.segment(image)
    whole = {"segmentation": np.ones(image.shape[:2], bool), "predicted_iou": 1.0}
    monkeypatch.setattr(segmenter.automatic, "generate", lambda img: [whole])
    with pytest.raises(SegmentationError):
        segmenter.segment(image)


# ---------------------------------------------------------------- LazySegmenter


def test_lazy_segmenter_loads_sam_on_first_call(tiny_sam_dir, scene):
    image, _ = scene
    lazy = LazySegmenter(sam_loader("tiny"))
    assert lazy.available is True
    assert lazy.sam_dir == tiny_sam_dir
    assert lazy._segmenter is None
    mask = lazy(image, box=(30, 20, 90, 70))
    assert mask.shape == image.shape[:2] and mask.dtype == bool
    first = lazy._segmenter
    assert isinstance(first, Segmenter)
    lazy(image, points=[(60, 50)])
    assert lazy._segmenter is first  # loaded once


def test_lazy_segmenter_with_an_explicit_sam(tmp_path):
    sam_dir = write_tiny_sam(str(tmp_path / "my-sam"), seed=3)
    lazy = LazySegmenter(sam_loader(str(no_sam_model(tmp_path / "model")), sam_dir))
    assert lazy.available and lazy.sam_dir == os.path.abspath(sam_dir)


def test_lazy_segmenter_calls_its_loader_once_and_only_when_asked():
    calls = []
    lazy = LazySegmenter(lambda: calls.append(1))
    assert calls == []
    assert lazy.available is False and lazy.sam_dir is None and calls == [1]
    with pytest.raises(TypeError, match="loader"):
        LazySegmenter("tiny")  # a model source is not a loader: `sam_loader("tiny")` is


def no_sam_model(path) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model_index.json"), "w") as handle:
        json.dump({"_class_name": "StableDiffusionPipeline"}, handle)
    return str(path)


def png_file(path, array) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def test_without_sam_the_box_is_the_mask_only_when_allowed(tmp_path):
    model = no_sam_model(tmp_path / "model")
    assert resolve_sam(model) is None
    lazy = LazySegmenter(sam_loader(model))
    assert lazy.available is False
    image, _ = make_scene("resting", 9)
    uri = png_file(tmp_path / "ref.png", image)
    item = {"ref_id": "ref-0000", "uri": uri, "label": None, "mask_uri": None, "box": [25, 15, 95, 75], "points": None}
    with pytest.raises(BadReference, match="allow_box_as_mask"):
        sanitize_reference(item, "L2", "L2", SanitizationSpec(), segment=lazy)
    rows = sanitize_reference(item, "L2", "L2", SanitizationSpec(allow_box_as_mask=True), segment=lazy)
    target, background = rows
    expected = np.zeros(image.shape[:2], bool)
    expected[15:75, 25:95] = True
    assert np.array_equal(decode_png(target["region"]) > 0, expected)
    assert np.array_equal(decode_png(background["region"]) > 0, ~expected)
    assert np.array_equal(decode_png(target["payload"]), np.where(expected[..., None], image, 0))
    assert lazy._segmenter is None  # never loaded


def test_without_sam_points_alone_are_refused(tmp_path):
    lazy = LazySegmenter(sam_loader(no_sam_model(tmp_path / "model")))
    image, _ = make_scene("resting", 9)
    uri = png_file(tmp_path / "ref.png", image)
    item = {"ref_id": "ref-0000", "uri": uri, "label": None, "mask_uri": None, "box": None, "points": [[50, 40]]}
    with pytest.raises(BadReference, match="needs a mask, a box or points"):
        sanitize_reference(item, "L1", "L0", SanitizationSpec(), segment=lazy)


class RecordingSegment:
    """A segment callable standing in for SAM."""

    available = True

    def __init__(self, result):
        self.result, self.calls = result, []

    def __call__(self, image, box=None, points=None):
        self.calls.append((image.shape, box, points))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def test_sanitize_reference_uses_sam_when_available(tmp_path):
    image, mask = make_scene("floating", 12)
    uri = png_file(tmp_path / "ref.png", image)
    segment = RecordingSegment(mask)
    item = {"ref_id": "ref-0000", "uri": uri, "label": None, "mask_uri": None, "box": [1, 2, 100, 90], "points": [[50, 40]]}
    rows = sanitize_reference(item, "L2", "L0", SanitizationSpec(), segment=segment)
    assert segment.calls == [(image.shape, (1, 2, 100, 90), [[50, 40]])]
    assert np.array_equal(decode_png(rows[0]["region"]) > 0, mask)  # SAM's mask, not the box


def test_a_mask_file_wins_over_sam(tmp_path):
    image, mask = make_scene("floating", 13)
    uri = png_file(tmp_path / "ref.png", image)
    muri = png_file(tmp_path / "mask.png", mask.astype(np.uint8) * 255)
    segment = RecordingSegment(np.ones(mask.shape, bool))
    item = {"ref_id": "ref-0000", "uri": uri, "label": None, "mask_uri": muri, "box": None, "points": None}
    rows = sanitize_reference(item, "L2", "L0", SanitizationSpec(), segment=segment)
    assert segment.calls == []
    assert np.array_equal(decode_png(rows[0]["region"]) > 0, mask)


def test_segmentation_failure_rejects_only_that_reference(tmp_path):
    image, mask = make_scene("floating", 14)
    uri = png_file(tmp_path / "ref.png", image)
    muri = png_file(tmp_path / "mask.png", mask.astype(np.uint8) * 255)
    segment = RecordingSegment(SegmentationError("SAM found no target mask"))
    items = [
        {"ref_id": "ref-0000", "uri": uri, "label": None, "mask_uri": None, "box": None, "points": None},
        {"ref_id": "ref-0001", "uri": uri, "label": None, "mask_uri": muri, "box": None, "points": None},
    ]
    rows, rejections = sanitize_all(items, "L1", "L0", SanitizationSpec(), segment=segment)
    assert [r["ref_id"] for r in rejections] == ["ref-0000"]
    assert "SAM found no target mask" in rejections[0]["reason"]
    assert {r["ref_id"] for r in rows} == {"ref-0001"}


def test_an_empty_sam_mask_is_rejected(tmp_path):
    image, _ = make_scene("floating", 15)
    uri = png_file(tmp_path / "ref.png", image)
    segment = RecordingSegment(np.zeros(image.shape[:2], bool))
    item = {"ref_id": "ref-0000", "uri": uri, "label": None, "mask_uri": None, "box": [0, 0, 10, 10], "points": None}
    rows, rejections = sanitize_all([item], "L2", "L0", SanitizationSpec(), segment=segment)
    assert rows == [] and "empty" in rejections[0]["reason"]
