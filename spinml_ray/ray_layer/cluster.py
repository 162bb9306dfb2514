"""Connecting to Ray: an existing cluster when one is named, else a local one on loopback."""

from __future__ import annotations

import os

from spinml_ray.storage import S3_LOCATION_ENV

# Settings that every worker must see as the driver does (storage endpoint, model cache, offline hub).
# No secret is among them: a runtime environment is shown in Ray's job table, dashboard and
# runtime-env agent log. S3 credentials come from each node; the synthesis ingress reads the API
# tokens on its own node (synthesis/auth.py).
FORWARDED_ENV = S3_LOCATION_ENV + ("SPINML_CACHE", "HF_HUB_OFFLINE", "HF_HOME")


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """`ray.init` against `address` (or $RAY_ADDRESS), else start a local single-node Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    kwargs: dict = {"log_to_driver": True}
    if env_vars:
        kwargs["runtime_env"] = {"env_vars": env_vars}
    if address:
        ray.init(address=address, **kwargs)
        return
    # Without this Ray binds its ports to the machine's external address; a local run stays on loopback.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # The dashboard also serves Ray's state API: without it Ray Train's placement-group cleaner cannot
    # see whether a trainer's controller died (and says so in the job's log every second).
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             **kwargs)


def cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0)


def cluster_has_gpus() -> bool:
    return cluster_gpus() > 0


def on_this_node():
    """A scheduling strategy that pins an actor to the caller's node: for the driver's helpers (the
    fleet's job board, the progress relay), which hold no resources and would otherwise land on any
    node, and fail the whole job with it; on the driver's node they share only the driver's fate."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def lost_process(exc: BaseException) -> str | None:
    """The name of the Ray error in `exc`'s chain that says a node, worker or actor was lost (Ray
    wraps them: a stage raises its own error from Ray Train's, which holds the worker's), else None."""
    from ray.exceptions import NodeDiedError, ObjectLostError, OwnerDiedError, RayActorError, WorkerCrashedError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (NodeDiedError, RayActorError, WorkerCrashedError, OwnerDiedError, ObjectLostError)):
            return type(exc).__name__
        cause = getattr(exc, "cause", None)  # a RayTaskError holds the task's own exception here
        exc = exc.__cause__ or exc.__context__ or (cause if isinstance(cause, BaseException) else None)
    return None


def failure_reason(exc: BaseException) -> str:
    """A request's error as its status records it; says so when a lost node or process caused it."""
    lost = lost_process(exc)
    return f"{exc} (a Ray node or worker process was lost: {lost}; a re-run resumes)" if lost else str(exc)
