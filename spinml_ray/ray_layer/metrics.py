"""What a platform watches: custom metrics through `ray.util.metrics`.

Every process that records one (the driver, Ray Data's sanitize actors, the Serve replicas, the fleet's
job board) hands it to its node's metrics agent, which serves it with Ray's own metrics on the node's
Prometheus endpoint (`metrics_export_port`). Prometheus names carry Ray's `ray_` prefix, and counters
the `_total` suffix (`spinml_requests` is `ray_spinml_requests_total`; a histogram has `_bucket`,
`_count` and `_sum`). `cluster/grafana/spinml.json` charts them.

Labels are fixed vocabularies (stage, state, pipeline kind, level, object, a rejection's category),
never request content. Requests and stage seconds carry the tenant only where the platform sets
`SPINML_METRICS_TENANT=1` on its nodes: a label per tenant multiplies the series Prometheus keeps.

Recording never fails the work it describes: outside Ray it does nothing, and an error is swallowed.
A gauge is exported while it is being set: one left alone (an idle replica's queue depth) can drop out
of the scrape instead of reading 0, which a dashboard shows as a gap.
"""

from __future__ import annotations

import functools
import os
import re

NAMES = {  # metric name -> (kind, description, label keys)
    "spinml_requests": ("counter", "request stages started and ended, by stage and state", ("stage", "state")),
    "spinml_stage_seconds": ("histogram", "seconds a request's stage took (completed stages)", ("stage",)),
    "spinml_images_generated": ("counter", "synthetic images generated, by pipeline kind", ("kind",)),
    "spinml_diffusion_batch_size": ("histogram", "images per batch the diffusion deployment generated", ()),
    "spinml_diffusion_queue_depth": ("gauge", "images in a diffusion replica, waiting for a batch or being generated", ()),
    "spinml_api_pending_images": ("gauge", "images admitted by the HTTP API and not yet stored", ()),
    "spinml_admission_rejections": ("counter", "API calls refused for capacity (503) or size (413)", ("status",)),
    "spinml_adapter_events": ("counter", "LoRA adapters loaded into and evicted from replicas", ("event",)),
    "spinml_fleet_slots": ("gauge", "training fleet slots, busy (training a job) or idle (waiting for one)", ("state",)),
    "spinml_fleet_jobs_waiting": ("gauge", "training jobs waiting for a fleet slot", ()),
    "spinml_references_rejected": ("counter", "references refused by sanitization, by category", ("reason",)),
    "spinml_released_mi": ("histogram", "MI (bits) between an object and its release, per level", ("level", "object")),
}
BOUNDARIES = {
    "spinml_stage_seconds": [1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600],
    "spinml_diffusion_batch_size": [1, 2, 4, 8, 16, 32, 64],
    "spinml_released_mi": [0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4],
}
TENANT_LABELLED = ("spinml_requests", "spinml_stage_seconds")
# A rejection's reason is free text ("{file}: {problem}"): its label is the problem's category, first match.
REJECTION_CATEGORIES = (
    ("not_found", re.compile(r"not found", re.I)),
    ("too_large", re.compile(r"pixel cap|decompression bomb", re.I)),
    ("unreadable", re.compile(r"not a readable image|unreadable|empty file", re.I)),
    ("mask", re.compile(r"mask|does not match the image", re.I)),
    ("target", re.compile(r"target|outside the", re.I)),
)


def tenant_labels() -> bool:
    return os.environ.get("SPINML_METRICS_TENANT") == "1"


def rejection_category(reason: str) -> str:
    """One of REJECTION_CATEGORIES' names or "other", judged on the problem, not the file's name."""
    problem = reason.split(": ", 1)[-1]
    return next((name for name, pattern in REJECTION_CATEGORIES if pattern.search(problem)), "other")


@functools.cache
def _metric(name: str):
    from ray.util import metrics

    kind, description, keys = NAMES[name]
    keys = keys + (("tenant",) if name in TENANT_LABELLED and tenant_labels() else ())
    if kind == "counter":
        return metrics.Counter(name, description, tag_keys=keys)
    if kind == "gauge":
        return metrics.Gauge(name, description, tag_keys=keys)
    return metrics.Histogram(name, description, boundaries=BOUNDARIES[name], tag_keys=keys)


def record(name: str, value: float = 1.0, tenant: str | None = None, **labels: str) -> None:
    """Add to a counter, set a gauge or observe a histogram value (by the metric's kind)."""
    try:
        import ray

        if not ray.is_initialized():
            return
        metric = _metric(name)
        if name in TENANT_LABELLED and tenant_labels():
            labels["tenant"] = tenant or ""
        tags = {key: str(label) for key, label in labels.items()}
        kind = NAMES[name][0]
        if kind == "counter":
            metric.inc(value, tags=tags)
        elif kind == "gauge":
            metric.set(value, tags=tags)
        else:
            metric.observe(value, tags=tags)
    except Exception:  # a metric is never worth the work it describes
        pass
