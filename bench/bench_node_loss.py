"""Node loss during a batch job: what a killed worker node costs, and that nothing is lost or duplicated.

Each scenario starts its own local multi-node cluster on 127.0.0.1 (Ray's `cluster_utils.Cluster`: a
head with no CPUs, where the driver and the fleet's job board live, and two worker nodes), runs a
batch of small requests (`--requests`, one of them with an L2 target so that personalization runs),
and while the chosen stage runs kills the worker node that hosts that stage's work (its Ray Data
sanitize actors, the synthesis replica, or a Ray Train worker), without a graceful shutdown. With
`--replace` a fresh worker node joins right after the kill. Requests that failed are then re-run as
one more batch job, as an operator would. The baseline is the same batch with no kill, in the same run.

Checked per scenario: every request ends `done` (after the re-run), each stage's output is committed
once, the synthetic table holds exactly the planned images with no image twice, and the model's
metrics are there. Reported: the batch's seconds, the re-run's, and the time lost against the baseline.

    .venv/bin/python bench/bench_node_loss.py [--stages sanitize,personalize,synthesize,train] [--replace]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import yaml  # noqa: E402

from spinml_ray.ray_layer.pipeline import STAGE_NAMES as STAGES  # noqa: E402

# The actors doing each stage's work: the worker node holding one of them is the one killed.
STAGE_ACTORS = {"sanitize": "SanitizeWorker", "personalize": "RayTrainWorker",
                "synthesize": "DiffusionDeployment", "train": "RayTrainWorker"}
WORKER_CPUS = 3
IMAGES_PER_LABEL = 4


def write_requests(folder: str, count: int) -> list[str]:
    from spinml_ray.examples import write_example

    base = yaml.safe_load(open(write_example(folder)))
    paths = []
    for i in range(count):
        request = {**base, "request_id": f"r{i}",
                   "synthesis": {**base["synthesis"], "images_per_label": IMAGES_PER_LABEL},
                   "training": {**base["training"], "epochs": 3}}
        if i == 0:  # an L2 target: personalization runs for this one
            request["privacy"] = {"target": "L2", "background": "L0", "alpha": 0.25}
            request["personalization"] = {"steps": 30, "checkpoint_every": 10, "prior_preservation": False}
        path = os.path.join(folder, f"r{i}.yaml")
        with open(path, "w") as handle:
            yaml.safe_dump(request, handle)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def statuses(root: str) -> dict[str, dict]:
    found = {}
    for path in glob.glob(os.path.join(root, "*", "*", "status.json")):
        try:
            found[path.split(os.sep)[-2]] = json.load(open(path))
        except (OSError, ValueError):  # being rewritten
            pass
    return found


def check_outputs(root: str, requests: list[str]) -> list[str]:
    """What is wrong with the stored outputs (empty when every request is complete, once)."""
    from spinml_ray import storage
    from spinml_ray.ray_layer.pipeline import request_paths
    from spinml_ray.spec import load_request

    problems = []
    for uri in requests:
        spec = load_request(uri)
        paths = request_paths(spec, root)
        if storage.read_manifest(paths.model) is None or not storage.exists(storage.join(paths.model, "metrics.json")):
            problems.append(f"{spec.request_id}: no committed model")
            continue
        ids = storage.read_committed_table(paths.synthetic).column("image_id").to_pylist()
        planned = len(spec.labels) * spec.synthesis.images_per_label
        if len(ids) != planned or len(set(ids)) != len(ids):
            problems.append(f"{spec.request_id}: {len(ids)} synthetic rows ({len(set(ids))} distinct), {planned} planned")
        leftovers = [p for p in storage.list_files(paths.base, recursive=True) if ".tmp-" in p]
        if leftovers:
            problems.append(f"{spec.request_id}: partial files left: {leftovers[:3]}")
    return problems


def scenario(stage: str | None, replace: bool, count: int, work: str) -> dict:
    """One cluster, one batch (a worker node killed while `stage` runs, unless None), a re-run if needed."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from spinml_ray.ray_layer.batch import run_batch
    from spinml_ray.ray_layer.cluster import connect

    node_args = {"node_ip_address": "127.0.0.1", "num_cpus": WORKER_CPUS}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                            "include_dashboard": True, "dashboard_host": "127.0.0.1"})
    workers = [cluster.add_node(**node_args) for _ in range(2)]
    cluster.wait_for_nodes()
    connect(cluster.address)
    requests = write_requests(os.path.join(work, "requests"), count)
    root, port = os.path.join(work, "out"), free_port()
    result: dict = {"stage": stage or "none (baseline)", "replaced": replace and stage is not None}
    outcome: dict = {}
    started = time.time()
    batch = threading.Thread(target=lambda: outcome.update(
        summary=run_batch(requests, root, max_concurrent=count, name="first", http_port=port)))
    batch.start()
    if stage is not None:
        deadline = time.time() + 600
        while not any(s.get("stages", {}).get(stage, {}).get("state") == "running" for s in statuses(root).values()):
            if not batch.is_alive() or time.time() > deadline:
                raise RuntimeError(f"stage {stage} never ran: {statuses(root)}")
            time.sleep(0.5)
        by_id = {node.node_id: node for node in workers}
        target, actors = None, []
        while target is None and batch.is_alive() and time.time() < deadline:  # its actors may take a moment
            actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
            hosts = [a.node_id for a in actors
                     if STAGE_ACTORS[stage] in (a.class_name or "") + (a.name or "") and a.node_id in by_id]
            target = by_id[hosts[0]] if hosts else None
            time.sleep(0.2)
        if target is None:
            raise RuntimeError(f"no worker node held {STAGE_ACTORS[stage]} while {stage} ran")
        result["killed_at_s"] = round(time.time() - started, 1)
        result["killed_node_held"] = sorted({a.class_name for a in actors if a.node_id == target.node_id})
        cluster.remove_node(target, allow_graceful=False)
        if replace:
            cluster.add_node(**node_args)
    batch.join()
    result["batch_s"] = round(time.time() - started, 1)
    first = outcome["summary"]
    result["first_run"] = {row["request"].rsplit("/", 1)[-1]: row["state"] for row in first}
    result["errors"] = [row.get("error") for row in first if row.get("state") != "done"]
    result["retried"] = {f"{row.get('request_id')} {stage}": info["retried"] for row in first
                         for stage, info in row.get("stages", {}).items() if info.get("retried")}
    result["rerun_s"] = 0.0
    if any(row["state"] != "done" for row in first):
        again = time.time()
        second = run_batch(requests, root, max_concurrent=count, name="rerun", http_port=port)
        result["rerun_s"] = round(time.time() - again, 1)
        result["after_rerun"] = {row["request"].rsplit("/", 1)[-1]: row["state"] for row in second}
    result["problems"] = check_outputs(root, requests)
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--replace", action="store_true", help="a fresh worker node joins after each kill")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a scenario, in its own process
    args = parser.parse_args()
    if args.one is not None:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(scenario(None if args.one == "none" else args.one, args.replace, args.requests, work)))
        return 0
    stages = [s for s in args.stages.split(",") if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stage(s): {', '.join(sorted(unknown))}")
    rows = []
    for stage in ([] if args.no_baseline else ["none"]) + stages:  # one process per cluster
        command = [sys.executable, __file__, "--one", stage, "--requests", str(args.requests)]
        command += ["--replace"] if args.replace else []
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            rows.append({"stage": stage, "failed": done.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    baseline = next((r["batch_s"] for r in rows if r.get("stage") == "none (baseline)"), None)
    print("\n| node killed during | replacement | batch s | re-run s | lost s | first run | complete, no duplicates | "
          "the killed node held | what the status table says was retried |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "failed" in r:
            print(f"| {r['stage']} | | | | | scenario failed: {r['failed']} | |")
            continue
        lost = round(r["batch_s"] + r["rerun_s"] - baseline, 1) if baseline and r["stage"] != "none (baseline)" else ""
        states = ", ".join(f"{k}: {v}" for k, v in r["first_run"].items())
        print(f"| {r['stage']} | {'yes' if r['replaced'] else 'no'} | {r['batch_s']} | {r['rerun_s']} | {lost} | "
              f"{states} | {'yes' if not r['problems'] else r['problems']} | {', '.join(r.get('killed_node_held', []))} | "
              f"{'; '.join(f'{k}: {v}' for k, v in r.get('retried', {}).items())} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0 if all("failed" not in r and not r["problems"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
