"""The platform's metrics on a live cluster: a small batch moves the counters on the node's Prometheus
endpoint by what it did, labels carry no request content."""

import os
import threading
import time
from collections import defaultdict

import pytest
import yaml

from spinml_ray.examples import write_example

pytestmark = pytest.mark.cluster

LABELS = ("stage", "state", "kind", "status", "event", "reason", "level", "object", "le", "tenant")


def _scrape() -> dict:
    """{(sample name, labels): value} of spinml's samples on every live node, summed over Ray's own labels
    (worker, component, session)."""
    import ray
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    values: dict = defaultdict(float)
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        text = requests.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("ray_spinml_"):
                    labels = frozenset((k, v) for k, v in sample.labels.items() if k in LABELS)
                    values[(sample.name, labels)] += sample.value
    return values


def _settled_scrape(quiet_s: float = 12, bound_s: float = 120) -> dict:
    """A scrape once no spinml sample has changed for `quiet_s` (longer than Ray's 10 s report
    interval), so that what earlier tests recorded has all arrived before this one counts."""
    deadline = time.time() + bound_s
    last, since = _scrape(), time.time()
    while time.time() - since < quiet_s:
        assert time.time() < deadline, "spinml's metrics never settled"
        time.sleep(1)
        now = _scrape()
        if now != last:
            last, since = now, time.time()
    return last


def _delta(after: dict, before: dict, name: str, **labels) -> float:
    """How much the samples called `name` whose labels include `labels` grew, summed."""
    wanted = set(labels.items())
    return sum(value - before.get(key, 0.0) for key, value in after.items() if key[0] == name and wanted <= key[1])


def test_a_batch_moves_the_counters_by_what_it_did(tmp_path, synthesis, http_port):
    from spinml_ray.ray_layer.batch import run_batch

    example = str(tmp_path / "requests")
    write_example(example)
    (tmp_path / "requests" / "references" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    base = yaml.safe_load(open(os.path.join(example, "request.yaml")))
    requests = []
    for name, privacy, extra in (("plain", {"target": "L1", "background": "L0"}, []),
                                 ("with-broken", {"target": "L0", "background": "L1"},
                                  [{"uri": "references/broken.png", "mask_uri": "masks/resting-0.png"}])):
        request = {**base, "request_id": name, "privacy": privacy, "references": base["references"] + extra,
                   "synthesis": {**base["synthesis"], "images_per_label": 2}, "training": {**base["training"], "epochs": 1}}
        path = os.path.join(example, f"{name}.yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(request, handle)
        requests.append(path)
    before = _settled_scrape()
    seen: set[str] = set()  # a gauge is exported while it is being set: look for them during the batch
    stop = threading.Event()

    def watch():
        while not stop.wait(1):
            seen.update(key[0] for key in _scrape())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        summary = run_batch(requests, str(tmp_path / "out"), max_concurrent=2, name="metrics", http_port=http_port)
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert [row["state"] for row in summary] == ["done", "done"], summary

    expected = {  # (sample, labels): growth
        ("ray_spinml_requests_total", (("stage", "sanitize"), ("state", "running"))): 2,
        ("ray_spinml_requests_total", (("stage", "sanitize"), ("state", "done"))): 2,
        ("ray_spinml_requests_total", (("stage", "synthesize"), ("state", "done"))): 2,
        ("ray_spinml_requests_total", (("stage", "train"), ("state", "done"))): 2,
        ("ray_spinml_requests_total", (("state", "failed"),)): 0,
        ("ray_spinml_stage_seconds_count", (("stage", "train"),)): 2,
        ("ray_spinml_images_generated_total", ()): 8,  # 2 labels x 2 images, 2 requests
        ("ray_spinml_references_rejected_total", (("reason", "unreadable"),)): 1,
        ("ray_spinml_released_mi_count", (("level", "L1"), ("object", "target"))): 4,
        ("ray_spinml_released_mi_count", (("level", "L1"), ("object", "background"))): 4,
    }
    deadline = time.time() + 120  # each process reports to its node's agent every few seconds
    while True:
        after = _scrape()
        grown = {key: _delta(after, before, key[0], **dict(key[1])) for key in expected}
        if grown == expected or time.time() > deadline:
            break
        time.sleep(1)
    assert grown == expected
    assert _delta(after, before, "ray_spinml_diffusion_batch_size_count") >= 1
    gauges = {"ray_spinml_fleet_slots", "ray_spinml_fleet_jobs_waiting", "ray_spinml_diffusion_queue_depth"}
    assert gauges <= seen, sorted(seen)  # the job board's and the replica's gauges were there
    kinds = {dict(key[1]).get("kind") for key in after if key[0] == "ray_spinml_images_generated_total"}
    assert "controlnet" in kinds  # the L1 request's images, labelled by pipeline
    content = {"plain", "with-broken", "demo", "yellow rubber duck", "broken.png"}
    for _, labels in after:  # no request id, tenant, prompt or file name in any label
        assert not {value for _, value in labels} & content
