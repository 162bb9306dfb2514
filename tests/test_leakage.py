"""Tests for the SpinML MI leakage meter (spinml_ray/leakage.py). Offline, no Ray."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from spinml_ray.leakage import (
    letterbox,
    mutual_information,
    object_leakage,
    reference_mutual_information,
)

TOL = 1e-9


def _scene(h: int = 240, w: int = 320, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A procedural raw image (textured background + ellipse) and its object image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    bg = np.stack(
        [
            96 + 60 * np.sin(xx / 9.0) * np.cos(yy / 13.0),
            128 + 50 * np.sin((xx + yy) / 17.0),
            80 + 40 * np.cos(xx / 5.0),
        ],
        axis=-1,
    )
    bg += rng.normal(0.0, 12.0, size=bg.shape)
    cy, cx, ry, rx = h * 0.55, w * 0.45, h * 0.3, w * 0.22
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    obj_color = np.stack(
        [200 + 40 * np.sin(yy / 7.0), 60 + 30 * np.cos(xx / 11.0), 40 + 20 * np.sin(xx / 3.0)],
        axis=-1,
    )
    obj_color += rng.normal(0.0, 8.0, size=obj_color.shape)
    raw = np.where(mask[..., None], obj_color, bg)
    raw = np.clip(raw, 0, 255).astype(np.uint8)
    obj = np.where(mask[..., None], raw, 0).astype(np.uint8)
    return obj, raw


def _reference_leakage(obj: np.ndarray, raw: np.ndarray, level: str) -> float:
    """Artifact procedure written out independently, with the slow reference MI."""

    def lb(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        scale = min(512 / w, 512 / h)
        nw, nh = int(w * scale), int(h * scale)
        small = Image.fromarray(img).resize((nw, nh), Image.LANCZOS)
        canvas = Image.new("RGB", (512, 512), (0, 0, 0))
        canvas.paste(small, ((512 - nw) // 2, (512 - nh) // 2))
        return np.array(canvas)

    o, r = lb(obj), lb(raw)
    if level == "L1":
        edges = cv2.Canny(cv2.cvtColor(o, cv2.COLOR_RGB2GRAY), 100, 200)
        shared = np.stack([edges] * 3, axis=-1)
    else:
        shared = o
    mi_shared = reference_mutual_information(shared.flatten(), o.flatten())
    return mi_shared / reference_mutual_information(r.flatten(), r.flatten())


def _assert_parity(x: np.ndarray, y: np.ndarray, bins: int = 256) -> None:
    ref = reference_mutual_information(x, y, bins=bins)
    fast = mutual_information(x, y, bins=bins)
    assert abs(fast - ref) <= TOL, (fast, ref)


# --- mutual_information parity ------------------------------------------------------


def test_parity_random_uint8() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    y = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    _assert_parity(x, y)
    _assert_parity(x, x)
    _assert_parity(x, (x // 16) * 3)  # dependent, narrower range


def test_parity_procedural_image() -> None:
    obj, raw = _scene(96, 128)
    _assert_parity(raw, raw)
    _assert_parity(obj, obj)
    _assert_parity(raw, obj)
    edges = cv2.Canny(cv2.cvtColor(obj, cv2.COLOR_RGB2GRAY), 100, 200)
    _assert_parity(np.stack([edges] * 3, axis=-1), obj)


def test_parity_constant_inputs() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 256, size=500, dtype=np.uint8)
    for value in (0, 7, 255):
        c = np.full(500, value, dtype=np.uint8)
        _assert_parity(c, y)
        _assert_parity(y, c)
        _assert_parity(c, c)
        assert mutual_information(c, y) == pytest.approx(0.0, abs=TOL)


@pytest.mark.parametrize(
    "values",
    [(0, 255), (3, 4, 5, 6, 7), (0, 1), (254, 255), (10, 200), tuple(range(0, 256, 3))],
)
def test_parity_small_value_ranges(values: tuple[int, ...]) -> None:
    rng = np.random.default_rng(2)
    vals = np.array(values, dtype=np.uint8)
    x = rng.choice(vals, size=2000)
    y = rng.choice(vals, size=2000)
    _assert_parity(x, y)
    _assert_parity(x, x)
    _assert_parity(x, rng.integers(0, 256, size=2000, dtype=np.uint8))


@pytest.mark.parametrize("bins", [1, 7, 100, 255, 300])
def test_parity_other_bin_counts(bins: int) -> None:
    # Non-power-of-two bin counts are where a naive integer floor() would disagree
    # with numpy's float linspace edges (e.g. values 0..14 with 100 bins).
    rng = np.random.default_rng(3)
    x = rng.integers(0, 15, size=3000, dtype=np.uint8)
    y = rng.integers(0, 34, size=3000, dtype=np.uint8)
    _assert_parity(x, y, bins=bins)
    z = rng.integers(0, 256, size=3000, dtype=np.uint8)
    _assert_parity(z, x, bins=bins)


@pytest.mark.parametrize("bins", [256, 100])
def test_value_to_bin_matches_histogramdd(bins: int) -> None:
    # The value -> bin table must equal numpy's own assignment for every value range.
    from spinml_ray.leakage import _value_to_bin

    pairs = [(lo, hi) for lo in range(0, 256, 5) for hi in range(lo, 256, 7)]
    pairs += [(0, 255), (0, 0), (255, 255), (0, 14), (0, 33)]
    for lo, hi in pairs:
        vals = np.arange(lo, hi + 1, dtype=np.uint8)
        hist, _ = np.histogramdd(vals[:, None], bins=bins)
        expected = np.repeat(np.arange(bins), hist.astype(np.int64))  # bins of sorted values
        assert np.array_equal(_value_to_bin(lo, hi, bins), expected), (lo, hi)


def test_non_uint8_inputs() -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, size=1000)  # int64 in 0..255: fast path after cast
    y = rng.integers(-50, 1000, size=1000)  # out of 0..255: histogram2d fallback
    f = rng.normal(size=1000)  # float: fallback
    _assert_parity(x, y)
    _assert_parity(f, x)
    _assert_parity(x.astype(bool), y)


def test_parity_bincount_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inputs above 2**24 values are counted with np.bincount instead of cv2.calcHist;
    # force that path on a small input.
    import spinml_ray.leakage as leakage

    monkeypatch.setattr(leakage, "_CALCHIST_MAX_VALUES", 0)
    obj, raw = _scene(64, 80)
    _assert_parity(raw, obj)
    _assert_parity(raw, raw)
    _assert_parity(obj[..., 0] // 50, obj[..., 1], bins=97)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError):
        mutual_information(np.zeros(3, np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(ValueError):
        mutual_information(np.zeros(0, np.uint8), np.zeros(0, np.uint8))
    with pytest.raises(ValueError):
        mutual_information(np.zeros(3, np.uint8), np.zeros(3, np.uint8), bins=0)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    n=st.integers(min_value=1, max_value=60),
    bins=st.sampled_from([256, 256, 256, 10, 64, 97]),
)
def test_parity_property(data: st.DataObject, n: int, bins: int) -> None:
    lo_x = data.draw(st.integers(0, 255))
    hi_x = data.draw(st.integers(lo_x, 255))
    lo_y = data.draw(st.integers(0, 255))
    hi_y = data.draw(st.integers(lo_y, 255))
    x = np.array(data.draw(st.lists(st.integers(lo_x, hi_x), min_size=n, max_size=n)), np.uint8)
    y = np.array(data.draw(st.lists(st.integers(lo_y, hi_y), min_size=n, max_size=n)), np.uint8)
    _assert_parity(x, y, bins=bins)


# --- object_leakage ------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray]:
    return _scene()


@pytest.mark.parametrize("level", ["L1", "L2"])
def test_object_leakage_matches_reference_path(
    scene: tuple[np.ndarray, np.ndarray], level: str
) -> None:
    obj, raw = scene
    assert abs(object_leakage(obj, raw, level) - _reference_leakage(obj, raw, level)) <= TOL


def test_levels_order_and_l0(scene: tuple[np.ndarray, np.ndarray]) -> None:
    obj, raw = scene
    l0 = object_leakage(obj, raw, "L0")
    l1 = object_leakage(obj, raw, "L1")
    l2 = object_leakage(obj, raw, "L2")
    assert l0 == 0.0
    assert 0.0 < l1 < l2


@pytest.mark.parametrize("bad", ["L3", "l1", "", "L 1"])
def test_invalid_level_raises(scene: tuple[np.ndarray, np.ndarray], bad: str) -> None:
    obj, raw = scene
    with pytest.raises(ValueError) as info:
        object_leakage(obj, raw, bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("shape,value", [((64, 64, 3), 90), ((40, 60, 3), 0)])
def test_constant_raw_gives_zero(shape: tuple[int, int, int], value: int) -> None:
    # Constant after letterboxing (square, or black so the bars match): MI(raw, raw) == 0.
    raw = np.full(shape, value, dtype=np.uint8)
    obj = np.zeros_like(raw)
    obj[:20, :20] = 255
    assert object_leakage(obj, raw, "L1") == 0.0
    assert object_leakage(obj, raw, "L2") == 0.0


# --- letterbox -----------------------------------------------------------------------


def test_letterbox_wide_image() -> None:
    img = np.full((100, 400, 3), 255, dtype=np.uint8)  # scale 1.28 -> 512x128
    out = letterbox(img)
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    rows = np.flatnonzero(out.any(axis=(1, 2)))
    cols = np.flatnonzero(out.any(axis=(0, 2)))
    assert (rows[0], rows[-1]) == (192, 319)  # 128 rows at offset (512 - 128) // 2
    assert (cols[0], cols[-1]) == (0, 511)


def test_letterbox_tall_image() -> None:
    img = np.full((300, 70, 3), 200, dtype=np.uint8)  # scale 512/300 -> nw = int(119.46) = 119
    out = letterbox(img)
    assert out.shape == (512, 512, 3)
    rows = np.flatnonzero(out.any(axis=(1, 2)))
    cols = np.flatnonzero(out.any(axis=(0, 2)))
    assert (rows[0], rows[-1]) == (0, 511)
    assert (cols[0], cols[-1]) == ((512 - 119) // 2, (512 - 119) // 2 + 118)
    assert np.all(out[:, : (512 - 119) // 2] == 0)


def test_letterbox_rejects_non_rgb() -> None:
    with pytest.raises(ValueError):
        letterbox(np.zeros((10, 10), np.uint8))
