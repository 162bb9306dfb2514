"""Tests for synthesis planning (spinml_ray/synthesis/plan.py, prompts.py, workitems.py)."""

from __future__ import annotations

import base64
import itertools
import json

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spinml_ray.examples import LABELS, make_scene
from spinml_ray.images import box_of_mask, decode_png
from spinml_ray.sanitizer import sanitize_image
from spinml_ray.spec import Level, parse_request
from spinml_ray.synthesis.plan import (
    L0_L0,
    _place,
    choose_placement,
    geometry_box,
    image_seed,
    index_bundle,
    placed_box,
    plan_work_items,
)
from spinml_ray.synthesis.prompts import SETTINGS, VIEWS, build_prompt
from spinml_ray.synthesis.workitems import WorkItem

SUBJECT = "yellow rubber duck"
RESOLUTION = 64
LEVELS = ("L0", "L1", "L2")
EXPECTED_KIND = {
    "L0_L0": "txt2img",
    "L1_L0": "controlnet",
    "L0_L1": "controlnet",
    "L1_L1": "controlnet",
    "L2_L0": "inpaint",  # the default l2_target, kept: the released target stays, the rest is painted
    "L0_L2": "inpaint",
    "L2_L2": "inpaint",  # kept too: the target stays, the room is redrawn from its released pixels
    "L1_L2": "controlnet_inpaint",
    "L2_L1": "controlnet_inpaint",
}


def make_spec(target="L1", background="L0", alpha=0.0, n=4, seed=0, labels=(("floating", "floating"), ("resting", "resting")),
              **synthesis):
    references = [{"uri": f"{ref_id}.png", "label": label} for ref_id, label in labels]
    document = {
        "request_id": "req-plan",
        "tenant": "acme",
        "subject": SUBJECT,
        "labels": [{"name": name, "phrase": phrase} for name, phrase in LABELS.items()],
        "references": references,
        "privacy": {"target": target, "background": background, "alpha": alpha},
        "synthesis": {"images_per_label": n, "resolution": RESOLUTION, "steps": 4, "seed": seed, **synthesis},
    }
    return parse_request(document)


REFS = (("ref-0000", "floating"), ("ref-0001", "floating"), ("ref-0002", "resting"), ("ref-0003", "resting"))


@pytest.fixture(scope="module")
def scenes():
    return {ref_id: make_scene(label, 10 + i) for i, (ref_id, label) in enumerate(REFS)}


def sanitized_rows(scenes, target, background, refs=REFS, images=None):
    rows = []
    for ref_id, label in refs:
        image, mask = scenes[ref_id]
        if images is not None and ref_id in images:
            image = images[ref_id]
        rows.extend(sanitize_image(ref_id, image, mask, Level(target), Level(background), label=label))
    return rows


def plan(scenes, target="L1", background="L0", alpha=0.0, n=4, seed=0, refs=REFS, images=None, adapter=None, token=None,
         **synthesis):
    spec = make_spec(target, background, alpha, n, seed, labels=refs, **synthesis)
    return plan_work_items(spec, index_bundle(sanitized_rows(scenes, target, background, refs, images)), adapter, token)


def resized_mask(mask, size=RESOLUTION):
    return cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0


def eroded(mask, pixels=3):
    return cv2.erode(mask.astype(np.uint8), np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)) > 0


# ---------------------------------------------------------------- level -> pipeline mapping


@pytest.mark.parametrize("target, background", list(itertools.product(LEVELS, LEVELS)))
def test_kind_and_conditioning_follow_the_levels(scenes, target, background):
    config = f"{target}_{background}"
    items = plan(scenes, target, background, alpha=0.0, n=4)
    assert len(items) == 4 * len(LABELS)
    assert {item.kind for item in items} == {EXPECTED_KIND[config]}
    assert {item.pool for item in items} == {config}
    uses_l1 = "L1" in (target, background)
    uses_l2 = "L2" in (target, background)
    for item in items:
        assert (item.control_image is not None) == uses_l1
        assert (item.init_image is not None) == uses_l2
        assert (item.mask_image is not None) == ("L2" in (target, background))
        assert item.resolution == RESOLUTION
        assert (item.source_ref is None) == (config == L0_L0)
        for png in (item.control_image, item.init_image, item.mask_image):
            if png is not None:
                assert decode_png(png).shape[:2] == (RESOLUTION, RESOLUTION)
        if item.control_image is not None:
            control = decode_png(item.control_image)
            assert control.shape == (RESOLUTION, RESOLUTION, 3)
            assert set(np.unique(control).tolist()) <= {0, 255} and control.any()
        if item.source_ref is None:
            continue
        target_mask = resized_mask(scenes[item.source_ref][1])
        if item.init_image is not None:
            init = decode_png(item.init_image)
            if target == "L0" or target == "L1":
                # no target pixels in the image guidance: the target's area is black
                assert init[eroded(target_mask)].max() < 12
            if background != "L2":
                assert init[eroded(~target_mask)].max() < 12
            if target == "L2":
                assert init[eroded(target_mask)].mean() > 60  # the duck's own (bright) pixels
        if item.mask_image is not None:
            painted = decode_png(item.mask_image) > 0
            region = ~target_mask if target == "L2" else target_mask  # around a kept target, or the target's hole
            iou = (painted & region).sum() / (painted | region).sum()
            assert iou > 0.9


def test_l1_l1_control_is_the_union_of_both_edge_maps(scenes):
    def controls(target, background):
        return {(i.source_ref, i.image_id): decode_png(i.control_image) for i in plan(scenes, target, background)}

    both, target_only, background_only = controls("L1", "L1"), controls("L1", "L0"), controls("L0", "L1")
    assert both.keys() == target_only.keys() == background_only.keys()
    for key, control in both.items():
        assert np.array_equal(control, np.maximum(target_only[key], background_only[key]))
        assert np.count_nonzero(control) > np.count_nonzero(target_only[key])


def test_workitem_kind_with_mask_but_no_init_raises():
    item = WorkItem(
        image_id="x-00000", request_id="r", tenant="t", label="x", pool="L0_L2", prompt="p",
        seed=1, resolution=64, steps=1, guidance=1.0, mask_image=b"\x89PNG",
    )
    with pytest.raises(ValueError, match="mask_image given without init_image"):
        item.kind


# ---------------------------------------------------------------- alpha mixing


@pytest.mark.parametrize("config", ["L1_L0", "L2_L2", "L0_L2"])
def test_alpha_mixes_the_l0_l0_pool(scenes, config):
    target, background = config.split("_")
    items = plan(scenes, target, background, alpha=0.25, n=8)
    assert len(items) == 16
    for label in LABELS:
        own = [i for i in items if i.label == label]
        assert len(own) == 8
        l0 = [i for i in own if i.pool == L0_L0]
        rest = [i for i in own if i.pool != L0_L0]
        assert len(l0) == 2 and len(rest) == 6
        assert {i.pool for i in rest} == {config}
        for item in l0:
            assert item.kind == "txt2img" and item.source_ref is None
            assert (item.control_image, item.init_image, item.mask_image) == (None, None, None)
        assert {i.kind for i in rest} == {EXPECTED_KIND[config]}


def test_l0_l0_config_ignores_alpha(scenes):
    items = plan(scenes, "L0", "L0", alpha=0.5, n=8)
    assert len(items) == 16
    assert all(i.pool == L0_L0 and i.kind == "txt2img" for i in items)


def test_alpha_one_needs_no_references():
    spec = make_spec("L2", "L1", alpha=1.0, n=3)
    items = plan_work_items(spec, {})
    assert len(items) == 6 and all(i.pool == L0_L0 for i in items)


def test_references_required_when_a_pool_needs_them():
    spec = make_spec("L2", "L1", alpha=0.0, n=3)
    with pytest.raises(ValueError, match="L2_L1"):
        plan_work_items(spec, {})


# ---------------------------------------------------------------- seeds and ids


def test_seeds_are_deterministic_and_distinct(scenes):
    first = plan(scenes, "L1", "L0", n=8, seed=5)
    again = plan(scenes, "L1", "L0", n=8, seed=5)
    other = plan(scenes, "L1", "L0", n=8, seed=6)
    seeds = [i.seed for i in first]
    assert seeds == [i.seed for i in again]
    assert first == again  # the whole plan is reproducible
    assert len(set(seeds)) == len(seeds)
    assert len({i.image_id for i in first}) == len(first)
    other_seeds = [i.seed for i in other]
    assert sum(a != b for a, b in zip(seeds, other_seeds)) == len(seeds)
    assert all(0 <= s < 2**31 for s in seeds)


def test_image_seed_depends_on_every_input():
    base = image_seed(0, "a", 0)
    assert image_seed(0, "a", 0) == base
    assert len({base, image_seed(1, "a", 0), image_seed(0, "b", 0), image_seed(0, "a", 1)}) == 4


# ---------------------------------------------------------------- prompts


@pytest.mark.parametrize("target, background", list(itertools.product(LEVELS, LEVELS)))
def test_prompts_name_subject_and_label_and_hide_setting_when_background_released(scenes, target, background):
    items = plan(scenes, target, background, alpha=0.25, n=8)
    config = f"{target}_{background}"
    for item in items:
        assert SUBJECT in item.prompt
        assert LABELS[item.label] in item.prompt
        settings_named = [s for s in SETTINGS if s in item.prompt]
        if item.pool == config and background != "L0":
            assert settings_named == [], item.prompt
        else:
            assert len(settings_named) == 1, item.prompt


@pytest.mark.parametrize("target, background", [("L0", "L0"), ("L1", "L0"), ("L2", "L2")])
def test_without_decorations_every_prompt_has_the_papers_form(scenes, target, background):
    spec = make_spec(target, background, 0.25, 8, 0, labels=REFS)
    spec = spec.model_copy(update={"synthesis": spec.synthesis.model_copy(update={"prompt_decorations": False})})
    items = plan_work_items(spec, index_bundle(sanitized_rows(scenes, target, background, REFS)))
    assert {i.pool for i in items} == ({"L0_L0"} if target == "L0" else {"L0_L0", f"{target}_{background}"})
    for item in items:
        assert item.prompt == f"A photo of a {SUBJECT} {LABELS[item.label]}."
    decorated = plan(scenes, target, background, alpha=0.25, n=8)
    assert all(any(v in i.prompt for v in VIEWS) for i in decorated)  # the default adds a view to each


def test_build_prompt_is_seeded():
    assert build_prompt("husky dog", "sleeping", 3) == build_prompt("husky dog", "sleeping", 3)
    prompts = {build_prompt("husky dog", "sleeping", s) for s in range(40)}
    assert len(prompts) > 5
    assert all(p.startswith("A photo of a husky dog sleeping") for p in prompts)
    assert build_prompt("owl", "flying", 1).startswith("A photo of an owl flying")
    assert "sks husky dog" in build_prompt("husky dog", "sleeping", 1, token="sks")
    assert not any(s in build_prompt("dog", "x", s_, describe_setting=False) for s_ in range(20) for s in SETTINGS)


# ---------------------------------------------------------------- references per label


def test_labelled_references_are_used_only_for_their_label(scenes):
    items = plan(scenes, "L2", "L0", n=6)
    label_of = dict(REFS)
    used = {label: set() for label in LABELS}
    for item in items:
        assert label_of[item.source_ref] == item.label
        used[item.label].add(item.source_ref)
    assert used == {label: {r for r, l in REFS if l == label} for label in LABELS}


def test_unlabelled_references_serve_every_label(scenes):
    refs = (("ref-0000", "floating"), ("ref-0002", None))
    items = plan(scenes, "L1", "L0", n=4, refs=refs)
    assert {i.source_ref for i in items if i.label == "resting"} == {"ref-0002"}
    assert {i.source_ref for i in items if i.label == "floating"} == {"ref-0000", "ref-0002"}


# ---------------------------------------------------------------- privacy of L0 objects


@pytest.mark.parametrize(
    "target, background, changed",
    [("L0", "L1", "target"), ("L0", "L2", "target"), ("L1", "L0", "background"), ("L2", "L0", "background")],
)
def test_l0_object_pixels_never_reach_work_items(scenes, target, background, changed):
    rng = np.random.default_rng(1)
    images = {}
    for ref_id, _ in REFS:
        image, mask = scenes[ref_id]
        where = mask if changed == "target" else ~mask
        other = image.copy()
        other[where] = rng.integers(0, 256, (int(where.sum()), 3), dtype=np.uint8)
        images[ref_id] = other
    original = plan(scenes, target, background, n=4)
    altered = plan(scenes, target, background, n=4, images=images)
    assert any(i.control_image or i.init_image for i in original)  # something is released
    assert [i.model_dump() for i in original] == [i.model_dump() for i in altered]
    # and the released object itself does reach them (the comparison above is not vacuous)
    noisy = {}
    for ref_id, _ in REFS:
        image, mask = scenes[ref_id]
        released_region = ~mask if changed == "target" else mask
        noisy[ref_id] = image.copy()
        noisy[ref_id][released_region] = rng.integers(0, 256, (int(released_region.sum()), 3), dtype=np.uint8)
    released_changed = plan(scenes, target, background, n=4, images=noisy)
    assert [i.model_dump() for i in original] != [i.model_dump() for i in released_changed]


# ---------------------------------------------------------------- serialization


def test_workitem_json_round_trip_preserves_bytes():
    payloads = {"control_image": bytes(range(256)), "init_image": b"\x00\xff" * 500, "mask_image": b"\x89PNG\r\n\x1a\n"}
    item = WorkItem(
        image_id="floating-00001", request_id="r", tenant="t", label="floating", pool="L1_L2",
        prompt="A photo.", seed=2**32 - 1, resolution=512, steps=50, guidance=7.5, source_ref="ref-0000", **payloads,
    )
    text = item.model_dump_json()
    document = json.loads(text)
    for name, data in payloads.items():
        assert base64.urlsafe_b64decode(document[name]) == data  # pydantic writes URL-safe base64
    back = WorkItem.model_validate_json(text)
    assert back == item
    for name, data in payloads.items():
        assert getattr(back, name) == data
    assert back.kind == "controlnet_inpaint"


def test_planned_items_survive_json(scenes):
    for item in plan(scenes, "L1", "L2", n=2):
        back = WorkItem.model_validate_json(item.model_dump_json())
        assert back == item and back.kind == item.kind == "controlnet_inpaint"


# ---------------------------------------------------------------- boxes from the conditioning's geometry


@pytest.mark.parametrize("target, background", list(itertools.product(LEVELS, LEVELS)))
def test_geometry_box_is_the_target_box_where_the_conditioning_places_it(scenes, target, background):
    by_ref = index_bundle(sanitized_rows(scenes, target, background))
    size = 80  # not the scenes' size: the box is scaled to the generated frame
    for ref_id, rows in by_ref.items():
        box = geometry_box(rows["target"], rows["background"], size)
        if target == "L0" and background != "L2":
            assert box is None  # nothing released fixes where the target is
            continue
        mask = scenes[ref_id][1]
        ys, xs = np.nonzero(mask)
        h, w = mask.shape
        truth = np.array([xs.min() * size / w, ys.min() * size / h, (xs.max() + 1) * size / w, (ys.max() + 1) * size / h])
        tolerance = 2.5 if target == "L1" else 1e-6  # edges sit on, or a pixel inside, the silhouette
        assert np.abs(np.array(box) - truth).max() <= tolerance, (target, background, box, truth)


# ---------------------------------------------------------------- an L2 target drawn from text


@pytest.mark.parametrize("background, kind", [("L0", "txt2img"), ("L1", "controlnet"), ("L2", "inpaint")])
def test_a_personalized_text_l2_target_reaches_synthesis_only_through_the_adapter(scenes, background, kind):
    options = dict(adapter="s3://b/acme/req-plan/adapters", token="sks", l2_target="personalized_text")
    items = plan(scenes, "L2", background, **options)
    assert {item.kind for item in items} == {kind}
    assert all(item.adapter == options["adapter"] and " sks " in item.prompt for item in items)
    for item in items:
        if item.init_image is not None:  # the released room, with the target's place left to inpaint
            target_mask = resized_mask(scenes[item.source_ref][1])
            assert decode_png(item.init_image)[eroded(target_mask)].max() < 12
    # the target's pixels change nothing the service is sent; under image_guided they change the items
    rng = np.random.default_rng(2)
    images = {}
    for ref_id, _ in REFS:
        image, mask = scenes[ref_id]
        images[ref_id] = image.copy()
        images[ref_id][mask] = rng.integers(0, 256, (int(mask.sum()), 3), dtype=np.uint8)
    assert [i.model_dump() for i in plan(scenes, "L2", background, images=images, **options)] == [i.model_dump() for i in items]
    guided = dict(options, l2_target="image_guided")
    assert ([i.model_dump() for i in plan(scenes, "L2", background, images=images, **guided)]
            != [i.model_dump() for i in plan(scenes, "L2", background, **guided)])


@pytest.mark.parametrize("background", LEVELS)
def test_a_personalized_text_l2_target_has_no_geometry_of_its_own(scenes, background):
    for rows in index_bundle(sanitized_rows(scenes, "L2", background)).values():
        box = geometry_box(rows["target"], rows["background"], RESOLUTION, target_pixels=False)
        if background == "L2":  # the hole in the released room still places it, where the target's mask did
            assert box is not None and box == geometry_box(rows["target"], rows["background"], RESOLUTION)
        else:
            assert box is None


# ---------------------------------------------------------------- an L2 target kept as released


@pytest.mark.parametrize("background, kind", [("L0", "inpaint"), ("L1", "controlnet_inpaint"), ("L2", "inpaint")])
def test_a_kept_l2_target_stays_as_released_and_the_rest_is_inpainted(scenes, background, kind):
    kept = plan(scenes, "L2", background, l2_target="kept", strength=0.6)
    guided = plan(scenes, "L2", background, l2_target="image_guided", strength=0.6)
    assert {item.kind for item in kept} == {kind}
    assert {item.kind for item in guided} == {kind.replace("inpaint", "img2img")}
    for item, same in zip(kept, guided):
        # the same released pixels start the image, and the same edges (L1 background) steer it
        assert (item.init_image, item.control_image, item.prompt, item.seed) == (
            same.init_image, same.control_image, same.prompt, same.seed)
        target_mask = resized_mask(scenes[item.source_ref][1])
        painted = decode_png(item.mask_image) > 0
        assert not painted[eroded(target_mask, 1)].any()  # the target's pixels are kept ...
        assert painted[~cv2.dilate(target_mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)].all()
        # ... and the rest painted: from noise, or redrawn from the released room at the request's strength
        assert item.strength == (0.6 if background == "L2" else 1.0) and same.strength == 0.6
    for rows in index_bundle(sanitized_rows(scenes, "L2", background)).values():  # its region places it
        assert geometry_box(rows["target"], rows["background"], RESOLUTION,
                            make_spec("L2", background, l2_target="kept").synthesis.target_pixels) is not None


# ---------------------------------------------------------------- placement: varied


# an L1 target's edges move whatever l2_target says; an L2 target's pixels only where they guide
MOVABLE = {("L1", "L0", "kept"), ("L1", "L0", "image_guided"), ("L1", "L0", "personalized_text"),
           ("L2", "L0", "kept"), ("L2", "L0", "image_guided")}


@pytest.mark.parametrize("target, background, l2_target",
                         [(t, b, how) for t, b in itertools.product(LEVELS, LEVELS)
                          for how in ("kept", "image_guided", "personalized_text")])
def test_varied_placement_moves_the_target_and_its_box_together_where_the_background_is_painted(
        scenes, target, background, l2_target):
    fixed = plan(scenes, target, background, n=12, l2_target=l2_target)
    varied = plan(scenes, target, background, n=12, l2_target=l2_target, placement="varied")
    if (target, background, l2_target) not in MOVABLE:  # the background's release fixes the frame: nothing moves
        assert [i.model_dump() for i in varied] == [i.model_dump() for i in fixed]
        return
    placements = []
    for item, same in zip(varied, fixed):
        assert item.kind == same.kind and (item.prompt, item.seed, item.strength) == (same.prompt, same.seed, same.strength)
        placement = choose_placement(item.seed, same.box, RESOLUTION)
        placements.append(placement)
        assert item.box == placed_box(same.box, placement, RESOLUTION)
        x0, y0, x1, y1 = item.box
        assert 0 <= x0 and x1 <= RESOLUTION and (y0, y1) == (same.box[1], same.box[3])  # along the floor line
        # the same released edges or pixels, moved with the box (and nothing else changed)
        for moved, still in ((item.control_image, same.control_image), (item.init_image, same.init_image)):
            assert (moved is None) == (still is None)
            if still is not None:
                assert np.array_equal(decode_png(moved), _place(decode_png(still), placement))
                shown = box_of_mask(decode_png(moved).max(axis=-1) > 12)  # past the resampling's ringing
                assert x0 - 1 <= shown[0] and shown[2] <= x1 + 1
        if item.mask_image is not None:  # kept: everything but the moved target is painted
            assert np.array_equal(decode_png(item.mask_image) > 0, _place(decode_png(same.mask_image) > 0, placement))
    assert {mirror for _, mirror in placements} == {False, True}
    assert len({tuple(item.box) for item in varied}) > len(REFS)  # more places than references


@given(x0=st.integers(0, 63), width=st.integers(1, 64), y0=st.integers(0, 60), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=200, deadline=None)
def test_a_placement_keeps_the_whole_box_inside_the_frame_and_moves_the_pixels_with_it(x0, width, y0, seed):
    size = 64
    x1 = min(size, x0 + width)
    mask = np.zeros((size, size), bool)
    mask[y0:y0 + 4, x0:x1] = True
    box = box_of_mask(mask)
    placement = choose_placement(seed, box, size)
    moved = placed_box(box, placement, size)
    assert 0 <= moved[0] and moved[2] <= size and moved[2] - moved[0] == box[2] - box[0] and moved[1::2] == box[1::2]
    assert box_of_mask(_place(mask, placement)) == moved  # nothing of the box wrapped round the frame
    assert choose_placement(seed, box, size) == placement
