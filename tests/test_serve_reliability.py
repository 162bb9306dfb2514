"""The synthesis service under load and under failure, on 127.0.0.1 (bounded in count and time)."""

import os
import threading
import time

import pytest
import requests

from spinml_ray import storage
from spinml_ray.images import decode_png

pytestmark = pytest.mark.cluster
AUTH = {"Authorization": "Bearer demo-token"}


def _deploy(name: str, root: str, **options):
    from ray import serve

    from spinml_ray.ray_layer.service import build_app

    serve.run(build_app("tiny", storage_root=root, **options), name=name, route_prefix=f"/{name}")


def _body(request_id: str, count: int, steps: int = 2, resolution: int = 32) -> dict:
    return {
        "request_id": request_id, "tenant": "demo", "subject": "duck",
        "label": {"name": "floating", "phrase": "floating"},
        "synthesis": {"images_per_label": count, "resolution": resolution, "steps": steps, "seed": 0},
    }


def _stored(root: str) -> list[str]:
    return storage.list_files(os.path.join(root, "demo"), recursive=True)


def test_load_200_calls_from_16_clients(ray_cluster, synthesis, http_port, tmp_path):
    """Every accepted call completes with its images stored once; overload answers 503 + Retry-After."""
    from ray import serve

    root = str(tmp_path / "store")
    _deploy("load", root, max_pending_images=6, max_batch_size=8)
    url = f"http://127.0.0.1:{http_port}/load/v1/generate"
    calls = list(range(200))
    lock = threading.Lock()
    answers: dict[int, requests.Response] = {}

    def client():
        while True:
            with lock:
                if not calls:
                    return
                i = calls.pop()
            answers[i] = requests.post(url, json=_body(f"load-{i:03d}", 1), headers=AUTH, timeout=120)

    threads = [threading.Thread(target=client) for _ in range(16)]
    [t.start() for t in threads]
    [t.join(timeout=600) for t in threads]
    try:
        assert len(answers) == 200
        codes = [r.status_code for r in answers.values()]
        assert set(codes) <= {200, 503}, {c for c in codes if c not in (200, 503)}
        assert codes.count(200) > 0
        accepted = [u["uri"] for r in answers.values() if r.status_code == 200 for u in r.json()["images"]]
        for response in answers.values():
            if response.status_code == 503:
                assert int(response.headers["Retry-After"]) > 0
        # Nothing lost, nothing written twice, nothing half-written.
        assert sorted(accepted) == sorted(set(accepted)) == _stored(root)
        assert all(decode_png(storage.read_bytes(uri)).shape == (32, 32, 3) for uri in accepted)
    finally:
        serve.delete("load")


def _replica_actor_names(app: str) -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"{app}#DiffusionDeployment#" in a["name"]]


def _kill_replica_mid_batch(app: str, caller: threading.Thread) -> str:
    """Start `caller`, wait until the app's one replica generates its batch, kill it; its actor name."""
    import ray
    from ray import serve

    [name] = _replica_actor_names(app)
    caller.start()
    replica = serve.get_deployment_handle("DiffusionDeployment", app_name=app)
    deadline = time.time() + 120
    while replica.info.remote().result()["generating"] == 0:  # until the batch is being generated
        assert time.time() < deadline and caller.is_alive(), "the batch never started"
        time.sleep(0.1)
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def test_killing_a_replica_mid_batch_fails_clearly_and_a_retry_completes(ray_cluster, synthesis, http_port, tmp_path):
    from ray import serve

    root = str(tmp_path / "store")
    _deploy("kill", root)
    url = f"http://127.0.0.1:{http_port}/kill/v1/generate"
    body = _body("kill-1", 6, steps=300, resolution=64)  # several seconds of work in one batch
    result: dict = {}
    caller = threading.Thread(target=lambda: result.update(r=requests.post(url, json=body, headers=AUTH, timeout=300)))
    try:
        name = _kill_replica_mid_batch("kill", caller)
        caller.join(timeout=300)
        response = result["r"]
        assert response.status_code == 500 and "generation failed" in response.text  # fails, and says why
        for uri in _stored(root):  # whatever is there is whole
            assert ".tmp-" not in uri and decode_png(storage.read_bytes(uri)).shape == (64, 64, 3)
        deadline = time.time() + 180  # Serve replaces the replica; the client retries the same call
        while True:
            retry = requests.post(url, json=body, headers=AUTH, timeout=300)
            if retry.status_code == 200 or time.time() > deadline:
                break
            time.sleep(2)
        assert retry.status_code == 200, retry.text
        uris = [i["uri"] for i in retry.json()["images"]]
        assert sorted(uris) == _stored(root) and len(uris) == 6
        assert _replica_actor_names("kill") and name not in _replica_actor_names("kill")
    finally:
        serve.delete("kill")


def test_batching_settings_are_applied_through_user_config(ray_cluster, synthesis, tmp_path):
    from ray import serve

    from spinml_ray.ray_layer.service import build_app

    root = str(tmp_path / "store")
    serve.run(build_app("tiny", storage_root=root, max_batch_size=4), name="reconf", route_prefix="/reconf")
    handle = serve.get_deployment_handle("DiffusionDeployment", app_name="reconf")
    try:
        assert handle.info.remote().result()["batching"]["max_batch_size"] == 4
        serve.run(build_app("tiny", storage_root=root, max_batch_size=16, batch_wait_timeout_s=0.2),
                  name="reconf", route_prefix="/reconf")
        info = handle.info.remote().result()
        assert info["batching"] == {"max_batch_size": 16, "batch_wait_timeout_s": 0.2}
    finally:
        serve.delete("reconf")


def test_a_requests_adapter_is_applied_to_its_own_images_only(synthesis, lora_adapter):
    """Through Serve: items with and without an adapter, in flight together, batched on one replica."""
    from spinml_ray.ray_layer.service import submit
    from spinml_ray.synthesis.workitems import WorkItem

    common = dict(request_id="r", tenant="t", label="a", pool="p", prompt="A photo of a duck", seed=7,
                  resolution=32, steps=2, guidance=5.0)
    baseline = submit(synthesis, WorkItem(image_id="base", **common)).result().image
    responses = [submit(synthesis, WorkItem(image_id=f"x{i}", adapter=lora_adapter if i % 2 else None, **common))
                 for i in range(6)]
    images = [r.result().image for r in responses]
    assert all(image == baseline for image in images[0::2])  # other requests' images: untouched
    assert all(image != baseline for image in images[1::2])  # this request's images: personalised
    assert lora_adapter in synthesis.info.remote().result()["adapters"]


def test_images_whose_replica_is_killed_mid_batch_are_sent_again_and_all_arrive(ray_cluster, synthesis, tmp_path):
    """The synthesize stage's calls survive the loss of the replica they went to (as with its node):
    `ray_layer.synthesize.generate` sends them again once Serve has started a new replica."""
    from ray import serve

    from spinml_ray.ray_layer.synthesize import generate
    from spinml_ray.synthesis.workitems import WorkItem

    _deploy("resend", str(tmp_path / "store"))
    handle = serve.get_deployment_handle("DiffusionDeployment", app_name="resend")
    items = [WorkItem(image_id=f"i{n}", request_id="resend", tenant="demo", label="a", pool="L0_L0",
                      prompt="a duck", seed=n, resolution=64, steps=300, guidance=5.0) for n in range(4)]
    outcome: dict = {}
    caller = threading.Thread(target=lambda: outcome.update(result=generate(handle, items)))
    try:
        name = _kill_replica_mid_batch("resend", caller)
        caller.join(timeout=600)
        assert not caller.is_alive()
        images, resent = outcome["result"]
        assert resent >= 1  # the killed batch's images were sent again ...
        assert [type(image).__name__ for image in images] == ["GeneratedImage"] * 4  # ... and every one arrived
        assert [image.image_id for image in images] == ["i0", "i1", "i2", "i3"]
        assert decode_png(images[0].image).shape == (64, 64, 3)
        assert name not in _replica_actor_names("resend")
    finally:
        serve.delete("resend")
