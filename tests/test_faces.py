"""Tests for blurring bystanders' faces (spinml_ray/faces.py) and its use in released L2 pixels
(spinml_ray/sanitizer.py): faces in released pixels are blurred, nothing else changes, and the MI
leakage is measured on what is actually released."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from spinml_ray.examples import make_scene
from spinml_ray.faces import blur_faces, detect_faces
from spinml_ray.images import decode_png
from spinml_ray.sanitizer import box_mask, release, sanitize_image
from spinml_ray.spec import Level

# Where OpenCV's frontal-face cascade finds the astronaut's face (x, y, w, h), approximately.
KNOWN_FACE = (177, 67, 93, 93)


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter)


def grow(face, margin, shape):
    """The face box grown by `margin` pixels on each side, as slices, clipped to the image."""
    x, y, w, h = face
    return slice(max(0, y - margin), min(shape[0], y + h + margin)), slice(max(0, x - margin), min(shape[1], x + w + margin))


@pytest.fixture(scope="module")
def astronaut():
    image = data.astronaut()
    assert image.dtype == np.uint8 and image.shape == (512, 512, 3)
    return image


@pytest.fixture(scope="module")
def face(astronaut):
    faces = detect_faces(astronaut)
    assert len(faces) == 1, faces
    return faces[0]


# ---------------------------------------------------------------- detect / blur


def test_one_face_is_found_where_it_is(face):
    assert all(isinstance(v, int) for v in face)
    assert iou(face, KNOWN_FACE) > 0.6, face


def test_blur_changes_the_face_and_nothing_far_from_it(astronaut, face):
    before = astronaut.copy()
    out, count = blur_faces(astronaut)
    assert count == 1
    assert np.array_equal(astronaut, before), "the input must not be modified"
    assert out.shape == astronaut.shape and out.dtype == np.uint8
    x, y, w, h = face
    inside = np.abs(out[y : y + h, x : x + w].astype(int) - astronaut[y : y + h, x : x + w].astype(int))
    assert inside.mean() > 15, inside.mean()
    # every pixel outside the face box grown by a third of its size is untouched
    keep = np.ones(astronaut.shape[:2], bool)
    keep[grow(face, max(w, h) // 3, astronaut.shape)] = False
    assert np.array_equal(out[keep], astronaut[keep])
    # and the change is not confined to a few pixels: most of the face box moved
    changed = np.any(out != astronaut, axis=-1)
    assert changed[y : y + h, x : x + w].mean() > 0.8


def test_no_face_is_found_after_blurring(astronaut):
    out, count = blur_faces(astronaut)
    assert count == 1
    assert detect_faces(out) == []


def test_region_excluding_the_face_changes_nothing(astronaut, face):
    x, y, w, h = face
    region = np.ones(astronaut.shape[:2], bool)
    region[grow(face, max(w, h), astronaut.shape)] = False
    out, count = blur_faces(astronaut, region)
    assert count == 0  # detected on the whole image, but it does not reach the released region
    assert np.array_equal(out, astronaut)


def test_only_pixels_inside_the_region_change(astronaut, face):
    x, y, w, h = face
    region = np.zeros(astronaut.shape[:2], bool)
    region[:, : x + w // 2] = True  # cuts the face in half
    out, count = blur_faces(astronaut, region)
    assert count == 1
    assert np.array_equal(out[~region], astronaut[~region])
    left = np.abs(out[y : y + h, x : x + w // 2].astype(int) - astronaut[y : y + h, x : x + w // 2].astype(int))
    assert left.mean() > 15


@pytest.mark.parametrize("name", ["scene", "coffee"])
def test_images_without_faces_are_returned_unchanged(name):
    image = make_scene("floating", 2)[0] if name == "scene" else data.coffee()
    assert detect_faces(image) == []
    out, count = blur_faces(image)
    assert count == 0
    assert np.array_equal(out, image)


# ---------------------------------------------------------------- through the sanitizer


@pytest.fixture(scope="module")
def face_box(astronaut, face):
    """A target box that holds the whole (padded) face with room to spare, as x0, y0, x1, y1."""
    x, y, w, h = face
    m = max(w, h) // 2
    return (x - m, y - m, x + w + m, y + h + m)


def test_release_l2_blurs_faces_inside_the_region(astronaut, face, face_box):
    region = box_mask(face_box, astronaut.shape[:2])
    plain, plain_region, zero = release(astronaut, region, Level.L2, blur_faces=False)
    blurred, blurred_region, count = release(astronaut, region, Level.L2, blur_faces=True)
    assert zero == 0 and count == 1
    assert np.array_equal(plain_region, blurred_region)
    assert not blurred[~region].any()
    x, y, w, h = face
    assert np.abs(blurred[y : y + h, x : x + w].astype(int) - plain[y : y + h, x : x + w].astype(int)).mean() > 15


def test_release_l1_ignores_blur_faces(astronaut, face_box):
    region = box_mask(face_box, astronaut.shape[:2])
    a = release(astronaut, region, Level.L1, blur_faces=False)
    b = release(astronaut, region, Level.L1, blur_faces=True)
    assert np.array_equal(a[0], b[0]) and a[1] is None and b[1] is None and a[2] == b[2] == 0


def rows_of(astronaut, face_box, target, background, blur):
    mask = box_mask(face_box, astronaut.shape[:2])
    rows = sanitize_image("ref-0000", astronaut, mask, target, background, blur_faces=blur)
    return {r["object"]: r for r in rows}, mask


def test_sanitize_image_blurs_the_released_face(astronaut, face, face_box):
    blurred, mask = rows_of(astronaut, face_box, "L2", "L0", True)
    plain, _ = rows_of(astronaut, face_box, "L2", "L0", False)
    x, y, w, h = face
    sl = (slice(y, y + h), slice(x, x + w))

    assert blurred["target"]["faces_blurred"] >= 1
    shown = decode_png(blurred["target"]["payload"])
    assert np.abs(shown[sl].astype(int) - astronaut[sl].astype(int)).mean() > 15
    assert detect_faces(shown) == []
    assert not shown[~mask].any()

    assert plain["target"]["faces_blurred"] == 0
    raw = decode_png(plain["target"]["payload"])
    assert np.array_equal(raw[sl], astronaut[sl])
    assert np.array_equal(raw, np.where(mask[..., None], astronaut, 0))

    # the leakage meter measures what leaves: blurred pixels leak less
    assert 0 < blurred["target"]["mi"] < plain["target"]["mi"]
    # the report is honest about its payload
    for rows in (blurred, plain):
        assert rows["background"]["payload"] is None and rows["background"]["faces_blurred"] == 0


def test_l1_rows_are_unaffected_by_blur_faces(astronaut, face_box):
    blurred, _ = rows_of(astronaut, face_box, "L1", "L1", True)
    plain, _ = rows_of(astronaut, face_box, "L1", "L1", False)
    for obj in ("target", "background"):
        assert blurred[obj]["payload"] == plain[obj]["payload"]
        assert blurred[obj]["payload_sha256"] == plain[obj]["payload_sha256"]
        assert blurred[obj]["mi"] == plain[obj]["mi"]
        assert blurred[obj]["faces_blurred"] == plain[obj]["faces_blurred"] == 0


def test_face_outside_the_background_region_leaves_the_background_as_is(astronaut, face_box):
    blurred, mask = rows_of(astronaut, face_box, "L2", "L2", True)
    plain, _ = rows_of(astronaut, face_box, "L2", "L2", False)
    # the face lies wholly in the target's region: the background's pixels and MI are the raw ones
    assert blurred["background"]["payload"] == plain["background"]["payload"]
    assert blurred["background"]["mi"] == pytest.approx(plain["background"]["mi"])
    assert blurred["target"]["payload"] != plain["target"]["payload"]


def test_background_reports_no_blurred_face_when_none_is_in_it(astronaut, face_box):
    blurred, _ = rows_of(astronaut, face_box, "L2", "L2", True)
    assert blurred["target"]["faces_blurred"] == 1
    assert blurred["background"]["faces_blurred"] == 0


def test_no_face_means_blur_changes_nothing():
    image, mask = make_scene("resting", 8)
    a = sanitize_image("ref-0000", image, mask, "L2", "L2", blur_faces=True)
    b = sanitize_image("ref-0000", image, mask, "L2", "L2", blur_faces=False)
    assert a == b
    assert all(r["faces_blurred"] == 0 for r in a)
