"""`ray job submit` of jobs/run_request.py against a cluster started by `ray start --head` (loopback)."""

import json
import os
import secrets
import signal
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import REPO, free_port
from spinml_ray import storage
from spinml_ray.examples import write_example

pytestmark = pytest.mark.cluster
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def head_node():
    """`ray start --head --block` in its own process group; SIGTERM lets it stop what it started."""
    port, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # this cluster's own token
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(
        [f"{BIN}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
         "--num-cpus=4", "--disable-usage-stats", f"--temp-dir={temp_dir}",
         # Own agent and metrics ports: the session's other local Ray may hold the defaults.
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
         f"--ray-client-server-port={free_port()}"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    while time.time() < deadline:
        probe = subprocess.run([f"{BIN}/ray", "job", "list", "--address", address], env=env,
                               capture_output=True, timeout=120)
        if probe.returncode == 0:
            break
        assert process.poll() is None, "ray start --head exited early"
        time.sleep(2)
    else:
        pytest.fail("the dashboard's job API did not come up")
    yield address, env
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)


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
