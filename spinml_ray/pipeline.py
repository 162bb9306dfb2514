"""One SpinML request end to end: sanitize (Ray Data) -> personalize (Ray Train, L2 targets) ->
synthesize (Ray Serve) -> train (Ray Train)."""

from __future__ import annotations

import time

from spinml_ray import metrics, storage
from spinml_ray.spec import RequestSpec, load_request

STAGES = ("sanitize", "personalize", "synthesize", "train")


def request_paths(spec: RequestSpec, root: str) -> storage.RequestPaths:
    return storage.RequestPaths(root, spec.tenant, spec.request_id)


def run_request(
    request_uri: str,
    storage_root: str,
    model: str = "tiny",
    controlnet: str | None = None,
    sam: str | None = None,
    stages: tuple[str, ...] = STAGES,
    keep_serving: bool = False,
    http_port: int = 8000,
    fleet=None,
    progress=None,
) -> dict:
    """Run `stages` of one request on the connected Ray cluster; returns a summary per stage.

    `fleet`: a batch job's `fleet.TrainingFleet`, whose slots train the model (else its own trainer).
    `progress`: a `progress.Progress` that shows each stage's state and counts."""
    from ray import serve

    from spinml_ray.stages.personalize import run_personalize
    from spinml_ray.stages.sanitize import run_sanitize
    from spinml_ray.stages.synthesize import run_synthesize
    from spinml_ray.stages.train import run_train
    from spinml_ray.synthesis.service import APP_NAME, ensure_running

    spec = load_request(request_uri)
    paths = request_paths(spec, storage_root)
    storage.write_json(paths.request, spec.model_dump(mode="json"))
    summary: dict = {"request_id": spec.request_id, "tenant": spec.tenant, "output": paths.base}
    label = f"{spec.tenant}/{spec.request_id}"

    def run(stage: str, work) -> None:
        """Run one stage (if asked for): `work(counter)` gets the stage's `(done, total)` callable."""
        if stage not in stages:
            return
        in_workers = stage in ("personalize", "train")  # their counts come from Ray Train workers
        counter = None if progress is None else (progress.reporter if in_workers else progress.counter)(label, stage)
        if progress is not None:
            progress.stage(label, stage, "running")
        metrics.record("spinml_requests", tenant=spec.tenant, stage=stage, state="running")
        started = time.time()
        try:
            summary[stage] = {**work(counter), "seconds": round(time.time() - started, 2)}
        except BaseException:
            if progress is not None:
                progress.stage(label, stage, "failed")
            metrics.record("spinml_requests", tenant=spec.tenant, stage=stage, state="failed")
            raise
        if progress is not None:
            progress.stage(label, stage, "done")
        metrics.record("spinml_requests", tenant=spec.tenant, stage=stage, state="done")
        metrics.record("spinml_stage_seconds", time.time() - started, tenant=spec.tenant, stage=stage)

    run("sanitize", lambda counter: run_sanitize(spec, paths, model=model, sam=sam, progress=counter))
    if "personalize" in stages or "synthesize" in stages:
        handle, deployed = ensure_running(model, controlnet, http_port=http_port, storage_root=storage_root)
        try:
            run("personalize", lambda counter: run_personalize(spec, paths, model, handle, progress=counter))
            run("synthesize", lambda counter: run_synthesize(spec, paths, handle, progress=counter))
        finally:
            if deployed and not keep_serving:
                serve.delete(APP_NAME)
    run("train", lambda counter: run_train(spec, paths, model=model, fleet=fleet, progress=counter))
    return summary
