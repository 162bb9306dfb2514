"""The platform's metrics: a fixed vocabulary of labels, never request content, and never a failure."""

from hypothesis import given
from hypothesis import strategies as st

from spinml_ray.ray_layer import metrics


def test_rejection_reasons_fall_into_their_categories():
    cases = {
        "references/a.png: not a readable image (UnidentifiedImageError: cannot identify image file)": "unreadable",
        "references/a.png: empty file": "unreadable",
        "references/big.png: 9000x9000 exceeds the 64000000-pixel cap": "too_large",
        "references/bomb.png: refused as a decompression bomb (...)": "too_large",
        "references/a.png: image file not found": "not_found",
        "masks/a.png: mask file not found": "not_found",
        "masks/a.png: size 32x32 does not match the image's 64x64": "mask",
        "masks/a.png: not a binary mask (values [0, 3, 255])": "mask",
        "ref-0001: target covers 3 pixels, fewer than the minimum 16": "target",
        "box [0, 0, 900, 900] lies outside the 64x64 image": "target",
        "references/mask-target-not-found.png: something new": "other",  # the file's name does not decide
    }
    for reason, category in cases.items():
        assert metrics.rejection_category(reason) == category, reason


@given(st.text(max_size=300))
def test_any_reason_gets_a_label_from_the_fixed_vocabulary(reason):
    assert metrics.rejection_category(reason) in {name for name, _ in metrics.REJECTION_CATEGORIES} | {"other"}


def test_every_metric_is_declared_with_fixed_label_keys_and_its_kind():
    for name, (kind, description, keys) in metrics.NAMES.items():
        assert name.startswith("spinml_") and not name.endswith("_total")  # Prometheus adds _total to counters
        assert kind in ("counter", "gauge", "histogram") and description
        assert (kind == "histogram") == (name in metrics.BOUNDARIES)
        assert set(keys) <= {"stage", "state", "kind", "status", "event", "state", "reason", "level", "object"}


def test_recording_outside_ray_or_with_bad_values_never_raises():
    metrics.record("spinml_requests", stage="train", state="done")  # no Ray here: nothing happens
    metrics.record("spinml_released_mi", None, level="L1", object="target")
    metrics.record("no_such_metric")
