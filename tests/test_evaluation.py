"""SIM, replication, cross-object MI and membership inference: pure functions, checked against
brute force and against cases whose answer is known."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from spinml_ray import evaluation
from spinml_ray.examples import make_scene
from spinml_ray.leakage import object_leakage


def _pairwise_cosine(a, b):
    return np.array([[float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for y in b] for x in a])


finite = st.floats(-10, 10, allow_nan=False, allow_infinity=False).filter(lambda v: abs(v) > 1e-3)


@settings(max_examples=50, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.just(4)), elements=finite),
       arrays(np.float64, st.tuples(st.integers(1, 5), st.just(4)), elements=finite))
def test_the_batched_cosine_matrix_equals_the_per_pair_formula(a, b):
    assert np.allclose(evaluation.cosine_matrix(a, b), _pairwise_cosine(a, b), atol=1e-9)
    assert evaluation.sim(a, b) == pytest.approx(_pairwise_cosine(a, b).mean(), abs=1e-9)


def test_sim_of_copies_is_one_and_of_orthogonal_images_zero():
    references = np.eye(4)[:2]
    assert evaluation.sim(references, references * 3) == pytest.approx(0.5)  # each matches one of two
    assert evaluation.sim(references[:1], references[:1] * 2) == pytest.approx(1.0)
    assert evaluation.sim(np.eye(4)[2:], references) == pytest.approx(0.0)
    assert evaluation.dsim(0.42, 0.30) == pytest.approx(0.12)


def test_bad_embeddings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="2-D"):
        evaluation.sim(np.ones(4), np.ones((2, 4)))
    with pytest.raises(ValueError, match="length zero"):
        evaluation.sim(np.zeros((1, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="differ in length"):
        evaluation.sim(np.ones((1, 3)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="finite"):
        evaluation.sim(np.full((1, 4), np.nan), np.ones((2, 4)))


def test_replication_finds_the_copies_and_their_sources():
    rng = np.random.default_rng(0)
    references = rng.normal(size=(8, 32))
    synthetic = rng.normal(size=(100, 32))
    synthetic[[7, 42]] = references[[3, 5]] * 2  # two exact copies (scaled: cosine 1)
    synthetic[13] = references[1] + 0.01 * rng.normal(size=32)  # a near copy
    result = evaluation.replication(synthetic, references, threshold=0.95, top=3)
    # the two exact copies come first; both are similar by 1 up to rounding, so their order is not promised
    assert {(i, j) for i, j, _ in result.closest[:2]} == {(7, 3), (42, 5)}
    assert [s for _, _, s in result.closest[:2]] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert result.closest[2][:2] == (13, 1) and result.closest[2][2] > 0.99
    assert result.above_threshold == pytest.approx(3 / 100)
    assert result.nearest.shape == (100,)
    assert np.allclose(result.nearest, _pairwise_cosine(synthetic, references).max(axis=1))
    assert result.p95 == pytest.approx(np.percentile(result.nearest, 95))


def _objects(seed: int):
    image, mask = make_scene("floating", seed)
    inside = (mask > 0)[..., None]
    return image * inside, image * ~inside, image


def test_cross_object_mi_is_small_from_edges_and_zero_at_l0():
    target, background, raw = _objects(1)
    l1 = evaluation.cross_object_leakage(target, background, raw, "L1")
    l2 = evaluation.cross_object_leakage(target, background, raw, "L2")
    own = object_leakage(target, raw, "L1")
    assert evaluation.cross_object_leakage(target, background, raw, "L0") == 0.0
    assert 0.0 <= l1 < own  # the target's edges say less about the background than about the target
    assert 0.0 <= l2 < object_leakage(target, raw, "L2")
    # A release that is the background itself tells all about it: the bound the ratio is measured against.
    assert evaluation.cross_object_leakage(background, background, raw, "L2") == pytest.approx(
        object_leakage(background, raw, "L2"))
    with pytest.raises(ValueError, match="unknown privacy level"):
        evaluation.cross_object_leakage(target, background, raw, "L3")


def _auc_by_counting(members, others):
    wins = sum((m > o) + 0.5 * (m == o) for m in members for o in others)
    return wins / (len(members) * len(others))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=12), st.lists(st.integers(-5, 5), min_size=1, max_size=12))
def test_membership_auc_is_the_probability_a_member_outscores_a_non_member(members, others):
    result = evaluation.membership_inference(np.array(members, float), np.array(others, float))
    assert result.auc == pytest.approx(_auc_by_counting(members, others), abs=1e-6)
    assert 0.0 <= result.tpr_at_1_fpr <= 1.0


def test_membership_inference_at_the_extremes_and_at_chance():
    separated = evaluation.loss_threshold_attack(member_losses=np.full(50, 0.1), non_member_losses=np.full(50, 2.0))
    assert separated.auc == 1.0 and separated.tpr_at_1_fpr == 1.0
    rng = np.random.default_rng(0)
    chance = evaluation.loss_threshold_attack(rng.normal(size=5000), rng.normal(size=5000))
    assert abs(chance.auc - 0.5) < 0.02 and chance.tpr_at_1_fpr < 0.03
    inverted = evaluation.membership_inference(np.zeros(10), np.ones(10))
    assert inverted.auc == 0.0 and inverted.tpr_at_1_fpr == 0.0
    with pytest.raises(ValueError, match="at least one member"):
        evaluation.membership_inference(np.array([]), np.ones(3))


def test_logit_confidence_matches_the_probability_and_survives_large_logits():
    from spinml_ray.evaluation import logit_confidence

    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1000.0, -1000.0, 0.0]])
    p = np.exp(logits[:2]) / np.exp(logits[:2]).sum(axis=1, keepdims=True)
    expected = np.log(p[[0, 1], [0, 2]] / (1 - p[[0, 1], [0, 2]]))
    found = logit_confidence(logits, np.array([0, 2, 0]))
    assert np.allclose(found[:2], expected) and np.isfinite(found[2]) and found[2] > 100


def test_lira_separates_members_whose_confidence_the_shadows_predict():
    """Shadows that trained on an example are more confident on it; the attacked model is confident on
    its members only: LiRA finds them, and finds nothing when the attacked model treats all alike."""
    from spinml_ray.evaluation import lira_scores, membership_inference

    rng = np.random.default_rng(0)
    k, n = 16, 200
    inside = rng.random((k, n)) < 0.5
    difficulty = rng.normal(0, 2, n)  # per-example offset: why calibration by shadows helps
    shadow = difficulty + 3.0 * inside + rng.normal(0, 0.5, (k, n))
    member = np.arange(n) < n // 2
    target = difficulty + 3.0 * member + rng.normal(0, 0.5, n)
    scores = lira_scores(target, shadow, inside)
    attack = membership_inference(scores[member], scores[~member])
    assert attack.auc > 0.95 and attack.tpr_at_1_fpr > 0.3
    blind = lira_scores(difficulty + 1.5 + rng.normal(0, 0.5, n), shadow, inside)
    assert abs(membership_inference(blind[member], blind[~member]).auc - 0.5) < 0.12
    with pytest.raises(ValueError, match="both with and without"):
        lira_scores(target, shadow, np.ones_like(inside))
