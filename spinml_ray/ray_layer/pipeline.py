"""One SpinML request end to end: sanitize (Ray Data) -> personalize (Ray Train, L2 targets) ->
synthesize (Ray Serve) -> train (Ray Train).

`STAGES` is the one table of stages (name, output directory, whether it needs the synthesis service,
whether its counts come from Ray Train workers, the function that runs it). `spinml run`, the stage
subcommands (`spinml sanitize` ...), and the batch job all read it, and `skipped` is the one rule for
what a request does not need to run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from spinml_ray import storage
from spinml_ray.ray_layer import metrics
from spinml_ray.spec import RequestSpec, load_request


@dataclass
class StageContext:
    """What a stage's run function may use besides the request: the model sources, the synthesis
    service's handle (stages that need it), the batch's training fleet, and the stage's progress counter."""

    model: str = "tiny"
    controlnet: str | None = None
    sam: str | None = None
    handle: object = None
    fleet: object = None
    counter: Callable[[int, int], None] | None = None


def _sanitize(spec, paths, ctx: StageContext) -> dict:
    from spinml_ray.ray_layer.sanitize import run_sanitize

    return run_sanitize(spec, paths, model=ctx.model, sam=ctx.sam, progress=ctx.counter)


def _personalize(spec, paths, ctx: StageContext) -> dict:
    from spinml_ray.ray_layer.personalize import run_personalize

    return run_personalize(spec, paths, ctx.model, ctx.handle, progress=ctx.counter)


def _synthesize(spec, paths, ctx: StageContext) -> dict:
    from spinml_ray.ray_layer.synthesize import run_synthesize

    return run_synthesize(spec, paths, ctx.handle, progress=ctx.counter)


def _train(spec, paths, ctx: StageContext) -> dict:
    from spinml_ray.ray_layer.train import run_train

    return run_train(spec, paths, model=ctx.model, fleet=ctx.fleet, progress=ctx.counter)


@dataclass(frozen=True)
class Stage:
    name: str
    help: str  # the stage subcommand's help
    output: Callable[[storage.RequestPaths], str]  # the directory its manifest commits
    needs_service: bool  # it sends work to the synthesis service
    in_workers: bool  # its progress is counted in Ray Train workers
    run: Callable[[RequestSpec, storage.RequestPaths, StageContext], dict]


STAGES: tuple[Stage, ...] = (
    Stage("sanitize", "stage 1: sanitize the references (Ray Data); or --preview / --local without Ray",
          lambda p: p.sanitized, needs_service=False, in_workers=False, run=_sanitize),
    Stage("personalize", "stage 1b: DreamBooth-LoRA adapter for an L2 target (Ray Train)",
          lambda p: p.adapters, needs_service=True, in_workers=True, run=_personalize),
    Stage("synthesize", "stage 2: generate synthetic images (Ray Serve)",
          lambda p: p.synthetic, needs_service=True, in_workers=False, run=_synthesize),
    Stage("train", "stage 3: train and evaluate the specialized model (Ray Train)",
          lambda p: p.model, needs_service=False, in_workers=True, run=_train),
)
STAGE_NAMES = tuple(stage.name for stage in STAGES)


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ValueError(f"{name!r} is not a stage ({', '.join(STAGE_NAMES)})")


def skipped(stage: Stage, spec: RequestSpec, paths: storage.RequestPaths, resume: bool) -> str | None:
    """Why `stage` does not run for this request, in the words of the status table, or None if it must:
    a request without a released L2 target has nothing to personalize on; with `resume` (the batch
    job), a stage whose output is already committed is not repeated."""
    if stage.name == "personalize" and spec.unpersonalized:
        return f"skipped ({spec.unpersonalized})"
    if resume and storage.read_manifest(stage.output(paths)) is not None:
        return "done (already complete)"
    return None


def request_paths(spec: RequestSpec, root: str) -> storage.RequestPaths:
    return storage.RequestPaths(root, spec.tenant, spec.request_id)


def run_request(
    request_uri: str,
    storage_root: str,
    model: str = "tiny",
    controlnet: str | None = None,
    sam: str | None = None,
    stages: tuple[str, ...] = STAGE_NAMES,
    keep_serving: bool = False,
    http_port: int = 8000,
    fleet=None,
    progress=None,
) -> dict:
    """Run `stages` of one request on the connected Ray cluster; returns a summary per stage.

    `fleet`: a batch job's `fleet.TrainingFleet`, whose slots train the model (else its own trainer).
    `progress`: a `progress.Progress` that shows each stage's state and counts."""
    from spinml_ray.ray_layer.service import ensure_running, undeploy

    spec = load_request(request_uri)
    paths = request_paths(spec, storage_root)
    storage.write_json(paths.request, spec.model_dump(mode="json"))
    summary: dict = {"request_id": spec.request_id, "tenant": spec.tenant, "output": paths.base}
    label = f"{spec.tenant}/{spec.request_id}"
    context = StageContext(model=model, controlnet=controlnet, sam=sam, fleet=fleet)
    chosen = [stage for stage in STAGES if stage.name in stages]
    deployed = False
    try:
        for stage in chosen:
            if stage.needs_service and context.handle is None:
                context.handle, deployed = ensure_running(model, controlnet, http_port=http_port,
                                                          storage_root=storage_root)
            if (deployed and not keep_serving and not any(s.needs_service for s in chosen[chosen.index(stage):])):
                undeploy()  # no later stage sends work to it
                deployed = False
            summary[stage.name] = _run_stage(stage, spec, paths, context, label, progress)
    finally:
        if deployed and not keep_serving:
            undeploy()
    return summary


def _run_stage(stage: Stage, spec: RequestSpec, paths: storage.RequestPaths, context: StageContext, label: str,
               progress) -> dict:
    """Run one stage, with its progress, state metrics and seconds."""
    if progress is not None:
        context.counter = (progress.reporter if stage.in_workers else progress.counter)(label, stage.name)
        progress.stage(label, stage.name, "running")
    metrics.record("spinml_requests", tenant=spec.tenant, stage=stage.name, state="running")
    started = time.time()
    try:
        result = {**stage.run(spec, paths, context), "seconds": round(time.time() - started, 2)}
    except BaseException:
        if progress is not None:
            progress.stage(label, stage.name, "failed")
        metrics.record("spinml_requests", tenant=spec.tenant, stage=stage.name, state="failed")
        raise
    if progress is not None:
        progress.stage(label, stage.name, "done")
    metrics.record("spinml_requests", tenant=spec.tenant, stage=stage.name, state="done")
    metrics.record("spinml_stage_seconds", time.time() - started, tenant=spec.tenant, stage=stage.name)
    return result
