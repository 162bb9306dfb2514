"""SpinBench's benchmark plumbing without a cluster: the requests it writes, the baselines' data, the
aggregation, the report and the plot."""

from __future__ import annotations

import numpy as np
import pytest

from spinbench import bench
from spinbench.baselines import Training, copy_paste, fit_and_test, training_set
from spinbench.world import STATES, make_user, render_room, user_samples
from spinml_ray.ray_layer.batch import list_requests
from spinml_ray.sanitizer import release
from spinml_ray.spec import Level, load_request


def test_plan_sweeps_every_configuration_and_the_alphas_at_one():
    runs = bench.plan(alphas=(0.0, 0.25, 0.5), seeds=3)
    assert len(runs) == (len(bench.CONFIGS) + 2) * 3
    assert {(r.config, r.alpha) for r in runs if r.alpha} == {("L2_L0", 0.25), ("L2_L0", 0.5)}
    assert len({r.request_id(bench.user_base(7)) for r in runs}) == len(runs)


def test_write_requests_gives_valid_requests_in_one_folder(tmp_path):
    runs = bench.plan(configs=("L0_L1", "L2_L0"), alphas=(0.5,), seeds=2)
    manifest = bench.write_requests(3, str(tmp_path), runs, {"images_per_label": 4, "steps": 3}, Training(epochs=2),
                                    {"steps": 5}, references_per_state=1, test_per_state=2)
    uris = list_requests(manifest)
    assert len(uris) == len(runs)
    for run, uri in zip(runs, uris):
        spec = load_request(uri)
        assert spec.request_id == run.request_id(bench.user_base(3))
        assert spec.privacy.config == run.config and spec.privacy.alpha == run.alpha
        assert spec.synthesis.seed == run.seed and spec.synthesis.images_per_label == 4
        assert spec.training.epochs == 2 and spec.personalization.steps == 5
        assert len(spec.references) == len(STATES) and all(r.uri.startswith(str(tmp_path)) for r in spec.references)
        assert spec.test_set == str(tmp_path / "test_set")


def test_copy_paste_pastes_exactly_the_l2_release_onto_public_rooms():
    user = make_user(2)
    images, labels = copy_paste(user, 1, 8, seed=0)
    references = user_samples(user, 1, "references")
    assert labels == [STATES.index(r.state) for r in references] * 2
    own_room = render_room(user.room, 64)
    for image, ref in zip(images, references * 2):
        pixels, region, _ = release(ref.image, ref.mask, Level.L2)
        placed = [(np.roll(p, shift, axis=1), np.roll(r, shift, axis=1))
                  for p, r in ((pixels, region), (pixels[:, ::-1], region[:, ::-1])) for shift in range(-16, 17)]
        assert any(np.array_equal(image[r], p[r]) for p, r in placed)  # the release itself, moved or mirrored
        assert (image != own_room).any(axis=-1).mean() > 0.5  # on a public room, never the user's


def test_baseline_training_sets_have_the_promised_sources():
    user = make_user(1)
    public, labels, augment = training_set("public", user, 2, 16, seed=0)
    assert len(public) == 16 and sorted(set(labels)) == [0, 1, 2, 3] and not augment
    few, _, augment = training_set("few-shot", user, 2, 16, seed=0)
    assert len(few) == 8 and augment
    oracle, _, _ = training_set("oracle", user, 2, 16, seed=0)
    assert [np.array_equal(a, b) for a, b in zip(oracle, few)] == [True] * 8  # the references lead the oracle's set
    with pytest.raises(ValueError, match="baseline"):
        training_set("nope", user, 2, 16, 0)


def test_fit_and_test_trains_the_systems_classifier_and_scores_the_test_set():
    user = make_user(0)
    train = user_samples(user, 4, "references")
    test = user_samples(user, 2, "test")
    result = fit_and_test([s.image for s in train], [STATES.index(s.state) for s in train], [s.image for s in test],
                          [STATES.index(s.state) for s in test], seed=0, training=Training(epochs=1, batch_size=8),
                          augment=True, repeats=2)
    assert 0.0 <= result["accuracy"] <= 1.0 and len(result["per_class_accuracy"]) == len(STATES)


def _row(name, config, alpha, seed, accuracy):
    return {"name": name, "config": config, "alpha": alpha, "seed": seed, "request_id": f"r-{name}-{seed}",
            "accuracy": accuracy, "per_class": [accuracy] * 4, "mi": {"target": 0.1, "background": 0.0},
            "images": 128, "seconds": {"sanitize": 1.0, "personalize": None, "synthesize": 10.0, "train": 5.0}}


def test_summary_report_and_plot(tmp_path):
    rows = [_row("L1_L0-a0", "L1_L0", 0.0, s, a) for s, a in enumerate((0.5, 0.7))]
    rows.append({**_row("L2_L0-a0", "L2_L0", 0.0, 0, None), "error": "boom"})
    summary = bench.summarize(rows)
    assert summary["L1_L0-a0"]["accuracy"]["mean"] == pytest.approx(0.6)
    assert summary["L1_L0-a0"]["accuracy"]["sd"] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summary["L2_L0-a0"]["failed"] == ["r-L2_L0-a0-0"]
    results = {"user_seed": 4, "model": "m", "test_images": 100, "configurations": summary,
               "baselines": {"public": {"accuracy": {"mean": 0.4, "sd": 0.1, "n": 2}, "per_state": dict.fromkeys(STATES, 0.4),
                                        "seconds": 3.0}}}
    text = bench.results_markdown(results)
    assert "| L1_L0 | 0 | 0.600 ± 0.141 (n=2)" in text and "| public | 0.400 ± 0.100" in text and "boom" not in text
    assert "r-L2_L0-a0-0" in text
    path = bench.plot(results, str(tmp_path / "accuracy.png"))
    from PIL import Image
    assert Image.open(path).size[0] > 400


def test_cli_refuses_bad_configurations():
    from spinbench.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--user-seed", "1", "--out", "x", "--configs", "L3_L0"])
    with pytest.raises(SystemExit):
        main(["run", "--user-seed", "1", "--out", "x", "--alphas", "2"])


def test_cli_sets_the_l2_target_and_decorations_of_every_request_it_runs(tmp_path, monkeypatch):
    """`--l2-target`, `--prompt-decorations` and `--placement` reach every request the benchmark writes
    (so the ways of drawing and placing an L2 target, and prompts with and without decorations, can be
    compared on the same user and seeds), and `--http-port` reaches the synthesis app."""
    from spinbench.cli import main

    seen = {}

    def fake_run(user_seed, out_dir, runs, **kwargs):
        seen.update(kwargs)
        manifest = bench.write_requests(user_seed, str(tmp_path / "world"), runs, kwargs["synthesis"],
                                        kwargs["training"], {"steps": 5}, references_per_state=1, test_per_state=1)
        seen["requests"] = [load_request(uri) for uri in list_requests(manifest)]
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / "results.md").write_text("table\n")
        return {"configurations": {}}

    monkeypatch.setattr(bench, "run_benchmark", fake_run)
    common = ["run", "--user-seed", "2", "--out", str(tmp_path / "out"), "--configs", "L2_L0,L0_L0", "--seeds", "2"]
    assert main([*common, "--l2-target", "personalized_text", "--prompt-decorations", "off",
                 "--placement", "varied", "--http-port", "8123"]) == 0
    assert seen["http_port"] == 8123 and len(seen["requests"]) == 4
    assert all(spec.synthesis.l2_target == "personalized_text" and spec.synthesis.prompt_decorations is False
               and spec.synthesis.placement == "varied" for spec in seen["requests"])
    assert main(common) == 0  # without the flags, the system's own defaults
    defaults = type(seen["requests"][0].synthesis)()
    assert all(spec.synthesis.l2_target == defaults.l2_target and spec.synthesis.prompt_decorations is True
               and spec.synthesis.placement == defaults.placement for spec in seen["requests"])
    for bad in (["--l2-target", "pasted"], ["--placement", "anywhere"]):
        with pytest.raises(SystemExit):
            main([*common, *bad])


def test_demo_sheet_shows_the_releases_and_the_images_per_label():
    from spinbench.demo import TILE, sheet
    from spinml_ray.images import encode_png

    user = make_user(0)
    refs = user_samples(user, 1, "references")
    sanitized = []
    for i, ref in enumerate(refs):
        pixels, _, _ = release(ref.image, ref.mask, Level.L2)
        sanitized += [{"ref_id": f"ref-{i}", "object": "target", "payload": encode_png(pixels)},
                      {"ref_id": f"ref-{i}", "object": "background", "payload": None}]
    synthetic = [{"label": state, "image": encode_png(ref.image)} for state, ref in zip(STATES, refs)]
    picture = sheet(sanitized, synthetic, list(STATES), per_label=4)
    rows = (picture.shape[0] - 2) // (2 * TILE + 2)
    assert rows == 2 + len(STATES) and picture.shape[1] == 4 * (2 * TILE + 2) + 2
    def tile(row, column):
        y, x = 2 + row * (2 * TILE + 2), 2 + column * (2 * TILE + 2)
        return picture[y:y + 2 * TILE:2, x:x + 2 * TILE:2]

    first_release = release(refs[0].image, refs[0].mask, Level.L2)[0]
    assert np.array_equal(tile(0, 0), first_release)  # the target's payload, exactly as released
    assert (tile(1, 0) == 40).all()  # the background at L0: nothing left, an empty tile
    assert np.array_equal(tile(2, 0), refs[0].image)  # then a row of images per label
    assert np.array_equal(tile(3, 0), refs[1].image) and not tile(3, 1).any()
