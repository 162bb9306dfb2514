"""One SpinML request end to end: sanitize (Ray Data) -> personalize (Ray Train, L2 targets) ->
synthesize (Ray Serve) -> train (Ray Train)."""

from __future__ import annotations

import time

from spinml_ray import storage
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
) -> dict:
    """Run `stages` of one request on the connected Ray cluster; returns a summary per stage.

    `fleet`: a batch job's `fleet.TrainingFleet`, whose slots train the model (else its own trainer)."""
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
    if "sanitize" in stages:
        started = time.time()
        summary["sanitize"] = {**run_sanitize(spec, paths, model=model, sam=sam), "seconds": round(time.time() - started, 2)}
    if "personalize" in stages or "synthesize" in stages:
        handle, deployed = ensure_running(model, controlnet, http_port=http_port, storage_root=storage_root)
        try:
            for name, stage in (("personalize", lambda: run_personalize(spec, paths, model, handle)),
                                ("synthesize", lambda: run_synthesize(spec, paths, handle))):
                if name in stages:
                    started = time.time()
                    summary[name] = {**stage(), "seconds": round(time.time() - started, 2)}
        finally:
            if deployed and not keep_serving:
                serve.delete(APP_NAME)
    if "train" in stages:
        started = time.time()
        summary["train"] = {**run_train(spec, paths, model=model, fleet=fleet), "seconds": round(time.time() - started, 2)}
    return summary
