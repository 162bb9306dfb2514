"""The training fleet on the local Ray cluster: one long-lived slot trains several requests in turn;
a killed worker's request resumes, an out-of-memory request fails alone, the others deliver."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from spinml_ray import storage
from spinml_ray.errors import StageError
from spinml_ray.examples import write_example
from spinml_ray.training.job import RunOptions, TrainingJob

pytestmark = pytest.mark.cluster


def test_one_slot_trains_requests_in_turn_and_isolates_their_failures(tmp_path, synthesis, http_port):
    from spinml_ray.ray_layer.fleet import TrainingFleet
    from spinml_ray.ray_layer.pipeline import request_paths, run_request
    from spinml_ray.ray_layer.train import run_train
    from spinml_ray.spec import load_request

    folder = tmp_path / "request"
    document = yaml.safe_load(open(write_example(str(folder))))
    document["synthesis"]["images_per_label"] = 2
    document["training"]["epochs"] = 3
    root = str(tmp_path / "out")
    jobs = []
    for request_id in ("plain", "killed", "too-big"):
        path = folder / f"{request_id}.yaml"
        path.write_text(yaml.safe_dump({**document, "request_id": request_id}))
        run_request(str(path), root, stages=("sanitize", "synthesize"), http_port=http_port, keep_serving=True)
        spec = load_request(str(path))
        jobs.append((spec, request_paths(spec, root)))

    runs = str(tmp_path / "fleet-runs")
    fleet = TrainingFleet(1, cpus_per_slot=1, runs_uri=runs, idle_s=30)
    faults = {"killed": (1, "kill"), "too-big": (0, "oom")}

    def train(job):
        spec, paths = job
        at, kind = faults.get(spec.request_id, (None, "kill"))
        try:
            return run_train(spec, paths, fleet=fleet, fault_injection_epoch=at, fault_kind=kind)
        except StageError as exc:
            return exc

    try:
        with ThreadPoolExecutor(3) as pool:
            plain, killed, too_big = pool.map(train, jobs)
    finally:
        fleet.close()
    assert isinstance(plain, dict) and plain["resumed_from_epoch"] == 0 and plain["n"] == 8
    assert isinstance(killed, dict) and killed["resumed_from_epoch"] == 1  # epoch 0's state survived the kill
    assert isinstance(too_big, StageError) and "too-big" in str(too_big) and "ran out of memory" in str(too_big)
    for (spec, paths), delivered in zip(jobs, (True, True, False)):
        assert (storage.read_manifest(paths.model) is not None) == delivered, spec.request_id
        assert not storage.exists(os.path.join(paths.train_runs, "_resume", "train_state.pt")) or not delivered
    assert fleet.starts == 1  # one slot, started once: the kill was a restart within its run
    assert os.listdir(runs) == []  # and its run's folder went with it
    assert not fleet.live  # closed: the slot has left


def test_an_expected_job_keeps_its_slot_until_synthesis_ends(ray_cluster, tmp_path):
    import time

    import ray

    from spinml_ray.ray_layer.fleet import TrainingFleet

    fleet = TrainingFleet(1, cpus_per_slot=1, runs_uri=str(tmp_path / "runs"), idle_s=2)
    try:
        fleet.expect("t/r")  # the request is being synthesized: its slot starts now
        deadline = time.time() + 120
        while ray.get(fleet.board.started_count.remote()) < 1:
            assert time.time() < deadline, "the expected job's slot did not start"
            time.sleep(0.2)
        while ray.get(fleet.board.kept_idle_count.remote()) < 2:  # two idle periods with nothing to train ...
            assert time.time() < deadline, "the slot's idle periods did not pass"
            time.sleep(0.2)
        assert fleet.live  # ... and the slot stays, because a job is expected
        fleet.forget("t/r")  # synthesis failed: the job never comes
        deadline = time.time() + 60
        while fleet.live:
            assert time.time() < deadline, "the slot did not leave once nothing was expected"
            time.sleep(0.2)
    finally:
        fleet.close()


def test_idle_slots_leave_while_room_is_made_and_jobs_still_train(ray_cluster, tmp_path):
    """A request's personalization needs the resources idle slots hold: while room is made, an idle
    slot leaves although a job is expected, `expect` starts no slot, and a job put meanwhile still
    gets one (here a job with no data: its error comes back from the slot)."""
    import time

    import ray

    from spinml_ray.ray_layer.fleet import TrainingFleet

    fleet = TrainingFleet(1, cpus_per_slot=1, runs_uri=str(tmp_path / "runs"), idle_s=60)

    def wait_until(condition, what):
        deadline = time.time() + 120
        while not condition():
            assert time.time() < deadline, what
            time.sleep(0.2)

    try:
        fleet.expect("t/a")
        wait_until(lambda: ray.get(fleet.board.started_count.remote()) == 1, "the expected job's slot did not start")
        with fleet.making_room():
            wait_until(lambda: not fleet.live, "the idle slot did not leave to make room")  # long before idle_s
            fleet.expect("t/b")
            assert not fleet.live and fleet.starts == 1
            with pytest.raises(RuntimeError):  # the slot's error for this job, so a slot ran it
                fleet.train("t/c", TrainingJob(
                    task="classification", synthetic=str(tmp_path / "missing" / "synthetic"), model="tiny",
                    architecture="resnet18", pretrained="none", num_classes=2, image_size=32, batch_size=4,
                    learning_rate=1e-3, epochs=1, seed=0,
                    run=RunOptions(state_uri=str(tmp_path / "state.pt"), best_uri=str(tmp_path / "best.pt"))))
            wait_until(lambda: not fleet.live, "the slot did not leave after its job")
        assert fleet.starts == 2
    finally:
        fleet.close()


def test_the_local_cluster_serves_the_state_api_and_listens_on_loopback_only(ray_cluster):
    """Ray Train's placement-group cleaner asks Ray's state API whether a trainer's controller still
    lives: the embedded cluster serves it (through its dashboard), and the ports it opens are on loopback."""
    import psutil
    from ray.util.state import list_actors

    from spinml_ray.ray_layer.fleet import JobBoard

    board = JobBoard.remote()
    ray_cluster.get(board.pending_count.remote())
    assert list_actors(filters=[("class_name", "=", "JobBoard"), ("state", "=", "ALIVE")])
    commands, listening = [], set()
    for process in psutil.Process().children(recursive=True):  # Ray's processes (some come and go meanwhile)
        try:
            commands.append(" ".join(process.cmdline()))
            listening |= {(process.name(), c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    assert any("dashboard" in command for command in commands)
    # Ray Serve 2.60's replicas open their inter-deployment gRPC server on "[::]:0", not configurable;
    # the calls still go to the node's address, 127.0.0.1. Everything else must listen on loopback.
    serve_grpc = {entry for entry in listening if entry[0].startswith("ray::ServeReplica") and entry[1] == "::"}
    assert listening - serve_grpc and not [entry for entry in listening - serve_grpc if not _loopback(entry[1])]


def _loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)
