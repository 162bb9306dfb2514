"""The Ray Serve application of the synthesis stage: an HTTP ingress in front of the diffusion model.

- `DiffusionDeployment` hosts `DiffusionEngine` (one GPU per replica on GPU clusters, none on CPU).
  `generate(item)` is the one entry point: calls from every request that reach a replica are gathered
  by `@serve.batch` and generated together; batch size and wait are `reconfigure`-able settings
  (`user_config`). A request's LoRA adapter is a multiplexed model (`@serve.multiplexed`): calls name
  it as `multiplexed_model_id`, so they go to replicas that hold it, and each replica evicts LRU.
- `SynthesisAPI` (FastAPI) serves `POST /v1/generate` and `GET /healthz`: bearer-token auth per
  tenant, the tenant's own bundle only, admission control (503 with `Retry-After` when full), images
  written to storage; it calls the diffusion deployment through the same `submit` the job uses.
"""

# No `from __future__ import annotations` here: FastAPI must see the real types of the route bodies.
import asyncio
import logging
import os
import threading
from typing import Optional

from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from spinml_ray import storage
from spinml_ray.spec import LabelSpec, PrivacySpec, SynthesisSpec
from spinml_ray.synthesis.auth import AuthError, load_tokens, tenant_for
from spinml_ray.synthesis.engine import DiffusionEngine
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


@serve.deployment(name="DiffusionDeployment", max_ongoing_requests=64)
class DiffusionDeployment:
    def __init__(self, model: str = "tiny", controlnet: Optional[str] = None, max_adapters: int = 8):
        self.engine = DiffusionEngine(model, controlnet, max_adapters=max_adapters + 1)

    def reconfigure(self, config: dict) -> None:
        """`user_config`: {"max_batch_size": int, "batch_wait_timeout_s": float}; applied live."""
        self.batching = {"max_batch_size": int(config.get("max_batch_size", 8)),
                         "batch_wait_timeout_s": float(config.get("batch_wait_timeout_s", 0.05))}
        self.generate_batch.set_max_batch_size(self.batching["max_batch_size"])
        self.generate_batch.set_batch_wait_timeout_s(self.batching["batch_wait_timeout_s"])

    @serve.multiplexed(max_num_models_per_replica=8)
    async def get_adapter(self, uri: str) -> _AdapterRef:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.load_adapter, uri)
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
        try:
            return await loop.run_in_executor(None, self._generate_isolated, items)
        except Exception as exc:
            return [exc] * len(items)

    async def generate(self, item: WorkItem) -> GeneratedImage:
        if item.adapter:
            await self.get_adapter(item.adapter)
        result = await self.generate_batch(item)
        if isinstance(result, Exception):
            raise result
        return result

    def info(self) -> dict:
        return {"model": self.engine.model, "pipelines": self.engine.kinds, "adapters": list(self.engine.adapters),
                "batching": getattr(self, "batching", None), "device": self.engine.device}


class ApiGenerateRequest(BaseModel):
    """One label's images for one request, conditioned on the tenant's sanitized bundle."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    tenant: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    subject: str = Field(min_length=1, max_length=200)
    label: LabelSpec
    privacy: PrivacySpec = PrivacySpec()
    bundle: Optional[str] = Field(default=None, description="URI of the request's sanitized/ directory")
    synthesis: SynthesisSpec = Field(description="images_per_label is the number of images to make")
    adapter: Optional[str] = None
    token: Optional[str] = Field(default=None, description="personalization identifier, e.g. 'sks'")


@serve.deployment(name="SynthesisAPI", max_ongoing_requests=256)
@serve.ingress(api)
class SynthesisAPI:
    def __init__(self, diffusion, storage_root: str, max_pending_images: int = 256):
        self.diffusion = diffusion
        self.root = storage_root
        self.max_pending = max_pending_images
        self.pending = 0
        self.tokens = load_tokens()

    def _owned(self, tenant: str, uri: Optional[str], what: str) -> None:
        prefix = storage.join(self.root, tenant).rstrip("/") + "/"
        if uri is not None and not storage.resolve(self.root, uri).startswith(prefix):
            raise HTTPException(status_code=403, detail=f"{what} {uri!r} is not under tenant {tenant!r}'s storage")

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", **(await self.diffusion.info.remote())}

    @api.post("/v1/generate")
    async def generate(self, body: ApiGenerateRequest, authorization: Optional[str] = Header(default=None)):
        try:
            tenant = tenant_for(authorization, self.tokens)
        except AuthError as exc:
            raise HTTPException(status_code=401, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
        if body.tenant != tenant:
            raise HTTPException(status_code=403, detail=f"token is for tenant {tenant!r}, not {body.tenant!r}")
        self._owned(tenant, body.bundle, "bundle")
        self._owned(tenant, body.adapter, "adapter")
        by_ref = {}
        if body.bundle:
            try:
                by_ref = index_bundle(storage.read_committed_table(storage.resolve(self.root, body.bundle)).to_pylist())
            except FileNotFoundError as exc:
                raise HTTPException(status_code=404, detail=str(exc)) from None
        try:
            items = plan_label(body.request_id, tenant, body.subject, body.label, body.privacy, body.synthesis,
                               by_ref, body.adapter, body.token)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        if self.pending + len(items) > self.max_pending:
            return JSONResponse({"detail": "synthesis is at capacity; retry later"}, status_code=503,
                                headers={"Retry-After": "2"})
        self.pending += len(items)
        try:
            out_dir = storage.join(self.root, tenant, body.request_id, "api", body.label.name)
            uris = await asyncio.gather(*(self._make(item, out_dir) for item in items))
        finally:
            self.pending -= len(items)
        return {"images": [{"image_id": i.image_id, "uri": u, "seed": i.seed, "prompt": i.prompt, "pool": i.pool}
                           for i, u in zip(items, uris)]}

    async def _make(self, item: WorkItem, out_dir: str) -> str:
        uri = storage.join(out_dir, f"{item.image_id}-{item.seed}.png")
        if storage.exists(uri):  # a retried call: the image is already complete (writes are atomic)
            return uri
        try:
            generated = await submit(self.diffusion, item)
        except Exception as exc:
            raise HTTPException(status_code=500, detail=f"{item.image_id}: generation failed: {exc}") from None
        await asyncio.get_running_loop().run_in_executor(None, storage.write_bytes, uri, generated.image)
        return uri


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

    Serialised within the process, so concurrent requests of a batch job never deploy it twice."""
    from spinml_ray.cluster import cluster_gpus, synthesis_gpu_share

    with _DEPLOY_LOCK:
        try:
            status = serve.status().applications.get(APP_NAME)
        except Exception:
            status = None
        started = status is None or not str(status.status).endswith("RUNNING")
        if started:
            serve.start(http_options={"host": http_host, "port": http_port})
            app_options.setdefault("gpus_per_replica", synthesis_gpu_share(cluster_gpus()))
            serve.run(build_app(model, controlnet, **app_options), name=APP_NAME, route_prefix=ROUTE_PREFIX)
    return serve.get_deployment_handle("DiffusionDeployment", app_name=APP_NAME), started
