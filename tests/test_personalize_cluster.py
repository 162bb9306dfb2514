"""Personalization on a local Ray cluster: resume after a killed worker, skipping, requests side by side."""

import os
import threading

import pytest
import yaml
from safetensors.torch import load_file

from spinml_ray import storage
from spinml_ray.examples import make_scene
from spinml_ray.images import encode_png
from spinml_ray.personalization import LORA_WEIGHTS
from spinml_ray.ray_layer.pipeline import request_paths
from spinml_ray.spec import load_request

pytestmark = pytest.mark.cluster


def _request(folder, request_id, target="L2", seed=0, steps=12):
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(2):
        image, mask = make_scene("resting", seed * 10 + i)
        (folder / f"ref{i}.png").write_bytes(encode_png(image))
        (folder / f"mask{i}.png").write_bytes(encode_png(mask))
        refs.append({"uri": f"ref{i}.png", "mask_uri": f"mask{i}.png"})
    request = {
        "request_id": request_id, "tenant": "p", "subject": "rubber duck",
        "labels": [{"name": "floating", "phrase": "floating"}, {"name": "resting", "phrase": "resting"}],
        "references": refs, "privacy": {"target": target, "background": "L0"},
        "synthesis": {"images_per_label": 2, "resolution": 32, "steps": 2},
        "personalization": {"steps": steps, "checkpoint_every": 5, "class_images": 2, "batch_size": 1,
                            "learning_rate": 1e-3, "seed": seed},
    }
    (folder / "request.yaml").write_text(yaml.safe_dump(request))
    return str(folder / "request.yaml")


def _run(uri, root, http_port, stages):
    from spinml_ray.ray_layer.pipeline import run_request

    return run_request(uri, root, stages=stages, http_port=http_port, keep_serving=True)


def test_a_killed_worker_resumes_from_its_last_checkpoint(tmp_path, synthesis, http_port):
    from spinml_ray.ray_layer.personalize import run_personalize

    uri = _request(tmp_path / "req", "resume")
    root = str(tmp_path / "out")
    _run(uri, root, http_port, ("sanitize",))
    spec = load_request(uri)
    paths = request_paths(spec, root)
    manifest = run_personalize(spec, paths, "tiny", synthesis, fault_injection_step=7)
    assert manifest["resumed_from"] == 5  # the checkpoint before the worker died at step 7
    assert manifest["steps"] == 12 and manifest["final_loss"] < manifest["initial_loss"]
    assert manifest["class_images"] == 2 and manifest["crops"] == 2
    assert storage.exists(os.path.join(paths.adapters, LORA_WEIGHTS))

    # The adapter is used by synthesis: its images carry the identifier token and the adapter.
    summary = _run(uri, root, http_port, ("synthesize",))
    assert summary["synthesize"]["adapter"] == paths.adapters
    synthetic = storage.read_committed_table(paths.synthetic).to_pylist()
    assert all("sks rubber duck" in r["prompt"] for r in synthetic)


@pytest.mark.parametrize("target", ["L0", "L1"])
def test_requests_without_an_l2_target_never_start_the_stage(tmp_path, synthesis, http_port, target):
    uri = _request(tmp_path / "req", f"no-l2-{target}", target=target)
    root = str(tmp_path / "out")
    summary = _run(uri, root, http_port, ("sanitize", "personalize"))
    assert summary["personalize"]["skipped"].startswith(f"target released at {target}")
    paths = request_paths(load_request(uri), root)
    assert not storage.exists(paths.adapters) and not storage.exists(paths.train_runs)


def test_adapters_of_two_requests_train_side_by_side(tmp_path, synthesis, http_port):
    from spinml_ray.ray_layer.personalize import run_personalize

    root = str(tmp_path / "out")
    specs = []
    for n in range(2):
        uri = _request(tmp_path / f"req{n}", f"user{n}", seed=n, steps=6)
        _run(uri, root, http_port, ("sanitize",))
        specs.append(load_request(uri))
    results = {}

    def personalize(spec):
        results[spec.request_id] = run_personalize(spec, request_paths(spec, root), "tiny", synthesis)

    threads = [threading.Thread(target=personalize, args=(spec,)) for spec in specs]
    [t.start() for t in threads]
    [t.join(timeout=900) for t in threads]
    assert sorted(results) == ["user0", "user1"] and all(r["steps"] == 6 for r in results.values())
    weights = [load_file(os.path.join(request_paths(s, root).adapters, LORA_WEIGHTS)) for s in specs]
    assert weights[0].keys() == weights[1].keys()
    assert any(not (weights[0][k] == weights[1][k]).all() for k in weights[0])  # each from its own data


def test_an_out_of_memory_adapter_fails_with_the_settings_to_lower(tmp_path, synthesis, http_port):
    from spinml_ray.errors import StageError
    from spinml_ray.ray_layer.personalize import run_personalize

    uri = _request(tmp_path / "req", "lora-too-big", steps=3)
    root = str(tmp_path / "out")
    _run(uri, root, http_port, ("sanitize",))
    spec = load_request(uri)
    paths = request_paths(spec, root)
    with pytest.raises(StageError) as info:  # a real allocator refusal in the worker, at step 1
        run_personalize(spec, paths, "tiny", synthesis, fault_injection_step=1, fault_kind="oom")
    message = str(info.value)
    assert "lora-too-big" in message and "personalization ran out of memory" in message
    assert "personalization.batch_size" in message and "can't allocate memory" in message
    assert storage.read_manifest(paths.adapters) is None  # no adapter, so synthesis will not use one


def test_full_dreambooth_trains_on_ray_train_and_the_service_serves_its_unet(tmp_path, synthesis, http_port):
    """`personalization.method: full`: the whole UNet, trained in Ray Train, committed as `adapters/unet/`,
    and loaded by the replica as the request's own model (multiplexed like an adapter)."""
    from spinml_ray.personalization import FULL_UNET

    uri = _request(tmp_path / "req", "full", steps=3)
    document = yaml.safe_load(open(uri))
    document["personalization"]["method"] = "full"
    with open(uri, "w") as handle:
        yaml.safe_dump(document, handle)
    root = str(tmp_path / "out")
    summary = _run(uri, root, http_port, ("sanitize", "personalize", "synthesize"))
    paths = request_paths(load_request(uri), root)
    manifest = storage.read_manifest(paths.adapters)
    assert manifest["method"] == "full" and manifest["steps"] == 3 and FULL_UNET in manifest["files"]
    assert storage.exists(os.path.join(paths.adapters, FULL_UNET, "config.json"))
    assert not storage.exists(os.path.join(paths.adapters, LORA_WEIGHTS))
    assert summary["synthesize"]["adapter"] == paths.adapters
    info = synthesis.info.remote().result()
    assert paths.adapters in info["adapters"]
