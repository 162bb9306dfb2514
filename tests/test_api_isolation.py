"""The synthesis API attacked as a tenant would attack it, over HTTP on 127.0.0.1 (bounded in count).

Two tenants' data are planted (another tenant's committed bundle and LoRA adapter, and a bundle above
the storage root). Generated hostile strings in every caller-named field must get a 4xx (never a 500),
never reach the planted data, and never make the service write outside the caller's prefix; error
bodies carry no traceback, path or process id; tokens appear in no log and no job table."""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil

import pyarrow as pa
import pytest
import requests
from conftest import CANARY_TOKEN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_confinement import hostile_uris

from spinml_ray import storage
from spinml_ray.bundle import SANITIZED_SCHEMA
from spinml_ray.synthesis.engine import LORA_WEIGHTS

pytestmark = pytest.mark.cluster
AUTH = {"Authorization": "Bearer demo-token"}
HTTP = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
LEAKS = ("Traceback", 'File "', "pid=", "actor_id", "ActorID", "ray::", "site-packages", "/tmp/", "/root")


def _commit_bundle(directory: str) -> None:
    row = {"ref_id": "ref-0000", "label": None, "object": "target", "level": "L0", "width": None, "height": None,
           "payload": None, "region": None, "payload_sha256": None, "faces_blurred": 0, "mi": 0.0}
    part = storage.part_uri(directory)
    storage.write_table(part, pa.Table.from_pylist([row, {**row, "object": "background"}], schema=SANITIZED_SCHEMA))
    storage.commit(directory, [part])


@pytest.fixture(scope="module")
def planted(synthesis, synthesis_storage, lora_adapter):
    """Another tenant's bundle and adapter, a bundle above the root, and a corrupt adapter of demo's own."""
    root = synthesis_storage
    _commit_bundle(os.path.join(root, "other", "r", "sanitized"))
    _commit_bundle(os.path.join(os.path.dirname(root), "outside", "sanitized"))
    shutil.copytree(lora_adapter, os.path.join(root, "other", "r", "adapters"))
    broken = os.path.join(root, "demo", "broken", "adapters")
    os.makedirs(broken)
    with open(os.path.join(broken, LORA_WEIGHTS), "wb") as handle:
        handle.write(b"not a safetensors file")
    return root


def _body(**fields) -> dict:
    body = {"request_id": "iso", "tenant": "demo", "subject": "duck", "label": {"name": "a", "phrase": "a"},
            "privacy": {"target": "L0", "background": "L0"},
            "synthesis": {"images_per_label": 1, "resolution": 32, "steps": 1, "seed": 0}}
    return {**body, **fields}


def _post(url: str, body, headers=AUTH, raw: bytes | None = None) -> requests.Response:
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(f"{url}/v1/generate", data=data, timeout=120,
                         headers={**headers, "Content-Type": "application/json"})


def _clean(response: requests.Response, root: str) -> None:
    text = response.text
    assert not any(leak in text for leak in LEAKS) and root not in text, text
    assert isinstance(response.json()["detail"], (str, list))


def _files(top: str) -> set[str]:
    """Every file under `top`, by its real path (links are not followed: pytest keeps `*current` ones)."""
    return {os.path.realpath(os.path.join(folder, name)) for folder, _, names in os.walk(top) for name in names}


@pytest.fixture(scope="module")
def url(http_port):
    return f"http://127.0.0.1:{http_port}/spinml"


def test_hostile_bundle_and_adapter_uris_never_reach_another_tenant(url, planted):
    top = os.path.dirname(planted)
    before = _files(top)

    @HTTP
    @given(field=st.sampled_from(["bundle", "adapter"]), uri=hostile_uris())
    def attack(field, uri):
        uri = uri.replace("{root}", os.path.join(planted, "demo")).replace("{parent}", planted)
        response = _post(url, _body(**{field: uri}))
        # Nothing of demo's own is planted at these places, so a 200 means the call read someone else's.
        assert response.status_code in (403, 404, 422), (uri, response.status_code, response.text)
        _clean(response, planted)

    attack()
    assert _files(top) == before  # refused calls write nothing anywhere


def test_hostile_names_are_refused_and_writes_stay_in_the_prefix(url, planted):
    top = os.path.dirname(planted)
    before = _files(top)
    names = (st.text(max_size=40) | hostile_uris() | st.from_regex(storage.IDENTIFIER, fullmatch=True)
             | st.sampled_from(["..", ".", "a/../../x", "a\x00b", "-x", "x" * 200]))

    @HTTP
    @given(field=st.sampled_from(["request_id", "label", "tenant"]), name=names)
    def attack(field, name):
        body = _body(label={"name": name, "phrase": "a"}) if field == "label" else _body(**{field: name})
        response = _post(url, body)
        assert response.status_code in (200, 403, 422), (name, response.status_code, response.text)
        if response.status_code != 200:
            _clean(response, planted)

    attack()
    new = _files(top) - before
    own = os.path.realpath(os.path.join(planted, "demo")) + os.sep
    assert new and all(path.startswith(own) for path in new), sorted(new)[:5]


def test_error_paths_are_4xx_with_clean_bodies(url, planted):
    # Auth comes first: a caller without a valid token learns nothing about the schema.
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic demo-token"}):
        response = _post(url, None, headers=headers, raw=b'{"not": "a request"}')
        assert response.status_code == 401, response.text
    nonfinite = [json.dumps(_body(**{key: {**_body()[key], field: 0.5}})).replace("0.5", value).encode()
                 for key, field, value in (("synthesis", "guidance", "NaN"), ("synthesis", "strength", "Infinity"),
                                           ("privacy", "alpha", "-Infinity"))]
    for raw in (b'{"guidance": NaN}', b"not json", b"[]", *nonfinite):
        response = _post(url, None, raw=raw)
        assert response.status_code == 422, (raw, response.text)
        _clean(response, planted)
    response = _post(url, None, raw=b"x" * (2 << 20))
    assert response.status_code == 413
    too_many = _body(synthesis={"images_per_label": 100_000, "resolution": 32, "steps": 1})
    response = _post(url, too_many)
    assert response.status_code == 413 and "256" in response.json()["detail"]
    for relative in ("r/adapters", "broken", "iso"):  # inside demo's prefix, but no adapter there
        response = _post(url, _body(adapter=relative))
        assert response.status_code == 404, response.text
        _clean(response, planted)
    response = _post(url, _body(bundle="broken/adapters"))
    assert response.status_code == 404
    _clean(response, planted)


def test_a_failing_generation_is_a_500_without_trace(url, planted):
    """A corrupt adapter inside the caller's prefix fails on the replica: the answer names the images,
    not the replica's traceback, actor or paths; the next call is served."""
    _commit_bundle(os.path.join(planted, "demo", "broken", "sanitized"))
    body = _body(adapter="broken/adapters", bundle="broken/sanitized", token="sks", request_id="broken",
                 privacy={"target": "L2", "background": "L0", "alpha": 0.0})
    response = _post(url, body)
    assert response.status_code == 500 and "generation failed for 1 of 1 images" in response.json()["detail"]
    _clean(response, planted)
    assert _post(url, _body(request_id="after-failure")).status_code == 200


def _streamed(url: str, body: dict, **params) -> tuple[requests.Response, list[dict]]:
    with requests.post(f"{url}/v1/generate", params={"stream": "true", **params}, json=body, headers=AUTH,
                       stream=True, timeout=120) as response:
        lines = [json.loads(line) for line in response.iter_lines() if line] if response.ok else []
        return response, lines


def test_a_streamed_call_sends_a_line_per_stored_image_then_the_counts(url, planted):
    body = _body(request_id="streamed", synthesis={"images_per_label": 3, "resolution": 32, "steps": 1, "seed": 0})
    response, lines = _streamed(url, body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    *images, last = lines
    assert last == {"done": True, "images": 3, "failed": 0}
    plain = _post(url, {**body, "request_id": "not-streamed"}).json()["images"]  # the same images, one answer
    assert sorted(i["image_id"] for i in images) == sorted(i["image_id"] for i in plain)
    for image in images:
        assert set(image) == {"image_id", "uri", "seed", "prompt", "pool"}
        assert os.path.realpath(image["uri"]).startswith(os.path.realpath(os.path.join(planted, "demo", "streamed")))
        assert storage.exists(image["uri"])
    # The checks before any image still answer with their status and a problem body, not a stream.
    assert _streamed(url, {**body, "tenant": "other"})[0].status_code == 403
    too_many = {**body, "synthesis": {**body["synthesis"], "images_per_label": 100_000}}
    assert _streamed(url, too_many)[0].status_code == 413  # valid (at most 100,000 a label), never admitted


def test_a_streamed_image_that_fails_is_a_line_without_trace(url, planted):
    body = _body(adapter="broken/adapters", bundle="broken/sanitized", token="sks", request_id="broken-streamed",
                 privacy={"target": "L2", "background": "L0", "alpha": 0.0})
    _commit_bundle(os.path.join(planted, "demo", "broken", "sanitized"))
    response, lines = _streamed(url, body)
    assert response.status_code == 200
    *images, last = lines
    assert last == {"done": True, "images": 0, "failed": 1}
    assert [set(line) for line in images] == [{"image_id", "error"}]
    text = json.dumps(lines)
    assert not any(leak in text for leak in LEAKS) and planted not in text


def test_tokens_prompts_and_images_appear_in_no_log_and_no_job_table(ray_cluster, url, planted):
    """Ray's session folder (every process's log) holds no token, no tenant's prompt words and no image."""
    from ray.util.state import list_jobs

    subject = "canary" + secrets.token_hex(8)  # a word only this tenant's prompt carries
    ok = _post(url, _body(tenant="canary", subject=subject, label={"name": "a", "phrase": "in a canary room"}),
               headers={"Authorization": f"Bearer {CANARY_TOKEN}"})
    assert ok.status_code == 200, ok.text
    assert _post(url, _body(), headers={"Authorization": f"Bearer {CANARY_TOKEN}x"}).status_code == 401
    assert CANARY_TOKEN not in json.dumps([job.__dict__ for job in list_jobs()], default=str)
    node = ray_cluster._private.worker._global_node
    session = node.get_session_dir_path()
    found = []
    for path in glob.glob(os.path.join(session, "**"), recursive=True):
        if os.path.isfile(path) and not path.endswith((".sock", ".lock")):
            try:
                with open(path, "rb") as handle:
                    text = handle.read()
            except OSError:
                continue
            found += [(path, what) for what, needle in (("token", CANARY_TOKEN.encode()), ("prompt", subject.encode()))
                      if needle in text]
            if path.endswith((".log", ".out", ".err")) and b"\x89PNG\r\n\x1a\n" in text:
                found.append((path, "image bytes"))
    assert not found, found
