"""`spinml sweep`: variants, the summary, the Pareto front and the recommendation (pure), and a sweep of
the example request through the batch job (cluster)."""

import json
import os

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from spinml_ray import storage, sweep
from spinml_ray.examples import write_example
from spinml_ray.spec import load_request


def test_variants_cover_every_combination_and_run_l0_l0_once_per_seed():
    runs = sweep.variants(("L0_L0", "L1_L0"), (0.0, 0.25), seeds=2)
    assert [(r.config, r.alpha, r.seed) for r in runs] == [
        ("L0_L0", 0.0, 0), ("L0_L0", 0.0, 1), ("L1_L0", 0.0, 0), ("L1_L0", 0.0, 1), ("L1_L0", 0.25, 0), ("L1_L0", 0.25, 1)]
    assert runs[4].request_id("req") == "req-L1_L0-a0.25-s0"


@pytest.mark.parametrize("text", ["", "L3_L0", "L1", "L1_L0,bogus"])
def test_bad_configurations_are_named(text):
    with pytest.raises(ValueError, match="configurations must be"):
        sweep.parse_configs(text)


@pytest.mark.parametrize("text", ["", "x", "1.5", "-0.1"])
def test_bad_alphas_are_named(text):
    with pytest.raises(ValueError, match="alphas must be"):
        sweep.parse_alphas(text)


def test_variant_documents_are_valid_requests_in_the_same_folder(tmp_path):
    uri = write_example(str(tmp_path / "req"))
    spec = load_request(uri)
    runs = sweep.variants(("L1_L0", "L2_L2"), (0.0, 0.5), seeds=1)
    manifest = sweep.write_variants(uri, spec, runs)
    names = yaml.safe_load(open(manifest))["requests"]
    assert len(names) == 4
    for name, run in zip(names, runs):
        variant = load_request(os.path.join(tmp_path, "req", name))  # confined to the folder: it loads
        assert variant.request_id == run.request_id(spec.request_id)
        assert (variant.privacy.target.value, variant.privacy.background.value) == tuple(run.config.split("_"))
        assert variant.privacy.alpha == run.alpha and variant.synthesis.seed == run.seed
        assert variant.references == spec.references and variant.labels == spec.labels


def test_a_request_id_too_long_for_its_variants_is_refused_before_anything_runs(tmp_path):
    uri = write_example(str(tmp_path / "req"))
    spec = load_request(uri).model_copy(update={"request_id": "r" * 120})
    with pytest.raises(ValueError, match="too long"):
        sweep.write_variants(uri, spec, sweep.variants(("L1_L0",), (0.0,), 1))
    assert not [f for f in os.listdir(tmp_path / "req") if f.startswith("sweep-")]


def test_a_sweep_needs_the_users_test_set_and_says_so_before_any_cluster(tmp_path, capsys):
    from spinml_ray.cli import main

    uri = write_example(str(tmp_path / "req"))
    document = yaml.safe_load(open(uri))
    del document["test_set"]
    with open(uri, "w") as handle:
        yaml.safe_dump(document, handle)
    assert main(["sweep", uri, "--storage", str(tmp_path / "out"), "--address", "127.0.0.1:1"]) == 2
    assert "needs a test_set" in capsys.readouterr().err


def _row(config, alpha, seed, accuracy, target_mi=0.0, background_mi=0.0):
    run = sweep.Variant(config, alpha, seed)
    return {"name": run.name, "config": config, "alpha": alpha, "seed": seed, "request_id": run.request_id("r"),
            "accuracy": accuracy, "mi": {"target": target_mi, "background": background_mi}}


def test_summary_recommendation_and_front():
    rows = [_row("L0_L0", 0.0, 0, 0.50), _row("L0_L0", 0.0, 1, 0.60),
            _row("L1_L0", 0.0, 0, 0.80, 0.05), _row("L1_L0", 0.0, 1, 0.84, 0.05),
            _row("L2_L0", 0.0, 0, 0.86, 0.20), _row("L2_L0", 0.0, 1, None, 0.20),
            _row("L2_L2", 0.0, 0, 0.70, 0.20, 0.4)]
    summary = sweep.summarize(rows)
    assert summary["L0_L0-a0"]["accuracy"]["mean"] == pytest.approx(0.55)
    assert summary["L0_L0-a0"]["accuracy"]["sd"] == pytest.approx(0.0707, abs=1e-4)
    assert summary["L2_L0-a0"]["failed"] == ["r-L2_L0-a0-s1"] and summary["L2_L0-a0"]["accuracy"]["n"] == 1
    assert summary["L2_L2-a0"]["leakage"] == pytest.approx(0.6)
    assert sweep.pareto_front(summary) == ["L0_L0-a0", "L1_L0-a0", "L2_L0-a0"]  # L2_L2 leaks more for less
    advice = sweep.recommend(summary)  # within 95% of the best (0.86): 0.817
    assert advice["name"] == "L1_L0-a0" and advice["bar"] == pytest.approx(0.817)
    assert sweep.recommend(summary, target_accuracy=0.5)["name"] == "L0_L0-a0"
    assert sweep.recommend(summary, target_accuracy=0.9)["name"] is None
    assert sweep.recommend({}) is None


points = st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(points)
def test_the_front_is_exactly_the_undominated_points_and_holds_the_recommendation(values):
    summary = {f"c{i}": {"config": "L1_L0", "alpha": 0.0, "leakage": leak, "accuracy": {"mean": acc}, "failed": []}
               for i, (leak, acc) in enumerate(values)}
    front = set(sweep.pareto_front(summary))
    for name, e in summary.items():
        dominated = any(o["leakage"] <= e["leakage"] and o["accuracy"]["mean"] >= e["accuracy"]["mean"]
                        and (o["leakage"], o["accuracy"]["mean"]) != (e["leakage"], e["accuracy"]["mean"])
                        for o in summary.values())
        assert (name in front) == (not dominated)
    advice = sweep.recommend(summary, within=0.9)
    best = max(acc for _, acc in values)
    assert advice["accuracy"] >= 0.9 * best - 1e-12 and advice["name"] in front
    assert all(e["leakage"] >= advice["leakage"] for e in summary.values() if e["accuracy"]["mean"] >= advice["bar"])


@pytest.mark.cluster
def test_spinml_sweep_runs_the_variants_as_one_batch_and_recommends(tmp_path, synthesis, http_port, capsys):
    from spinml_ray.cli import main

    folder = tmp_path / "req"
    uri = write_example(str(folder))
    document = yaml.safe_load(open(uri))
    document["synthesis"]["images_per_label"] = 4
    document["training"]["epochs"] = 1
    with open(uri, "w") as handle:
        yaml.safe_dump(document, handle)
    root = str(tmp_path / "out")
    code = main(["sweep", uri, "--storage", root, "--configs", "L0_L0,L1_L0", "--alphas", "0,0.25", "--seeds", "1",
                 "--references-from", str(folder), "--http-port", str(http_port)])
    assert code == 0
    out = storage.join(root, "demo", "_sweeps", "example-duck")
    results = json.loads(storage.read_bytes(storage.join(out, "sweep.json")))
    assert list(results["configurations"]) == ["L0_L0-a0", "L1_L0-a0", "L1_L0-a0.25"]
    assert [v["state"] for v in results["variants"]] == ["done"] * 3
    for entry in results["configurations"].values():
        assert entry["accuracy"]["n"] == 1 and 0 <= entry["accuracy"]["mean"] <= 1
        assert set(entry["sim"]) == {"target", "background"}
    base = results["configurations"]["L0_L0-a0"]["sim"]
    for entry in results["configurations"].values():  # the tiny model's targets are placed only at L1
        assert entry["dsim"]["background"] == pytest.approx(entry["sim"]["background"] - base["background"])
    assert base["target"] is None and results["configurations"]["L1_L0-a0"]["dsim"]["target"] is None
    cross = {n: e["mi_target_about_background"] for n, e in results["configurations"].items()}
    assert cross["L0_L0-a0"] == 0 < cross["L1_L0-a0"] == cross["L1_L0-a0.25"]
    assert results["configurations"]["L0_L0-a0"]["leakage"] == 0 < results["configurations"]["L1_L0-a0"]["leakage"]
    assert results["recommendation"]["name"] in results["configurations"]
    assert results["recommendation"]["name"] in results["pareto_front"]
    assert "data:image/png;base64," in storage.read_bytes(storage.join(out, "index.html")).decode()
    assert "Recommendation:" in capsys.readouterr().out
