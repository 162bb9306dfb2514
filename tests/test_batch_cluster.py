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
    from spinml_ray.batch import format_summary, list_requests, run_batch

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
    assert {p: os.path.getmtime(p) for p in committed} == committed  # nothing generated or trained twice
    table = format_summary(again)
    assert "good-l1" in table and "failed" in table
