"""The `spinbench` source's image encoder: built from the public corpus, loaded like any encoder."""

import numpy as np

from spinbench.encoder import build
from spinbench.world import public_corpus
from spinml_ray.encoders import Encoder


def test_a_short_build_is_reproducible_and_embeds_through_the_common_loader(tmp_path):
    first = build(str(tmp_path / "a"), seed=3, images=64, epochs=1, quiet=True)
    again = build(str(tmp_path / "b"), seed=3, images=64, epochs=1, quiet=True)
    build(str(tmp_path / "c"), seed=4, images=64, epochs=1, quiet=True)
    assert first["held_out_accuracy"] == again["held_out_accuracy"]
    images = [s.image for s in public_corpus(6, seed=1)]
    a, b, c = (Encoder(str(tmp_path / name)).embed(images) for name in "abc")
    assert a.shape == (6, 256) and np.allclose(a, b) and not np.allclose(a, c)
    assert Encoder(str(tmp_path / "a")).model.dtype.is_floating_point


def test_the_shipped_encoder_places_images_of_a_state_together():
    """Embeddings by the committed encoder: a public image's nearest state centroid (centroids from
    other public images) is its own state far more often than chance (0.25)."""
    from spinbench.world import STATES
    from spinml_ray.encoders import load_encoder

    encoder = load_encoder("spinbench")
    fit, test = public_corpus(200, seed=70_001), public_corpus(100, seed=70_002)
    embedded = encoder.embed([s.image for s in fit])
    embedded /= np.linalg.norm(embedded, axis=1, keepdims=True)
    centroids = np.stack([embedded[[s.state == state for s in fit]].mean(axis=0) for state in STATES])
    queries = encoder.embed([s.image for s in test])
    predicted = (queries / np.linalg.norm(queries, axis=1, keepdims=True) @ centroids.T).argmax(axis=1)
    assert np.mean([STATES[p] == s.state for p, s in zip(predicted, test)]) > 0.7
