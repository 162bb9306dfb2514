"""Many requests in one job: good ones finish, bad ones say why, a re-run repeats nothing."""

import os

import pytest
import yaml

from spinml_ray import storage
from spinml_ray.examples import write_example

pytestmark = pytest.mark.cluster


def _variant(example_dir, name, **changes):
    request = yaml.safe_load(open(os.path.join(example_dir, "request.yaml")))
    request.update(request_id=name, **changes)
    path = os.path.join(example_dir, f"{name}.yaml")
    with open(path, "w") as handle:
        yaml.safe_dump(request, handle)
    return path


def test_a_manifest_of_mixed_requests_and_its_rerun(tmp_path, synthesis, http_port):
    from spinml_ray.ray_layer.batch import format_summary, list_requests, run_batch

    example = str(tmp_path / "requests")
    write_example(example)
    (tmp_path / "requests" / "references" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    base = yaml.safe_load(open(os.path.join(example, "request.yaml")))
    fast = {"synthesis": {**base["synthesis"], "images_per_label": 2}, "training": {**base["training"], "epochs": 1}}
    good = _variant(example, "good-l1", **fast)
    with_broken = _variant(example, "with-broken", privacy={"target": "L0", "background": "L1"},
                           references=base["references"] + [{"uri": "references/broken.png", "mask_uri": "masks/resting-0.png"}],
                           **fast)
    impossible = _variant(example, "impossible", **fast)
    with open(impossible) as handle:
        document = yaml.safe_load(handle)
    document["synthesis"]["resolution"] = 30  # not a multiple of 8
    with open(impossible, "w") as handle:
        yaml.safe_dump(document, handle)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"requests": ["requests/good-l1.yaml", "requests/with-broken.yaml",
                                                     "requests/impossible.yaml"]}))
    requests = list_requests(str(manifest))
    assert requests == [good, with_broken, impossible]
    root = str(tmp_path / "out")

    summary = run_batch(requests, root, max_concurrent=2, name="first", http_port=http_port)
    states = {row["request"]: row for row in summary}
    assert states[good]["state"] == "done" and states[with_broken]["state"] == "done", summary
    assert states[impossible]["state"] == "failed" and "resolution" in states[impossible]["error"]
    rejections = storage.read_table(os.path.join(root, "demo", "with-broken", "sanitized", "rejections.parquet"))
    assert rejections.column("uri").to_pylist() == [os.path.join(example, "references", "broken.png")]
    targets = {"good-l1": "L1", "with-broken": "L0"}
    for name, target in targets.items():
        status = storage.read_json(os.path.join(root, "demo", name, "status.json"))
        assert status["state"] == "done" and status["stages"]["train"]["state"] == "done"
        assert status["stages"]["personalize"]["state"] == f"skipped (target released at {target}, not L2)"
        assert storage.read_json(os.path.join(root, "demo", name, "model", "metrics.json"))["n"] == 8
    assert storage.read_json(os.path.join(root, "_batches", "first.json"))[0]["request"] == good
    committed = {p: os.path.getmtime(p) for p in storage.list_files(root, recursive=True) if p.endswith("_SUCCESS.json")}

    again = run_batch(requests, root, max_concurrent=2, name="second", http_port=http_port)  # all skipped
    for row, target in zip(again[:2], targets.values()):
        assert row["state"] == "done"
        assert {stage: info["state"] for stage, info in row["stages"].items()} == {
            "sanitize": "done (already complete)", "personalize": f"skipped (target released at {target}, not L2)",
            "synthesize": "done (already complete)", "train": "done (already complete)"}
        first = states[row["request"]]["stages"]  # the re-run still says what each stage took the first time
        assert all(row["stages"][stage]["seconds"] == first[stage]["seconds"] > 0
                   for stage in ("sanitize", "synthesize", "train")), (row, first)
        assert "seconds" not in row["stages"]["personalize"]
    assert {p: os.path.getmtime(p) for p in committed} == committed  # nothing generated or trained twice
    table = format_summary(again)
    assert "good-l1" in table and "failed" in table


def test_a_lost_job_board_fails_only_training_and_the_driver_still_writes_true_statuses(
        tmp_path, synthesis, http_port, monkeypatch):
    """The fleet's job board dies mid-job (as with the node holding it): the requests' other stages
    finish, training fails with a reason that says what was lost, the driver writes its summary and
    every status.json as it is, the slots leave, and a re-run trains what is missing."""
    import threading
    import time

    import ray

    import spinml_ray.ray_layer.batch as batch_module
    from spinml_ray.ray_layer.batch import run_batch

    fleets = []
    make_fleet = batch_module.training_fleet
    monkeypatch.setattr(batch_module, "training_fleet", lambda *a, **k: fleets.append(make_fleet(*a, **k)) or fleets[-1])
    example = str(tmp_path / "requests")
    write_example(example)
    base = yaml.safe_load(open(os.path.join(example, "request.yaml")))
    fast = {"synthesis": {**base["synthesis"], "images_per_label": 2}, "training": {**base["training"], "epochs": 1}}
    requests = [_variant(example, name, **fast) for name in ("first", "second")]
    root = str(tmp_path / "out")
    outcome: dict = {}
    batch = threading.Thread(target=lambda: outcome.update(
        summary=run_batch(requests, root, max_concurrent=2, name="lost", http_port=http_port)))
    batch.start()
    deadline = time.time() + 300
    while not fleets or ray.get(fleets[0].board.started_count.remote()) < 1:  # a slot asks the board for work
        assert time.time() < deadline and batch.is_alive(), "no training slot started"
        time.sleep(0.2)
    ray.kill(fleets[0].board)
    batch.join(timeout=600)
    assert not batch.is_alive(), "the driver did not finish after losing the job board"
    summary = outcome["summary"]
    assert storage.read_json(os.path.join(root, "_batches", "lost.json")) == summary
    for row in summary:
        assert row["state"] == "failed" and "job board was lost" in row["error"], row
        assert row["stages"]["synthesize"]["state"] == "done" and row["stages"]["train"]["state"] == "failed"
        assert storage.read_json(os.path.join(root, "demo", row["request_id"], "status.json")) == row
    assert not fleets[0].live  # its slots left instead of waiting on a board that is gone

    again = run_batch(requests, root, max_concurrent=2, name="again", http_port=http_port)
    for row in again:
        assert row["state"] == "done", row
        assert row["stages"]["synthesize"]["state"] == "done (already complete)"
        assert row["stages"]["train"]["state"] == "done"
