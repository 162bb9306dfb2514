"""The Ray Serve application of the synthesis stage: an HTTP ingress in front of the diffusion model.

- `DiffusionDeployment` hosts `DiffusionEngine` (one GPU per replica on GPU clusters, none on CPU).
  `generate(item)` is the one entry point: calls from every request that reach a replica are gathered
  by `@serve.batch` and generated together; batch size and wait are `reconfigure`-able settings
  (`user_config`). A request's LoRA adapter is a multiplexed model (`@serve.multiplexed`): calls name
  it as `multiplexed_model_id`, so they go to replicas that hold it, and each replica evicts LRU.
- `SynthesisAPI` (FastAPI) serves `POST /v1/generate` and `GET /healthz`: bearer-token auth per
  tenant (checked before the body is read), every caller-named URI confined to the tenant's own
  prefix (`storage.confine`), admission control (413 for a call larger than is ever admitted, 503
  with `Retry-After` when busy), images written to storage only inside that prefix; no error body
  carries a traceback, path or process id. It calls the diffusion deployment through the same
  `submit` the job uses. A call that takes minutes can be streamed (`?stream=true`, or `Accept:
  application/x-ndjson`): the checks answer as before, then one NDJSON line per image as it is
  stored, and a last line with the counts.

`app_builder` is the application as Ray builds it from a config: `serve run
spinml_ray.ray_layer.service:app_builder model=...`, `serve deploy cluster/serve-config.yaml`, or a
KubeRay RayService (`cluster/kuberay/rayservice.yaml`); its arguments are `SynthesisAppArgs`.
`spinml serve` and the batch job deploy the same application through `build_app`.
"""

# No `from __future__ import annotations` here: FastAPI must see the real types of the route bodies.
import asyncio
import json
import logging
import os
import threading
import uuid
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve

from spinml_ray import storage
from spinml_ray.ray_layer import metrics
from spinml_ray.spec import Identifier, LabelSpec, PrivacySpec, SynthesisSpec
from spinml_ray.synthesis.auth import AuthError, load_tokens, tenant_for
from spinml_ray.synthesis.engine import FULL_UNET, LORA_WEIGHTS, DiffusionEngine, is_adapter
from spinml_ray.synthesis.plan import index_bundle, plan_label
from spinml_ray.synthesis.workitems import GeneratedImage, WorkItem

log = logging.getLogger(__name__)

APP_NAME = "spinml-synthesis"
_DEPLOY_LOCK = threading.Lock()
ROUTE_PREFIX = "/spinml"
api = FastAPI(title="spinml synthesis")


def submit(handle, item: WorkItem):
    """Send one work item to the diffusion deployment (routed to a replica holding its adapter)."""
    if item.adapter:
        handle = handle.options(multiplexed_model_id=item.adapter)
    return handle.generate.remote(item)


class _AdapterRef:
    """What the multiplexer keeps per adapter; evicting it unloads the adapter from the engine."""

    def __init__(self, engine: DiffusionEngine, uri: str):
        self.engine, self.uri = engine, uri

    def __del__(self):
        self.engine.unload_adapter(self.uri)
        metrics.record("spinml_adapter_events", event="evict")


@serve.deployment(name="DiffusionDeployment", max_ongoing_requests=64)
class DiffusionDeployment:
    def __init__(self, model: str = "tiny", controlnet: Optional[str] = None, max_adapters: int = 8):
        self.engine = DiffusionEngine(model, controlnet, max_adapters=max_adapters + 1)
        self.generating = 0  # images in the batch being generated now
        self.queued = 0  # images in this replica: waiting for a batch or being generated

    def reconfigure(self, config: dict) -> None:
        """`user_config`: {"max_batch_size": int, "batch_wait_timeout_s": float}; applied live."""
        self.batching = {"max_batch_size": int(config.get("max_batch_size", 8)),
                         "batch_wait_timeout_s": float(config.get("batch_wait_timeout_s", 0.05))}
        self.generate_batch.set_max_batch_size(self.batching["max_batch_size"])
        self.generate_batch.set_batch_wait_timeout_s(self.batching["batch_wait_timeout_s"])

    @serve.multiplexed(max_num_models_per_replica=8)
    async def get_adapter(self, uri: str) -> _AdapterRef:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.load_adapter, uri)
        metrics.record("spinml_adapter_events", event="load")
        return _AdapterRef(self.engine, uri)

    def _generate_isolated(self, items: list[WorkItem]) -> list:
        """Generate a batch; if it fails, retry item by item so one bad item fails alone."""
        try:
            return list(self.engine.generate(items))
        except Exception:
            if len(items) == 1:
                raise
        results: list = []
        for item in items:
            try:
                results.extend(self.engine.generate([item]))
            except Exception as exc:  # reported to that item's caller only
                log.warning("work item %s failed: %s", item.image_id, exc)
                results.append(exc)
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, items: list[WorkItem]) -> list:
        loop = asyncio.get_running_loop()
        self.generating += len(items)
        metrics.record("spinml_diffusion_batch_size", len(items))
        try:
            results = await loop.run_in_executor(None, self._generate_isolated, items)
        except Exception as exc:
            return [exc] * len(items)
        finally:
            self.generating -= len(items)
        for result in results:
            if not isinstance(result, Exception):
                metrics.record("spinml_images_generated", kind=result.kind)
        return results

    async def generate(self, item: WorkItem) -> GeneratedImage:
        self.queued += 1
        metrics.record("spinml_diffusion_queue_depth", self.queued)
        try:
            if item.adapter:
                await self.get_adapter(item.adapter)
            result = await self.generate_batch(item)
        finally:
            self.queued -= 1
            metrics.record("spinml_diffusion_queue_depth", self.queued)
        if isinstance(result, Exception):
            raise result
        return result

    def info(self) -> dict:
        return {"model": self.engine.model, "pipelines": self.engine.kinds, "adapters": list(self.engine.adapters),
                "batching": getattr(self, "batching", None), "device": self.engine.device,
                "generating": self.generating}


class ApiGenerateRequest(BaseModel):
    """One label's images for one request, conditioned on the tenant's sanitized bundle.

    `bundle` and `adapter` are URIs inside the tenant's own storage prefix (`{storage}/{tenant}/...`);
    relative ones resolve against that prefix."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    request_id: Identifier
    tenant: Identifier
    subject: str = Field(min_length=1, max_length=200)
    label: LabelSpec
    privacy: PrivacySpec = PrivacySpec()
    bundle: Optional[str] = Field(default=None, max_length=storage.MAX_URI_LENGTH,
                                  description="URI of the request's sanitized/ directory")
    synthesis: SynthesisSpec = Field(description="images_per_label is the number of images to make")
    adapter: Optional[str] = Field(default=None, max_length=storage.MAX_URI_LENGTH)
    token: Optional[str] = Field(default=None, pattern=r"^[a-z]{2,12}$",
                                 description="personalization identifier, e.g. 'sks'")


MAX_BODY_BYTES = 1 << 20


def _streamed(request: Request) -> bool:
    """Whether the caller asked for one NDJSON line per image (`?stream=true` or `Accept: application/x-ndjson`)."""
    return (request.query_params.get("stream", "").lower() in ("1", "true", "yes")
            or "application/x-ndjson" in request.headers.get("accept", ""))


def _described(item: WorkItem, uri: str) -> dict:
    return {"image_id": item.image_id, "uri": uri, "seed": item.seed, "prompt": item.prompt, "pool": item.pool}


def _problem(status: int, detail, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _field_errors(exc: ValidationError) -> list[dict]:
    """A validation error as field names and messages only: never the offending input echoed back."""
    return [{"loc": [str(part) for part in error["loc"]], "msg": error["msg"]} for error in exc.errors()]


@serve.deployment(name="SynthesisAPI", max_ongoing_requests=256)
@serve.ingress(api)
class SynthesisAPI:
    def __init__(self, diffusion, storage_root: str, max_pending_images: int = 256):
        self.diffusion = diffusion
        self.root = storage_root
        self.max_pending = max_pending_images
        self.pending = 0
        self.tokens = load_tokens()  # read here, on this node: tokens never travel with a job or actor

    @api.get("/healthz")
    async def healthz(self) -> dict:
        """Unauthenticated: what a load balancer needs, and nothing of any tenant's (no adapter URIs)."""
        info = await self.diffusion.info.remote()
        return {"status": "ok", "pipelines": info["pipelines"], "device": info["device"],
                "adapters_loaded": len(info["adapters"])}

    @api.post("/v1/generate")
    async def generate(self, request: Request):
        try:
            return await self._generate(request)
        except Exception as exc:  # answered without a trace, path or process id; the detail stays in the log
            incident = uuid.uuid4().hex[:12]
            log.error("incident %s: %s", incident, exc, exc_info=exc)
            return _problem(500, f"internal error (incident {incident})")

    async def _generate(self, request: Request):
        """Auth first (401 before anything about the body is said), then the body, then the tenant's
        own URIs (403 outside its prefix), then admission (413 past what is ever admitted, 503 when
        busy)."""
        try:
            tenant = tenant_for(request.headers.get("authorization"), self.tokens)
        except AuthError as exc:
            return _problem(401, str(exc), {"WWW-Authenticate": "Bearer"})
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return _problem(413, f"body larger than {MAX_BODY_BYTES} bytes")
        try:
            body = ApiGenerateRequest.model_validate_json(raw)
        except ValidationError as exc:
            return _problem(422, _field_errors(exc))
        if body.tenant != tenant:
            return _problem(403, f"token is for tenant {tenant!r}, not {body.tenant!r}")
        if body.synthesis.images_per_label > self.max_pending:
            metrics.record("spinml_admission_rejections", status="413")
            return _problem(413, f"synthesis.images_per_label {body.synthesis.images_per_label} is more than this "
                                 f"service admits in one call ({self.max_pending}); split the call")
        home = storage.join(self.root, tenant)
        located = {}
        for what, uri in (("bundle", body.bundle), ("adapter", body.adapter)):
            try:
                located[what] = storage.confine(home, uri, what) if uri is not None else None
            except storage.OutsidePrefix:
                return _problem(403, f"{what} is not under tenant {tenant!r}'s storage")
        bundle, adapter = located["bundle"], located["adapter"]
        loop = asyncio.get_running_loop()
        by_ref = {}
        if bundle:
            try:
                table = await loop.run_in_executor(None, storage.read_committed_table, bundle)
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                return _problem(404, "bundle: no committed sanitized bundle there")
            by_ref = index_bundle(table.to_pylist())
        if adapter and not await loop.run_in_executor(None, is_adapter, adapter):
            return _problem(404, f"adapter: no {LORA_WEIGHTS} (nor a fine-tuned {FULL_UNET}/) there")
        try:
            items = plan_label(body.request_id, tenant, body.subject, body.label, body.privacy, body.synthesis,
                               by_ref, adapter, body.token)
        except ValueError as exc:
            return _problem(422, str(exc))
        if self.pending + len(items) > self.max_pending:
            metrics.record("spinml_admission_rejections", status="503")
            return _problem(503, "synthesis is at capacity; retry later", {"Retry-After": "2"})
        self._admit(len(items))
        out_dir = storage.join(home, body.request_id, "api", body.label.name)
        tasks = [asyncio.ensure_future(self._make(item, home, out_dir)) for item in items]
        if _streamed(request):
            return StreamingResponse(self._stream(body.request_id, items, tasks), media_type="application/x-ndjson")
        try:
            made = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._admit(-len(items))
        failed = [(item, result) for item, result in zip(items, made) if isinstance(result, BaseException)]
        for item, exc in failed:
            log.warning("request %s image %s failed: %s", body.request_id, item.image_id, exc)
        if failed:
            return _problem(500, f"generation failed for {len(failed)} of {len(items)} images "
                                 f"({', '.join(item.image_id for item, _ in failed[:5])}); retry the call")
        return {"images": [_described(item, uri) for item, uri in zip(items, made)]}

    def _admit(self, images: int) -> None:
        self.pending += images
        metrics.record("spinml_api_pending_images", self.pending)

    async def _stream(self, request_id: str, items: list[WorkItem], tasks: list):
        """NDJSON, one line per image as it is stored (or fails), then a summary line. A caller that
        goes away cancels the images not yet generated; what was stored stays (a retry reuses it)."""
        which = dict(zip(tasks, items))
        waiting, failed = set(tasks), 0
        try:
            while waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    item = which[task]
                    if task.exception() is not None:
                        failed += 1
                        log.warning("request %s image %s failed: %s", request_id, item.image_id, task.exception())
                        line = {"image_id": item.image_id, "error": "generation failed; retry the call"}
                    else:
                        line = _described(item, task.result())
                    yield json.dumps(line) + "\n"
            yield json.dumps({"done": True, "images": len(items) - failed, "failed": failed}) + "\n"
        finally:
            for task in waiting:
                task.cancel()
            self._admit(-len(items))

    async def _make(self, item: WorkItem, home: str, out_dir: str) -> str:
        uri = storage.join(out_dir, f"{item.image_id}-{item.seed}.png")
        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(None, storage.exists, uri):  # a retried call: already complete (atomic writes)
            return uri
        generated = await submit(self.diffusion, item)
        return await loop.run_in_executor(None, storage.write_within, home, uri, generated.image)


class SynthesisAppArgs(BaseModel):
    """The arguments of the synthesis application in a Serve config (`applications[].args`). Replica
    counts, autoscaling and actor resources can also be set the Serve way, under `deployments:`
    (`DiffusionDeployment`, `SynthesisAPI`); those override what these arguments set."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())

    model: str = Field(default="tiny", min_length=1, description="model source: tiny, a directory, s3:// prefix or hub id")
    controlnet: Optional[str] = None
    storage_root: str = Field(default_factory=lambda: os.environ.get("SPINML_STORAGE", "spinml-data"),
                              min_length=1, description="where API calls store their images (default: $SPINML_STORAGE)")
    num_replicas: int = Field(default=1, ge=1)
    gpus_per_replica: Optional[float] = Field(
        default=None, ge=0, description="GPU share of a diffusion replica; default: half the card on a one-GPU "
                                        "cluster, a whole one on larger ones, none without GPUs")
    cpus_per_replica: float = Field(default=1, gt=0)
    max_batch_size: int = Field(default=8, ge=1)
    batch_wait_timeout_s: float = Field(default=0.05, ge=0)
    autoscaling: Optional[dict] = Field(default=None, description="a Serve autoscaling_config; replaces num_replicas")
    max_pending_images: int = Field(default=256, ge=1)


def app_builder(args: SynthesisAppArgs) -> serve.Application:
    """The synthesis application from its arguments, as Ray's `serve run`/`serve deploy` build it.

    Without `gpus_per_replica` the share follows the cluster's GPUs; `serve run` builds the application
    before it connects to Ray, and then this machine's GPUs decide (set the argument to choose)."""
    import ray

    from spinml_ray.ray_layer.cluster import cluster_gpus
    from spinml_ray.resources import synthesis_gpu_share

    options = args.model_dump()
    if options["gpus_per_replica"] is None:
        if ray.is_initialized():
            gpus = cluster_gpus()
        else:
            import torch

            gpus = torch.cuda.device_count()
            log.info("not connected to Ray yet: the replica's GPU share follows this machine's %d GPU(s)", gpus)
        options["gpus_per_replica"] = synthesis_gpu_share(gpus)
    return build_app(**options)


def build_app(model: str = "tiny", controlnet: Optional[str] = None, storage_root: str = "spinml-data",
              num_replicas: int = 1, gpus_per_replica: float = 0, cpus_per_replica: float = 1,
              max_batch_size: int = 8, batch_wait_timeout_s: float = 0.05, autoscaling: Optional[dict] = None,
              max_pending_images: int = 256):
    """The bound application. `autoscaling` (a Serve autoscaling_config) replaces `num_replicas`.

    On CPU a replica's torch uses `cpus_per_replica` threads (Ray sets OMP_NUM_THREADS from it)."""
    actor_options = {"num_gpus": gpus_per_replica} if gpus_per_replica else {"num_cpus": cpus_per_replica}
    scaling = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": num_replicas}
    diffusion = DiffusionDeployment.options(
        ray_actor_options=actor_options,
        user_config={"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s},
        **scaling,
    ).bind(model, controlnet)
    return SynthesisAPI.options(ray_actor_options={"num_cpus": 0}).bind(
        diffusion, os.path.abspath(storage_root) if not storage.is_s3(storage_root) else storage_root, max_pending_images
    )


def ensure_running(model: str = "tiny", controlnet: Optional[str] = None, http_host: str = "127.0.0.1",
                   http_port: int = 8000, **app_options):
    """(diffusion handle, started): reuse the running synthesis app, or deploy one (started=True).
    A running app that serves another model is an error, never silently used.

    Serialised within the process, so concurrent requests of a batch job never deploy it twice."""
    with _DEPLOY_LOCK:
        try:
            status = serve.status().applications.get(APP_NAME)
        except Exception:
            status = None
        started = status is None or not str(status.status).endswith("RUNNING")
        if started:
            deploy(SynthesisAppArgs(model=model, controlnet=controlnet, **app_options), http_host, http_port)
        handle = serve.get_deployment_handle("DiffusionDeployment", app_name=APP_NAME)
        if not started and (served := handle.info.remote().result()["model"]) != model:
            raise RuntimeError(f"the running synthesis app serves model {served!r}, not {model!r}: run with "
                               f"--model {served}, or remove that app first (serve.delete({APP_NAME!r}))")
    return handle, started


def deploy(args: SynthesisAppArgs, http_host: str, http_port: int) -> None:
    """Start Serve's HTTP proxy on `http_host:http_port` and deploy the application (`spinml serve`)."""
    serve.start(http_options={"host": http_host, "port": http_port})
    serve.run(app_builder(args), name=APP_NAME, route_prefix=ROUTE_PREFIX)


def undeploy() -> None:
    serve.delete(APP_NAME)
