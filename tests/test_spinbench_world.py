"""SpinBench's world: deterministic by seed, exact masks, the state in the pose only, users outside
the public range, and request folders that the system accepts as they are."""

from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
from PIL import Image

from spinbench.world import (
    MIN_CONTRAST,
    PUBLIC_WALLS,
    SIZE,
    STATE_PHRASES,
    STATES,
    USER_DOG_WORDS,
    USER_WALL_WORDS,
    User,
    contrast,
    hsv,
    hue_distance_from_public,
    is_public_appearance,
    is_public_colour,
    make_user,
    prompt_for,
    public_appearance,
    public_corpus,
    public_room,
    render,
    render_room,
    user_samples,
    write_user_request,
)
from spinml_ray.images import decode_png
from spinml_ray.sanitizer import release, sanitize_image
from spinml_ray.spec import Level, SpecError, load_request


@pytest.fixture(scope="module")
def corpus():
    return public_corpus(48, seed=3)


@pytest.fixture(scope="module")
def user() -> User:
    return make_user(11)


def _same(a, b) -> bool:
    def key(sample):
        return sample.image.tobytes(), sample.mask.tobytes(), sample.state, sample.caption

    return key(a) == key(b)


# ---------------------------------------------------------------- determinism and balance


def test_public_corpus_is_deterministic_by_seed_and_a_prefix_of_a_longer_one(corpus):
    again = public_corpus(48, seed=3)
    assert all(_same(a, b) for a, b in zip(corpus, again))
    assert all(_same(a, b) for a, b in zip(public_corpus(10, seed=3), corpus))
    other = public_corpus(48, seed=4)
    assert sum(a.image.tobytes() == b.image.tobytes() for a, b in zip(corpus, other)) == 0
    assert len({s.image.tobytes() for s in corpus}) == len(corpus)  # no two images alike within a corpus


def test_public_corpus_balances_the_states_round_robin():
    samples = public_corpus(40, seed=0)
    assert [s.state for s in samples] == [STATES[i % 4] for i in range(40)]
    assert {s: sum(x.state == s for x in samples) for s in STATES} == {s: 10 for s in STATES}


def test_images_masks_and_captions_have_the_documented_form(corpus, user):
    for sample in corpus[:8] + user_samples(user, 1, "references"):
        assert sample.image.shape == (SIZE, SIZE, 3) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (SIZE, SIZE) and sample.mask.dtype == bool
        assert sample.caption.startswith("a photo of a ") and sample.caption.endswith(" room")
        assert f" dog {STATE_PHRASES[sample.state]} in a {sample.room.words} room" in sample.caption
        assert sample.appearance.body_word in sample.caption
    assert prompt_for("sleeping") == "a photo of a dog sleeping"
    assert [prompt_for(s) for s in STATES] == [f"a photo of a dog {STATE_PHRASES[s]}" for s in STATES]
    with pytest.raises(ValueError, match="state"):
        render(corpus[0].appearance, corpus[0].room, "running", np.random.default_rng(0))


# ---------------------------------------------------------------- exact masks, state-free rooms


def test_the_mask_is_exactly_the_pixels_the_dog_changed(corpus, user):
    for sample in corpus + user_samples(user, 3, "test"):
        changed = np.any(sample.image != render_room(sample.room), axis=-1)
        np.testing.assert_array_equal(sample.mask, changed, err_msg=sample.caption)
        assert 60 <= sample.mask.sum() <= 0.4 * SIZE * SIZE, sample.caption
        assert contrast(sample.appearance, sample.room) >= MIN_CONTRAST, sample.caption  # no camouflage
        edge = np.concatenate([sample.mask[0], sample.mask[-1], sample.mask[:, 0], sample.mask[:, -1]])
        assert not edge.any(), f"the dog leaves the frame: {sample.caption}"


def test_other_sizes_scale_the_world_and_keep_masks_exact():
    rng = np.random.default_rng(5)
    appearance, room = public_appearance(rng), public_room(rng)
    for size in (48, 128):
        sample = render(appearance, room, "standing", np.random.default_rng(1), size=size)
        assert sample.image.shape == (size, size, 3)
        np.testing.assert_array_equal(sample.mask, np.any(sample.image != render_room(room, size), axis=-1))
        assert sample.mask.sum() > 0.02 * size * size


def test_no_background_cue_the_room_is_the_same_in_every_state():
    """Outside the dog, every state's image is the room's own picture, pixel for pixel."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        appearance, room = public_appearance(rng), public_room(rng)
        empty = render_room(room)
        for state in STATES:
            sample = render(appearance, room, state, np.random.default_rng(100 + seed))
            np.testing.assert_array_equal(sample.image[~sample.mask], empty[~sample.mask])
    rooms = {}
    for sample in public_corpus(16, seed=9):  # the corpus draws rooms apart from the pose
        assert sample.room not in rooms
        rooms[sample.room] = sample.state


def test_poses_alone_tell_the_states_apart():
    """A nearest-centroid classifier on bare silhouettes (cropped, mirrored, 12x12) learns the state:
    the pose carries it, for public dogs and for a user's dog it never saw."""
    def features(mask):
        ys, xs = np.nonzero(mask)
        crop = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
        small = cv2.resize(crop, (12, 12), interpolation=cv2.INTER_AREA)
        return np.concatenate([((small + small[:, ::-1]) / 2).ravel(), [2 * np.log(crop.shape[0] / crop.shape[1])]])

    def data(samples):
        return np.stack([features(s.mask) for s in samples]), np.array([STATES.index(s.state) for s in samples])

    x, y = data(public_corpus(200, seed=20))
    centroids = np.stack([x[y == k].mean(axis=0) for k in range(len(STATES))])
    for held_out in (public_corpus(120, seed=21), user_samples(make_user(2), 15, "test")):
        xt, yt = data(held_out)
        predicted = np.argmin(((xt[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
        assert (predicted == yt).mean() >= 0.9


# ---------------------------------------------------------------- public versus user


def test_public_dogs_are_inside_the_public_colour_range_and_users_clearly_outside():
    rng = np.random.default_rng(0)
    for _ in range(300):
        appearance = public_appearance(rng)
        assert is_public_colour(appearance.body) and is_public_colour(appearance.secondary), appearance
        assert is_public_appearance(appearance)
        assert appearance.body_word not in USER_DOG_WORDS
    for seed in range(50):
        body = make_user(seed).appearance.body
        assert not is_public_appearance(make_user(seed).appearance)
        assert not is_public_colour(body), (seed, body)
        assert hsv(body)[1] >= 0.5 and hue_distance_from_public(body) >= 30, (seed, body, hsv(body))
    assert not is_public_colour((40, 90, 220)) and is_public_colour((120, 75, 40)) and is_public_colour((128, 128, 128))


def test_user_rooms_and_words_are_unknown_to_the_public_corpus():
    public_words = {w for s in public_corpus(200, seed=1) for w in s.caption.split()}
    public_walls = [public_room(np.random.default_rng(i)).wall for i in range(200)]
    max_public_saturation = max(hsv(w)[1] for w in public_walls)
    assert max_public_saturation <= max(r[1][1] for r in PUBLIC_WALLS.values()) + 0.02
    for seed in range(50):
        user = make_user(seed)
        assert user.appearance.body_word in USER_DOG_WORDS and user.room.wall_word in USER_WALL_WORDS
        assert user.appearance.body_word not in public_words and user.room.wall_word not in public_words
        assert hsv(user.room.wall)[1] > max_public_saturation + 0.1


def test_users_are_deterministic_distinct_and_their_splits_disjoint(user):
    assert make_user(11) == user
    users = [make_user(seed) for seed in range(30)]
    assert len({(u.appearance, u.room) for u in users}) == 30
    assert len({u.appearance.body for u in users}) == 30 and len({u.room.wall for u in users}) == 30
    references, test = user_samples(user, 3, "references"), user_samples(user, 3, "test")
    assert all(_same(a, b) for a, b in zip(references, user_samples(user, 3, "references")))
    assert [s.state for s in references] == [s.state for s in test] == list(STATES) * 3
    assert not {s.image.tobytes() for s in references} & {s.image.tobytes() for s in test}
    assert all(s.appearance == user.appearance and s.room == user.room for s in references + test)
    with pytest.raises(ValueError, match="split"):
        user_samples(user, 1, "train")


# ---------------------------------------------------------------- the L1 release


def test_edges_are_what_the_system_releases_at_l1(corpus, user):
    for sample in corpus[:8] + user_samples(user, 1, "references"):
        np.testing.assert_array_equal(sample.target_edges, release(sample.image, sample.mask, Level.L1)[0])
        np.testing.assert_array_equal(sample.background_edges, release(sample.image, ~sample.mask, Level.L1)[0])
        assert set(np.unique(sample.target_edges)) <= {0, 255}
        assert not sample.target_edges[~sample.mask].any() and not sample.background_edges[sample.mask].any()
    sample = user_samples(user, 1, "references")[2]
    assert (sample.target_edges > 0).sum() >= 20  # a user's dog shows its outline at L1
    rows = sanitize_image("r", sample.image, sample.mask, Level.L1, Level.L1)  # the whole sanitizer agrees
    np.testing.assert_array_equal(decode_png(rows[0]["payload"]), sample.target_edges)
    np.testing.assert_array_equal(decode_png(rows[1]["payload"]), sample.background_edges)


# ---------------------------------------------------------------- request folders


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_write_user_request_makes_a_request_the_system_loads(tmp_path, user):
    path = write_user_request(11, str(tmp_path / "u"), references_per_state=2, test_per_state=3)
    spec = load_request(path)
    assert (spec.request_id, spec.tenant, spec.subject) == ("spinbench-user-11", "spinbench", "dog")
    assert [(label.name, label.phrase) for label in spec.labels] == [(s, STATE_PHRASES[s]) for s in STATES]
    assert (spec.privacy.target, spec.privacy.background) == (Level.L1, Level.L0)
    assert (spec.synthesis.resolution, spec.synthesis.scheduler, spec.synthesis.images_per_label) == (64, "dpmsolver++", 16)
    assert (spec.training.architecture, spec.training.image_size, spec.training.batch_size) == ("resnet18", 64, 32)
    assert len(spec.references) == 8
    assert {s: sum(r.label == s for r in spec.references) for s in STATES} == dict.fromkeys(STATES, 2)
    expected = user_samples(user, 2, "references")
    for ref, sample in zip(spec.references, expected):
        assert ref.label == sample.state
        np.testing.assert_array_equal(_png(ref.uri), sample.image)
        mask = _png(ref.mask_uri)
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, sample.mask)
    test = user_samples(user, 3, "test")
    for state in STATES:
        files = sorted(os.listdir(os.path.join(spec.test_set, state)))
        assert files == ["0.png", "1.png", "2.png"]
        first = next(s for s in test if s.state == state)
        np.testing.assert_array_equal(_png(os.path.join(spec.test_set, state, "0.png")), first.image)


def test_write_user_request_applies_overrides_and_refuses_bad_ones(tmp_path):
    path = write_user_request(4, str(tmp_path / "ok"), references_per_state=1, test_per_state=0,
                              privacy={"target": "L2"}, synthesis={"steps": 10}, training={"epochs": 2})
    spec = load_request(path)
    assert (spec.privacy.target, spec.privacy.background) == (Level.L2, Level.L0)
    assert (spec.synthesis.steps, spec.synthesis.resolution, spec.training.epochs) == (10, 64, 2)
    bad = tmp_path / "bad"
    with pytest.raises(SpecError, match="resolution"):
        write_user_request(4, str(bad), references_per_state=1, test_per_state=0, synthesis={"resolution": 60})
    assert not (bad / "request.yaml").exists()


def test_the_cli_writes_a_user_folder(tmp_path, capsys):
    from spinml_ray.cli import main

    out = tmp_path / "u3"
    assert main(["spinbench", "world", "--user-seed", "3", "--out", str(out), "--references-per-state", "1",
                 "--test-per-state", "1"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(out / "request.yaml")
    spec = load_request(printed)
    assert len(spec.references) == 4 and (spec.privacy.target, spec.privacy.background) == (Level.L1, Level.L0)
    assert sorted(os.listdir(out / "test_set")) == sorted(STATES)
    assert main(["spinbench", "world", "--user-seed", "3", "--out", str(tmp_path / "l2"), "--references-per-state",
                 "1", "--test-per-state", "0", "--privacy", "L2_L1", "--images-per-label", "5",
                 "--l2-target", "kept", "--placement", "varied"]) == 0
    spec = load_request(capsys.readouterr().out.strip())
    assert (spec.privacy.target, spec.privacy.background, spec.synthesis.images_per_label) == (Level.L2, Level.L1, 5)
    assert (spec.synthesis.l2_target, spec.synthesis.placement) == ("kept", "varied")
    for bad in (["--privacy", "L2"], ["--privacy", "L0_L0,L1_L0"], ["--images-per-label", "0"], ["--l2-target", "x"],
                ["--placement", "x"]):
        with pytest.raises(SystemExit):
            main(["spinbench", "world", "--user-seed", "3", "--out", str(tmp_path / "bad"), *bad])
    with pytest.raises(SystemExit) as exit_info:
        main(["spinbench", "-h"])
    assert exit_info.value.code == 0 and "world" in capsys.readouterr().out

