"""The request end to end on a local Ray cluster (loopback only): local storage, S3, Serve over HTTP."""

import io
import json
import os

import boto3
import numpy as np
import pytest
import requests
import torch
import yaml

from spinml_ray import storage
from spinml_ray.examples import make_scene, write_example
from spinml_ray.images import decode_png, encode_png
from spinml_ray.training.classifier import build_model

pytestmark = pytest.mark.cluster


def run(request_uri, storage_root, http_port, stages=("sanitize", "synthesize", "train"), model="tiny"):
    from spinml_ray.ray_layer.pipeline import run_request

    return run_request(request_uri, storage_root, model=model, stages=stages, http_port=http_port, keep_serving=True)


def test_example_request_end_to_end(tmp_path, synthesis, http_port):
    request_uri = write_example(str(tmp_path / "request"))
    out = str(tmp_path / "out")
    summary = run(request_uri, out, http_port)
    base = os.path.join(out, "demo", "example-duck")
    assert summary["output"] == base

    sanitized = storage.read_committed_table(os.path.join(base, "sanitized")).to_pylist()
    assert len(sanitized) == 8 and summary["sanitize"]["accepted"] == 4
    for row in sanitized:
        if row["object"] == "target":
            assert row["level"] == "L1" and 0 < row["mi"] < 1
            edges = decode_png(row["payload"])
            assert edges.shape == (96, 128) and set(np.unique(edges)) <= {0, 255} and edges.any()
        else:
            assert row["level"] == "L0" and row["payload"] is None and row["region"] is None and row["mi"] == 0
    assert storage.read_table(os.path.join(base, "sanitized", "rejections.parquet")).num_rows == 0

    synthetic = storage.read_committed_table(os.path.join(base, "synthetic")).to_pylist()
    assert len(synthetic) == 16
    for label in ("floating", "resting"):
        pools = [r["pool"] for r in synthetic if r["label"] == label]
        assert pools.count("L0_L0") == 2 and pools.count("L1_L0") == 6  # alpha = 0.25 of 8
    assert {r["kind"] for r in synthetic if r["pool"] == "L0_L0"} == {"txt2img"}
    assert {r["kind"] for r in synthetic if r["pool"] == "L1_L0"} == {"controlnet"}
    assert len({r["seed"] for r in synthetic}) == 16
    assert all(decode_png(r["image"]).shape == (64, 64, 3) for r in synthetic)
    assert all(r["condition_sha256"] == r["received_sha256"] for r in synthetic)
    assert all("yellow rubber duck" in r["prompt"] for r in synthetic)

    model_dir = os.path.join(base, "model")
    assert sorted(storage.read_manifest(model_dir)["files"]) == [
        "metrics.json", "model.onnx", "model.pt", "model.torchscript.pt", "settings.json"]
    model = build_model("mobilenet_v2", 2).eval()
    model.load_state_dict(torch.load(io.BytesIO(storage.read_bytes(os.path.join(model_dir, "model.pt")))))
    from spinml_ray.training.export import onnx_logits

    batch = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = model(batch).numpy()
    delivered = onnx_logits(storage.read_bytes(os.path.join(model_dir, "model.onnx")), batch.numpy())
    assert np.allclose(delivered, expected, atol=1e-4)  # the device gets the model that was evaluated
    metrics = storage.read_json(os.path.join(model_dir, "metrics.json"))
    assert metrics["evaluated_on"] == "real test set" and metrics["n"] == 8
    assert 0.0 <= metrics["accuracy"] <= 1.0 and np.array(metrics["confusion"]).sum() == 8
    assert metrics["pretrained"] == "none (offline)"  # auto, with no weights in tiny or the hub cache, no network
    settings = storage.read_json(os.path.join(model_dir, "settings.json"))
    assert settings["privacy"]["target"] == "L1" and settings["training"]["epochs"] == 2


def _write_request(folder, images_and_masks, target, background, request_id):
    os.makedirs(folder, exist_ok=True)
    refs = []
    for i, (image, mask) in enumerate(images_and_masks):
        (folder / f"ref{i}.png").write_bytes(encode_png(image))
        (folder / f"mask{i}.png").write_bytes(encode_png(mask))
        refs.append({"uri": f"ref{i}.png", "mask_uri": f"mask{i}.png"})
    request = {
        "request_id": request_id,
        "tenant": "privacy",
        "subject": "yellow rubber duck",
        "labels": [{"name": "floating", "phrase": "floating"}, {"name": "resting", "phrase": "resting"}],
        "references": refs,
        "privacy": {"target": target, "background": background, "alpha": 0.0},
        "synthesis": {"images_per_label": 2, "resolution": 32, "steps": 2, "seed": 3},
    }
    (folder / "request.yaml").write_text(yaml.safe_dump(request))
    return str(folder / "request.yaml")


@pytest.mark.parametrize("background", ["L1", "L2"])
def test_target_at_l0_never_leaves_sanitization(tmp_path, synthesis, http_port, background):
    """Change only the target's pixels: everything after sanitization stays byte-identical."""
    scenes = [make_scene("floating", 11), make_scene("resting", 12)]
    rng = np.random.default_rng(0)
    altered = [(np.where(m[..., None], rng.integers(0, 256, img.shape, dtype=np.uint8), img), m) for img, m in scenes]
    outputs = {}
    for name, refs in (("original", scenes), ("altered", altered)):
        uri = _write_request(tmp_path / name, refs, "L0", background, f"priv-{name}")
        run(uri, str(tmp_path / "out"), http_port, stages=("sanitize", "synthesize"))
        base = os.path.join(str(tmp_path / "out"), "privacy", f"priv-{name}")
        outputs[name] = (
            storage.read_committed_table(os.path.join(base, "sanitized")).sort_by([("ref_id", "ascending"), ("object", "ascending")]).to_pylist(),
            storage.read_committed_table(os.path.join(base, "synthetic")).sort_by("image_id").to_pylist(),
        )
    (san_a, syn_a), (san_b, syn_b) = outputs["original"], outputs["altered"]
    for row in san_a:
        if row["object"] == "target":
            assert row["payload"] is None and row["region"] is None and row["mi"] == 0.0
    for row_a, row_b in zip(san_a, san_b, strict=True):
        # `mi` is the artifact's normalised leakage: divided by the whole raw image's entropy, it is the
        # one documented scalar of the bundle that the raw image (target included) can move; the planner
        # never reads it, and nothing else may differ.
        assert {k: v for k, v in row_a.items() if k != "mi"} == {k: v for k, v in row_b.items() if k != "mi"}
    # What the deployment received (digest computed on the replica) and what it made are identical.
    assert [r["received_sha256"] for r in syn_a] == [r["received_sha256"] for r in syn_b]
    assert all(r["received_sha256"] for r in syn_a)
    assert [r["image"] for r in syn_a] == [r["image"] for r in syn_b]
    # The released background holds nothing inside the target's region.
    if background == "L2":
        for row, (_, mask) in zip([r for r in san_a if r["object"] == "background"], scenes):
            assert not decode_png(row["payload"])[mask].any()


def test_request_on_s3_with_model_from_s3(tmp_path, s3_server, synthesis, synthesis_storage, http_port):
    """Request, references, model source and outputs all on S3; the Serve replica reads the model there."""
    from ray import serve

    from spinml_ray.models.source import resolve
    from spinml_ray.ray_layer.service import APP_NAME, ensure_running

    endpoint, bucket = s3_server
    local = tmp_path / "request"
    write_example(str(local))
    storage.upload_dir(str(local), f"s3://{bucket}/requests/duck")
    storage.upload_dir(resolve("tiny"), f"s3://{bucket}/models/tiny-sd")
    serve.delete(APP_NAME)  # the next run deploys its own app with the S3 model source
    try:
        summary = run(f"s3://{bucket}/requests/duck/request.yaml", f"s3://{bucket}/spinml", http_port,
                      model=f"s3://{bucket}/models/tiny-sd")
    finally:
        serve.delete(APP_NAME)
        ensure_running("tiny", http_port=http_port, storage_root=synthesis_storage)  # the shared app again
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = {obj["Key"] for obj in s3.list_objects_v2(Bucket=bucket, Prefix="spinml/")["Contents"]}
    prefix = "spinml/demo/example-duck/"
    for name in ("sanitized/_SUCCESS.json", "synthetic/_SUCCESS.json", "model/model.pt", "model/metrics.json"):
        assert prefix + name in keys
    metrics = json.loads(s3.get_object(Bucket=bucket, Key=prefix + "model/metrics.json")["Body"].read())
    assert metrics["n"] == 8 and summary["synthesize"]["images"] == 16


def _api_body(request_id, tenant="demo", bundle=None, count=2, **privacy):
    return {
        "request_id": request_id, "tenant": tenant, "subject": "yellow rubber duck",
        "label": {"name": "floating", "phrase": "floating in water"},
        "privacy": privacy or {"target": "L0", "background": "L0"}, "bundle": bundle,
        "synthesis": {"images_per_label": count, "resolution": 32, "steps": 2, "seed": 1},
    }


def test_http_api_authenticates_isolates_tenants_and_stores_images(tmp_path, synthesis, synthesis_storage, http_port):
    """POST /v1/generate over HTTP on 127.0.0.1 and the job's handle produce the same images."""
    from spinml_ray.ray_layer.service import ApiGenerateRequest, submit
    from spinml_ray.synthesis.plan import index_bundle, plan_label

    url = f"http://127.0.0.1:{http_port}/spinml"
    health = requests.get(f"{url}/healthz", timeout=60).json()
    assert health["status"] == "ok" and "controlnet" in health["pipelines"]

    # A bundle of tenant "demo" (sanitized by the job) to condition on.
    request_uri = write_example(str(tmp_path / "request"))
    root = synthesis_storage
    run(request_uri, root, http_port, stages=("sanitize",))
    bundle = os.path.join(root, "demo", "example-duck", "sanitized")
    body = _api_body("http-1", bundle=bundle, target="L1", background="L0")
    auth = {"Authorization": "Bearer demo-token"}

    assert requests.post(f"{url}/v1/generate", json=body, timeout=60).status_code == 401
    assert requests.post(f"{url}/v1/generate", json=body, headers={"Authorization": "Bearer nope"}, timeout=60).status_code == 401
    other = requests.post(f"{url}/v1/generate", json=body, headers={"Authorization": "Bearer other-token"}, timeout=60)
    assert other.status_code == 403 and "demo" in other.text  # the token's tenant is not the body's
    stolen = _api_body("http-1", tenant="other", bundle=bundle, target="L1", background="L0")
    response = requests.post(f"{url}/v1/generate", json=stolen, headers={"Authorization": "Bearer other-token"}, timeout=60)
    assert response.status_code == 403 and "bundle" in response.text  # another tenant's bundle
    bad = _api_body("http-1", bundle=bundle) | {"synthesis": {"images_per_label": 1, "resolution": 30}}
    response = requests.post(f"{url}/v1/generate", json=bad, headers=auth, timeout=60)
    assert response.status_code == 422 and "resolution" in response.text

    response = requests.post(f"{url}/v1/generate", json=body, headers=auth, timeout=300)
    assert response.status_code == 200, response.text
    images = response.json()["images"]
    assert len(images) == 2 and all(i["uri"].startswith(os.path.join(root, "demo", "http-1")) for i in images)
    # The job's path: the same plan, the same handle, the same bytes.
    request = ApiGenerateRequest.model_validate(body)
    by_ref = index_bundle(storage.read_committed_table(bundle).to_pylist())
    items = plan_label("http-1", "demo", request.subject, request.label, request.privacy, request.synthesis, by_ref)
    for item, image in zip(items, images):
        assert submit(synthesis, item).result().image == storage.read_bytes(image["uri"])
    again = requests.post(f"{url}/v1/generate", json=body, headers=auth, timeout=300).json()["images"]
    assert [i["uri"] for i in again] == [i["uri"] for i in images]  # a retry writes nothing new


def test_http_api_refuses_a_call_larger_than_it_ever_admits_at_once(synthesis, http_port):
    """413 naming the limit, not a 503 that would be retried forever (busy-but-fitting calls get 503:
    see test_serve_reliability)."""
    url = f"http://127.0.0.1:{http_port}/spinml"
    body = _api_body("big", count=300)  # more than the app's 256 pending images
    response = requests.post(f"{url}/v1/generate", json=body, headers={"Authorization": "Bearer demo-token"}, timeout=60)
    assert response.status_code == 413 and "256" in response.json()["detail"] and "Retry-After" not in response.headers


def test_one_bad_item_does_not_fail_its_batch(synthesis):
    from spinml_ray.synthesis.workitems import WorkItem

    common = dict(request_id="r", tenant="t", label="a", pool="x", prompt="A photo of a duck", resolution=32,
                  steps=2, guidance=5.0)
    good = [WorkItem(image_id=f"good-{i}", seed=i, **common) for i in range(3)]
    bad = WorkItem(image_id="bad", seed=9, init_image=b"not an image", **common)
    responses = [synthesis.generate.remote(item) for item in [*good, bad]]
    for response in responses[:3]:
        assert decode_png(response.result().image).shape == (32, 32, 3)
    with pytest.raises(Exception, match="bad|image|identify"):
        responses[3].result()


def test_stage_subcommands_run_one_stage_each(tmp_path, synthesis, capsys, caplog):
    """... and, off a terminal, show their progress as log lines: counted in the driver (references,
    images) and in the Ray Train workers (epochs, through the relay)."""
    import logging

    from spinml_ray.cli import main

    caplog.set_level(logging.INFO, logger="spinml_ray.ray_layer.progress")
    request = write_example(str(tmp_path / "request"))
    out = str(tmp_path / "out")
    base = os.path.join(out, "demo", "example-duck")
    assert main(["train", request, "--storage", out]) == 2  # nothing synthesized yet: a clear error
    assert "synthetic" in capsys.readouterr().err
    assert main(["sanitize", request, "--storage", out]) == 0
    assert storage.read_manifest(os.path.join(base, "sanitized")) and not storage.exists(os.path.join(base, "synthetic"))
    assert main(["synthesize", request, "--storage", out]) == 0
    assert storage.read_manifest(os.path.join(base, "synthetic"))["images"] == 16
    assert main(["train", request, "--storage", out]) == 0
    assert storage.read_json(os.path.join(base, "model", "metrics.json"))["n"] == 8
    lines = [r.getMessage() for r in caplog.records if r.name == "spinml_ray.ray_layer.progress"]
    for stage, count in (("sanitize", "4/4 references"), ("synthesize", "16/16 images"), ("train", "2/2 epochs")):
        assert f"demo/example-duck {stage}: running" in lines
        assert f"demo/example-duck {stage}: {count}" in lines, lines
        assert f"demo/example-duck {stage}: done ({count})" in lines
    assert "demo/example-duck train: failed" in lines  # the first try, before anything was synthesized


def test_sam_segments_unmasked_references_and_bad_ones_are_rejected(tmp_path, synthesis, http_port):
    """References without masks go through SAM in the Ray Data actors; a corrupt one is recorded."""
    from spinml_ray.errors import StageError

    folder = tmp_path / "req"
    folder.mkdir()
    image, mask = make_scene("floating", 3)
    (folder / "a.png").write_bytes(encode_png(image))
    (folder / "a-mask.png").write_bytes(encode_png(mask))
    (folder / "b.png").write_bytes(encode_png(make_scene("resting", 4)[0]))
    (folder / "broken.png").write_bytes(encode_png(image)[:200])
    request = {
        "request_id": "sam", "tenant": "t", "subject": "duck",
        "labels": [{"name": "floating", "phrase": "floating"}, {"name": "resting", "phrase": "resting"}],
        "references": [{"uri": "a.png", "mask_uri": "a-mask.png"}, {"uri": "b.png", "box": [20, 20, 110, 80]},
                       {"uri": "broken.png", "mask_uri": "a-mask.png"}],
        "privacy": {"target": "L2", "background": "L0"},
        "synthesis": {"images_per_label": 1, "resolution": 32, "steps": 2},
    }
    (folder / "request.yaml").write_text(yaml.safe_dump(request))
    run(str(folder / "request.yaml"), str(tmp_path / "out"), http_port, stages=("sanitize",))
    base = os.path.join(str(tmp_path / "out"), "t", "sam", "sanitized")
    rejections = {r["ref_id"]: r["reason"] for r in storage.read_table(os.path.join(base, "rejections.parquet")).to_pylist()}
    assert "ref-0002" in rejections and "broken.png" in rejections["ref-0002"]
    rows = {(r["ref_id"], r["object"]): r for r in storage.read_committed_table(base).to_pylist()}
    assert ("ref-0000", "target") in rows
    # The box-only reference went through the preset's SAM in a sanitize actor. Its weights are seeded, so
    # its answer is fixed: a mask over most of the box, clipped to the box (the rule for a box prompt).
    assert set(rejections) == {"ref-0002"}
    region = decode_png(rows[("ref-0001", "target")]["region"]) > 0
    assert region[20:80, 20:110].mean() > 0.5
    assert not region[:20].any() and not region[:, :20].any() and not region[80:].any() and not region[:, 110:].any()
    request["min_references"] = 3
    (folder / "request.yaml").write_text(yaml.safe_dump(request))
    with pytest.raises(StageError, match="needed.*broken.png"):
        run(str(folder / "request.yaml"), str(tmp_path / "out2"), http_port, stages=("sanitize",))


def test_bundle_sanitized_on_the_device_is_accepted(tmp_path, synthesis, http_port):
    """The device sanitizes without Ray and uploads only the bundle; the server never sees a raw image."""
    from spinml_ray.cli import main

    image, mask = make_scene("resting", 21)
    (tmp_path / "raw.png").write_bytes(encode_png(image))
    (tmp_path / "mask.png").write_bytes(encode_png(mask))
    device = tmp_path / "device"
    assert main(["sanitize", "--local", "--image", str(tmp_path / "raw.png"), "--mask", str(tmp_path / "mask.png"),
                 "--target", "L2", "--background", "L0", "--out", str(device)]) == 0
    server = tmp_path / "server"
    server.mkdir()
    (server / "bundle.parquet").write_bytes((device / "bundle.parquet").read_bytes())
    (tmp_path / "raw.png").unlink()  # the raw image is gone: only the bundle can be used
    request = {
        "request_id": "dev", "tenant": "t", "subject": "duck", "bundle": "bundle.parquet",
        "labels": [{"name": "floating", "phrase": "floating"}, {"name": "resting", "phrase": "resting"}],
        "privacy": {"target": "L2", "background": "L0"},
        "synthesis": {"images_per_label": 2, "resolution": 32, "steps": 2},
    }
    (server / "request.yaml").write_text(yaml.safe_dump(request))
    summary = run(str(server / "request.yaml"), str(tmp_path / "out"), http_port, stages=("sanitize", "synthesize"))
    assert summary["sanitize"]["source"] == "bundle" and summary["sanitize"]["accepted"] == 1
    base = os.path.join(str(tmp_path / "out"), "t", "dev")
    rows = storage.read_committed_table(os.path.join(base, "sanitized")).to_pylist()
    device_rows = storage.read_table(str(device / "bundle.parquet")).to_pylist()
    assert [r["payload_sha256"] for r in rows] == [r["payload_sha256"] for r in device_rows]
    synthetic = storage.read_committed_table(os.path.join(base, "synthetic")).to_pylist()
    assert {r["kind"] for r in synthetic} == {"inpaint"} and len(synthetic) == 4  # the kept target, room painted


def test_a_killed_training_worker_resumes_from_its_last_epoch(tmp_path, synthesis, http_port):
    from spinml_ray.ray_layer.pipeline import request_paths
    from spinml_ray.ray_layer.train import run_train
    from spinml_ray.spec import load_request

    folder = tmp_path / "request"
    request_uri = write_example(str(folder))
    document = yaml.safe_load(open(request_uri))
    document["training"]["epochs"] = 3
    document["synthesis"]["images_per_label"] = 4
    (folder / "request.yaml").write_text(yaml.safe_dump(document))
    root = str(tmp_path / "out")
    run(request_uri, root, http_port, stages=("sanitize", "synthesize"))
    spec = load_request(request_uri)
    paths = request_paths(spec, root)
    metrics = run_train(spec, paths, fault_injection_epoch=1)
    assert metrics["resumed_from_epoch"] == 1  # epoch 0 was checkpointed before the worker died in epoch 1
    assert metrics["best_epoch"] in (0, 1, 2) and metrics["n"] == 8
    assert not storage.exists(os.path.join(paths.train_runs, "_resume", "train_state.pt"))  # cleaned up when done


def test_an_out_of_memory_training_fails_alone_with_a_clear_error(tmp_path, synthesis, http_port):
    """Two requests train side by side; one runs out of memory (a real allocator refusal in its worker).
    It fails with an error that says so and what to change; the other delivers its model."""
    from concurrent.futures import ThreadPoolExecutor

    from spinml_ray.errors import StageError
    from spinml_ray.ray_layer.pipeline import request_paths
    from spinml_ray.ray_layer.train import run_train
    from spinml_ray.spec import load_request

    folder = tmp_path / "request"
    request_uri = write_example(str(folder))
    document = yaml.safe_load(open(request_uri))
    document["synthesis"]["images_per_label"] = 2
    document["training"]["epochs"] = 1
    root = str(tmp_path / "out")
    jobs = []
    for request_id in ("fits", "too-big"):
        path = folder / f"{request_id}.yaml"
        path.write_text(yaml.safe_dump({**document, "request_id": request_id}))
        run(str(path), root, http_port, stages=("sanitize", "synthesize"))
        spec = load_request(str(path))
        jobs.append((spec, request_paths(spec, root)))

    def train(job):
        spec, paths = job
        try:
            return run_train(spec, paths, fault_injection_epoch=0 if spec.request_id == "too-big" else None,
                             fault_kind="oom")
        except StageError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        fits, too_big = pool.map(train, jobs)
    assert isinstance(too_big, StageError), too_big
    message = str(too_big)
    assert "too-big" in message and "ran out of memory" in message and "training.batch_size" in message
    assert "can't allocate memory" in message  # the allocator's own words, last line of the worker's error
    assert storage.read_manifest(jobs[1][1].model) is None  # nothing delivered for it
    assert isinstance(fits, dict) and fits["n"] == 8
    assert storage.read_manifest(jobs[0][1].model) is not None


def test_a_running_app_with_another_model_is_never_silently_used(synthesis, http_port, synthesis_storage):
    from spinml_ray.ray_layer.service import ensure_running

    with pytest.raises(RuntimeError, match="serves model 'tiny', not 'spinbench'"):
        ensure_running("spinbench", http_port=http_port, storage_root=synthesis_storage)
    handle, started = ensure_running("tiny", http_port=http_port, storage_root=synthesis_storage)
    assert not started
