"""`ray job submit` of jobs/run_request.py against a head started by cluster/start-local.sh (loopback), which\ncluster/stop-local.sh stops without touching other Ray processes."""

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile

import pytest

from conftest import REPO, free_port
from spinml_ray import storage
from spinml_ray.examples import write_example

pytestmark = pytest.mark.cluster
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def head_node(ray_cluster):
    """A head started by cluster/start-local.sh (as `make demo` starts one), beside the test session's own
    local Ray; cluster/stop-local.sh must stop that head's processes and leave the session's Ray alone."""
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_BIN": f"{BIN}/ray", "RAY_PORT": str(port),
           "RAY_DASHBOARD_PORT": str(dashboard), "RAY_NUM_CPUS": "4",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # this cluster's own token
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(
        ["bash", os.path.join(REPO, "cluster", "start-local.sh"), f"--temp-dir={temp_dir}",
         # Own agent and metrics ports: the session's other local Ray may hold the defaults.
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=env, capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    with open(os.path.join(REPO, ".ray-local", f"head-{port}.pid")) as handle:
        group = int(handle.read())
    yield f"http://127.0.0.1:{dashboard}", env
    stopped = subprocess.run(["bash", os.path.join(REPO, "cluster", "stop-local.sh")], env=env,
                             capture_output=True, text=True, timeout=300)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    with pytest.raises(ProcessLookupError):  # every process of that head is gone ...
        os.killpg(group, 0)

    @ray_cluster.remote
    def alive() -> str:
        return "alive"

    assert ray_cluster.get(alive.remote(), timeout=120) == "alive"  # ... and the session's Ray still works


def test_ray_job_submit_runs_the_example_request(tmp_path, head_node):
    address, env = head_node
    request = write_example(str(tmp_path / "request"))
    out = str(tmp_path / "out")
    excludes = json.dumps({"excludes": [".venv", ".git", "spinml-data", "*.egg-info", ".pytest_cache", ".hypothesis"]})
    result = subprocess.run(
        [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", REPO, "--runtime-env-json", excludes,
         "--", "python", "jobs/run_request.py", request, "--storage", out],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in result.stdout + result.stderr
    for line in ("demo/example-duck synthesize: done (16/16 images)", "demo/example-duck train: done (2/2 epochs)"):
        assert line in result.stdout + result.stderr  # progress in the job's log, the workers' epochs included
    base = os.path.join(out, "demo", "example-duck")
    assert storage.read_manifest(os.path.join(base, "synthetic"))["images"] == 16
    metrics = storage.read_json(os.path.join(base, "model", "metrics.json"))
    assert metrics["evaluated_on"] == "real test set" and metrics["n"] == 8


def test_job_with_an_invalid_request_fails_with_a_clear_message(tmp_path, head_node):
    address, env = head_node
    request = tmp_path / "bad.yaml"
    request.write_text("request_id: x\ntenant: t\nsubject: duck\nlabels: [{name: a, phrase: a}]\nreferences: []\n")
    result = subprocess.run(
        [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", str(tmp_path),
         "--", "python", os.path.join(REPO, "jobs", "run_request.py"), str(request), "--storage", str(tmp_path / "o")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "spinml: error:" in output and "labels" in output and "at least 2" in output
    assert "Traceback" not in output
