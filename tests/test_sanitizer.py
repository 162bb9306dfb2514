"""Tests for object-level sanitization (spinml_ray/sanitizer.py): what each level releases."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spinml_ray.examples import make_scene
from spinml_ray.images import ImageError, decode_png
from spinml_ray.sanitizer import (
    MIN_REGION_FRACTION,
    MIN_REGION_PIXELS,
    CannyThresholds,
    box_mask,
    release,
    sanitize_image,
    validate_target_mask,
)
from spinml_ray.spec import Level

ROW_KEYS = {"ref_id", "label", "object", "level", "width", "height", "payload", "region", "payload_sha256", "faces_blurred", "mi"}
PROPS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def scene():
    return make_scene("floating", 3)


def minimum_region(shape) -> int:
    return max(MIN_REGION_PIXELS, int(MIN_REGION_FRACTION * shape[0] * shape[1]))


# ---------------------------------------------------------------- release


def test_release_l0_is_nothing(scene):
    image, mask = scene
    assert release(image, mask, Level.L0) == (None, None, 0)
    assert release(image, ~mask, "L0") == (None, None, 0)


def test_release_l1_is_a_binary_edge_map_inside_the_region(scene):
    image, mask = scene
    edges, region, _ = release(image, mask, Level.L1)
    assert region is None
    assert edges.shape == mask.shape and edges.dtype == np.uint8
    assert set(np.unique(edges).tolist()) <= {0, 255}
    assert not edges[~mask].any()
    assert edges[mask].any()  # the duck has a beak and shading: some edges inside


def test_release_l1_of_background_has_edges_from_its_texture(scene):
    image, mask = scene
    edges, _, _ = release(image, ~mask, Level.L1, CannyThresholds(20, 40))
    assert not edges[mask].any()
    assert edges[~mask].any()


def test_release_l2_keeps_only_the_region(scene):
    image, mask = scene
    pixels, region, _ = release(image, mask, Level.L2)
    assert pixels.shape == image.shape and pixels.dtype == np.uint8
    assert (pixels[~mask] == 0).all()
    assert np.array_equal(pixels[mask], image[mask])
    assert np.array_equal(region, mask)
    assert region is not mask  # a copy, not the caller's array


def test_custom_canny_thresholds_change_l1(scene):
    image, mask = scene
    default, _, _ = release(image, ~mask, Level.L1)
    sensitive, _, _ = release(image, ~mask, Level.L1, CannyThresholds(low=5, high=15))
    strict, _, _ = release(image, ~mask, Level.L1, CannyThresholds(low=400, high=800))
    assert not np.array_equal(default, sensitive)
    assert np.count_nonzero(sensitive) > np.count_nonzero(default) >= np.count_nonzero(strict)
    rows_default = sanitize_image("r", image, mask, Level.L0, Level.L1)
    rows_custom = sanitize_image("r", image, mask, Level.L0, Level.L1, canny=CannyThresholds(low=5, high=15))
    assert rows_default[1]["payload"] != rows_custom[1]["payload"]
    assert np.array_equal(decode_png(rows_custom[1]["payload"]), sensitive)


# ---------------------------------------------------------------- sanitize_image rows


def test_l0_rows_release_nothing(scene):
    image, mask = scene
    rows = sanitize_image("ref-0001", image, mask, Level.L0, Level.L0, label="floating")
    assert [r["object"] for r in rows] == ["target", "background"]
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["payload"] is None and row["region"] is None and row["payload_sha256"] is None
        assert row["mi"] == 0.0 and row["level"] == "L0"
        assert (row["ref_id"], row["label"]) == ("ref-0001", "floating")
        assert row["height"] is None and row["width"] is None  # not even the size leaves


@pytest.mark.parametrize("target, background", [("L1", "L2"), ("L2", "L1"), ("L2", "L2"), ("L1", "L1")])
def test_released_rows_are_pngs_of_the_image_size(scene, target, background):
    image, mask = scene
    rows = sanitize_image("r", image, mask, Level(target), Level(background), label="x")
    by_object = {r["object"]: r for r in rows}
    assert set(by_object) == {"target", "background"}
    for name, level, region in (("target", target, mask), ("background", background, ~mask)):
        row = by_object[name]
        assert set(row) == ROW_KEYS and row["level"] == level
        assert row["payload"][:8] == b"\x89PNG\r\n\x1a\n"
        assert row["payload_sha256"] == hashlib.sha256(row["payload"]).hexdigest()
        payload = decode_png(row["payload"])
        assert payload.shape[:2] == image.shape[:2]
        assert row["mi"] > 0
        if level == "L1":
            assert payload.ndim == 2 and row["region"] is None
            assert not payload[~region].any()
        else:
            assert payload.shape == image.shape
            assert np.array_equal(payload[region], image[region]) and not payload[~region].any()
            assert np.array_equal(decode_png(row["region"]) > 0, region)


def test_mi_grows_with_the_level(scene):
    image, mask = scene
    l1 = sanitize_image("r", image, mask, Level.L1, Level.L0)[0]["mi"]
    l2 = sanitize_image("r", image, mask, Level.L2, Level.L0)[0]["mi"]
    assert l2 > l1 > 0
    assert l2 <= 1.0 + 1e-9


def test_string_levels_are_accepted(scene):
    image, mask = scene
    assert sanitize_image("r", image, mask, "L2", "L1") == sanitize_image("r", image, mask, Level.L2, Level.L1)


# ---------------------------------------------------------------- properties


@st.composite
def image_and_mask(draw):
    """A random RGB image and a valid target mask (a rectangle plus random speckle)."""
    height = draw(st.integers(16, 40))
    width = draw(st.integers(16, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    smooth = draw(st.booleans())
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    if smooth:  # blocky structure gives Canny real edges, not just noise
        image = np.kron(rng.integers(0, 256, (height // 4 + 1, width // 4 + 1, 3)), np.ones((4, 4, 1)))
        image = image[:height, :width].astype(np.uint8)
    y0 = draw(st.integers(0, height - 5))
    x0 = draw(st.integers(0, width - 5))
    y1 = draw(st.integers(y0 + 4, height))
    x1 = draw(st.integers(x0 + 4, width))
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    mask |= rng.random((height, width)) < draw(st.floats(0.0, 0.3))
    mask[0, 0] = False  # keep some background...
    mask[:4, :4] = False
    smallest = minimum_region(mask.shape)
    if mask.sum() < smallest or (~mask).sum() < smallest:
        mask = np.zeros((height, width), dtype=bool)
        mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = True
    validate_target_mask(mask)
    return image, mask


def _randomize(image, where, seed):
    rng = np.random.default_rng(seed)
    changed = image.copy()
    changed[where] = rng.integers(0, 256, (int(where.sum()), 3), dtype=np.uint8)
    if np.array_equal(changed, image):
        changed[where] = 255 - image[where]
    return changed


def _released(rows):
    return [{k: v for k, v in row.items() if k != "mi"} for row in rows]


@PROPS
@given(image_and_mask(), st.sampled_from(["L1", "L2"]), st.integers(0, 1000))
def test_l0_target_pixels_never_reach_the_released_data(data, background, seed):
    image, mask = data
    changed = _randomize(image, mask, seed)
    before = sanitize_image("r", image, mask, Level.L0, Level(background), label="a")
    after = sanitize_image("r", changed, mask, Level.L0, Level(background), label="a")
    assert _released(before) == _released(after)
    assert before[1]["payload"] is not None


@PROPS
@given(image_and_mask(), st.sampled_from(["L1", "L2"]), st.integers(0, 1000))
def test_l0_background_pixels_never_reach_the_released_data(data, target, seed):
    image, mask = data
    changed = _randomize(image, ~mask, seed)
    before = sanitize_image("r", image, mask, Level(target), Level.L0)
    after = sanitize_image("r", changed, mask, Level(target), Level.L0)
    assert _released(before) == _released(after)
    assert before[0]["payload"] is not None


@PROPS
@given(image_and_mask(), image_and_mask(), st.sampled_from([None, "a", "b"]))
def test_l0_l0_releases_nothing_of_the_image_not_even_its_size(first, second, label):
    """At L0_L0 two different photos (content, mask and size) give the server the very same rows."""
    rows = [sanitize_image("r", image, mask, Level.L0, Level.L0, label=label) for image, mask in (first, second)]
    assert rows[0] == rows[1]
    assert all(row[key] is None for row in rows[0] for key in ("width", "height", "payload", "region"))


@pytest.mark.parametrize("other", ["target", "background"])
def test_mi_is_the_only_value_an_l0_object_moves(scene, other):
    """`mi` follows the artifact: normalised by the whole raw image's binned entropy (documented in
    docs/DESIGN.md). Payloads, regions and digests must not move; the scalar `mi` may."""
    image, mask = scene
    levels = (Level.L0, Level.L2) if other == "target" else (Level.L2, Level.L0)
    changed = _randomize(image, mask if other == "target" else ~mask, 0)
    before = sanitize_image("r", image, mask, *levels)
    after = sanitize_image("r", changed, mask, *levels)
    assert _released(before) == _released(after)
    released = 1 if other == "target" else 0
    assert before[released]["mi"] != after[released]["mi"]  # the normaliser sees the raw image
    assert 0 < before[released]["mi"] <= 1.0


@PROPS
@given(image_and_mask(), st.sampled_from(["target", "background"]), st.integers(0, 200), st.integers(1, 300))
def test_l1_payload_is_binary_and_zero_outside_region(data, obj, low, span):
    image, mask = data
    region = mask if obj == "target" else ~mask
    levels = (Level.L1, Level.L0) if obj == "target" else (Level.L0, Level.L1)
    rows = sanitize_image("r", image, mask, *levels, canny=CannyThresholds(low, low + span))
    payload = decode_png(rows[0 if obj == "target" else 1]["payload"])
    assert payload.shape == mask.shape
    assert set(np.unique(payload).tolist()) <= {0, 255}
    assert not payload[~region].any()


@PROPS
@given(image_and_mask(), st.sampled_from(["target", "background"]))
def test_l2_payload_is_zero_outside_region_and_exact_inside(data, obj):
    image, mask = data
    region = mask if obj == "target" else ~mask
    levels = (Level.L2, Level.L0) if obj == "target" else (Level.L0, Level.L2)
    row = sanitize_image("r", image, mask, *levels)[0 if obj == "target" else 1]
    payload = decode_png(row["payload"])
    assert not payload[~region].any()
    assert np.array_equal(payload[region], image[region])
    assert np.array_equal(decode_png(row["region"]) > 0, region)


# ---------------------------------------------------------------- masks and boxes


def test_empty_mask_is_refused(scene):
    image, _ = scene
    with pytest.raises(ImageError, match="empty"):
        sanitize_image("ref-9", image, np.zeros(image.shape[:2], bool), Level.L1, Level.L0)


def test_tiny_mask_is_refused(scene):
    image, _ = scene
    mask = np.zeros(image.shape[:2], bool)
    mask[10, 10:15] = True
    with pytest.raises(ImageError) as info:
        sanitize_image("ref-9", image, mask, Level.L1, Level.L0)
    message = str(info.value)
    assert "ref-9" in message and "5 pixels" in message and "minimum" in message


def test_whole_image_mask_is_refused(scene):
    image, _ = scene
    with pytest.raises(ImageError, match="whole image"):
        sanitize_image("ref-9", image, np.ones(image.shape[:2], bool), Level.L2, Level.L0)


def test_mask_leaving_too_little_background_is_refused(scene):
    image, _ = scene
    mask = np.ones(image.shape[:2], bool)
    mask[0, :3] = False
    with pytest.raises(ImageError, match="whole image"):
        sanitize_image("ref-9", image, mask, Level.L2, Level.L0)


@pytest.mark.parametrize("shape", [(20, 30), (200, 300)])
def test_minimum_region_boundary(shape):
    smallest = minimum_region(shape)
    assert smallest == max(16, int(0.001 * shape[0] * shape[1]))
    mask = np.zeros(shape, bool)
    mask.flat[:smallest] = True
    validate_target_mask(mask)  # exactly the minimum is enough
    mask.flat[smallest - 1] = False
    with pytest.raises(ImageError, match=f"minimum {smallest}"):
        validate_target_mask(mask)
    background = np.ones(shape, bool)
    background.flat[: smallest - 1] = False
    with pytest.raises(ImageError, match="whole image"):
        validate_target_mask(background)


def test_box_mask_is_clipped_to_the_image():
    mask = box_mask((100, 80, 500, 500), (96, 128))
    expected = np.zeros((96, 128), bool)
    expected[80:96, 100:128] = True
    assert np.array_equal(mask, expected)
    inner = box_mask((2, 3, 10, 7), (96, 128))
    assert inner.sum() == 8 * 4 and inner[3, 2] and inner[6, 9] and not inner[7, 9] and not inner[6, 10]


@pytest.mark.parametrize("box", [(128, 0, 200, 10), (0, 96, 10, 200), (500, 500, 600, 600)])
def test_box_outside_the_image_is_refused(box):
    with pytest.raises(ImageError) as info:
        box_mask(box, (96, 128))
    assert "outside" in str(info.value) and "128x96" in str(info.value)


def test_both_l0_without_mask_is_accepted(scene):
    image, _ = scene
    rows = sanitize_image("r", image, None, Level.L0, Level.L0)
    assert all(r["payload"] is None and r["mi"] == 0.0 for r in rows)


@pytest.mark.parametrize("levels", [(Level.L1, Level.L0), (Level.L0, Level.L2), (Level.L2, Level.L2)])
def test_non_l0_without_mask_is_refused(scene, levels):
    image, _ = scene
    with pytest.raises(ImageError, match="needs a mask"):
        sanitize_image("ref-3", image, None, *levels)


def test_non_l0_without_mask_is_refused_for_string_levels(scene):
    image, _ = scene
    with pytest.raises(ImageError, match="needs a mask"):
        sanitize_image("ref-3", image, None, "L1", "L0")
