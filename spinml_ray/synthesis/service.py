"""The Ray Serve application hosting the diffusion engine: handle calls and an HTTP API share one path.

- `DiffusionDeployment.generate(item)`: one work item in, one `GeneratedImage` out. Calls from every
  request that reach a replica are gathered by `@serve.batch` and generated together (`engine.py`
  groups them into batches of compatible shape).
- `POST /v1/generate` (JSON `GenerateRequest`) and `GET /healthz` over HTTP, through the same method.
One GPU per replica on GPU clusters (none on CPU); the model is loaded once per replica.
"""


# No `from __future__ import annotations` here: FastAPI must see the real types of the route bodies.
import asyncio
import logging

from fastapi import FastAPI, HTTPException
from ray import serve

from spinml_ray.synthesis.engine import DiffusionEngine, EngineError
from spinml_ray.synthesis.workitems import GeneratedImage, GenerateRequest, GenerateResponse, WorkItem

log = logging.getLogger(__name__)

APP_NAME = "spinml-synthesis"
ROUTE_PREFIX = "/spinml"
api = FastAPI(title="spinml synthesis")


@serve.deployment(name="DiffusionDeployment", max_ongoing_requests=64)
@serve.ingress(api)
class DiffusionDeployment:
    def __init__(self, model: str = "tiny", controlnet: str | None = None, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.05):
        self.engine = DiffusionEngine(model, controlnet)
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _generate_isolated(self, items: list[WorkItem]) -> list[GeneratedImage | Exception]:
        """Generate a batch; if it fails, retry item by item so one bad item fails alone."""
        try:
            return list(self.engine.generate(items))
        except Exception:
            if len(items) == 1:
                raise
        results: list[GeneratedImage | Exception] = []
        for item in items:
            try:
                results.extend(self.engine.generate([item]))
            except Exception as exc:  # reported to that item's caller only
                log.warning("work item %s failed: %s", item.image_id, exc)
                results.append(exc)
        return results

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def generate_batch(self, items: list[WorkItem]) -> list[GeneratedImage | Exception]:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self._generate_isolated, items)
        except Exception as exc:
            return [exc] * len(items)

    async def generate(self, item: WorkItem) -> GeneratedImage:
        result = await self.generate_batch(item)
        if isinstance(result, Exception):
            raise result
        return result

    @api.post("/v1/generate")
    async def http_generate(self, body: GenerateRequest) -> GenerateResponse:
        try:
            images = await asyncio.gather(*(self.generate(item) for item in body.items))
        except (EngineError, ValueError) as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from None
        return GenerateResponse(images=list(images))

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.engine.model, "pipelines": self.engine.kinds}


def build_app(model: str = "tiny", controlnet: str | None = None, num_replicas: int = 1, gpus_per_replica: float = 0,
              max_batch_size: int = 8, batch_wait_timeout_s: float = 0.05):
    """The bound Serve application; `gpus_per_replica` is 1 on GPU clusters, 0 on CPU."""
    options = {"num_gpus": gpus_per_replica} if gpus_per_replica else {"num_cpus": 1}
    return DiffusionDeployment.options(num_replicas=num_replicas, ray_actor_options=options).bind(
        model, controlnet, max_batch_size, batch_wait_timeout_s
    )


def ensure_running(model: str = "tiny", controlnet: str | None = None, http_host: str = "127.0.0.1",
                   http_port: int = 8000, **app_options) -> tuple[object, bool]:
    """(handle, started): reuse the running synthesis app, or deploy one (started=True)."""
    from spinml_ray.cluster import cluster_has_gpus

    try:
        status = serve.status().applications.get(APP_NAME)
    except Exception:
        status = None
    if status is not None and str(status.status).endswith("RUNNING"):
        return serve.get_app_handle(APP_NAME), False
    serve.start(http_options={"host": http_host, "port": http_port})
    app_options.setdefault("gpus_per_replica", 1 if cluster_has_gpus() else 0)
    handle = serve.run(build_app(model, controlnet, **app_options), name=APP_NAME, route_prefix=ROUTE_PREFIX)
    return handle, True
