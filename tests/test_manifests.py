"""Checks on the deployment manifests in cluster/, run in CI before anyone applies one, so that a broken
manifest fails here with the offending field named rather than on a cluster.

* aws-launcher.yaml: the JSON schema the installed `ray` wheel ships for the cluster launcher; head_node_type
  is a node type; docker image tags name the installed Ray; the repository scripts its commands name and the
  local sources of its file_mounts exist.
* serve-config.yaml and the RayService's serveConfigV2 (the same config, kept equal): Ray's own
  `ServeDeploySchema`; the import path is the project's application builder, its args validate against
  the builder's argument model, and every deployment it overrides exists in the application.
* kuberay/raycluster.yaml, kuberay/rayjob.yaml, kuberay/rayservice.yaml: a strict subset of KubeRay's ray.io/v1 API (fields named and
  typed as in KubeRay's Go types; unknown fields are errors) with looser pod templates (containers with name
  and image, known resource names, valid quantities, requests within limits, env entries with one source);
  rayVersion is the installed Ray; worker groups have unique names and minReplicas <= replicas <= maxReplicas;
  all containers run one image; the RayJob's entrypoint runs a script that is in the repository; every Ray
  container opens the metrics port (8080, named metrics) that Prometheus scrapes.
* kuberay/podmonitor.yaml: a strict subset of the Prometheus Operator's PodMonitor, whose selector picks
  the Ray pods of every KubeRay manifest here and whose endpoint is that port.
* grafana/spinml.json: the dashboard charts every metric spinml_ray/ray_layer/metrics.py defines, by the name
  Prometheus gives it (ray_ prefix, _total on counters, _bucket/_sum/_count on histograms), and no other.
The negative tests break a loaded copy of each manifest and check that the error names the broken field.
"""

import copy
import functools
import importlib.metadata
import json
import re
import shlex
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import jsonschema
import pytest
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

REPO = Path(__file__).resolve().parents[1]
RAY_VERSION = importlib.metadata.version("ray")


@functools.cache
def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "cluster" / name).read_text())  # resolves the &spinml-env / *spinml-env anchors


def manifest(name: str) -> dict:
    return copy.deepcopy(_load(name))


# Kubernetes quantities: "500m", "16Gi", "1e3", 4.
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))([eE][+-]?\d+|[KMGTPE]i|[numkMGTPE])?")
_SCALE = {"": Decimal(1), **{s: Decimal(10) ** e for s, e in zip("numkMGTPE", (-9, -6, -3, 3, 6, 9, 12, 15, 18))},
          **{s + "i": Decimal(2) ** (10 * i) for i, s in enumerate("KMGTPE", 1)}}


def quantity(value: Union[str, int, float]) -> Decimal:
    match = _QUANTITY.fullmatch(str(value))
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    number, suffix = match.group(1), match.group(2) or ""
    return Decimal(number + suffix) if suffix[:1] in ("e", "E") else Decimal(number) * _SCALE[suffix]


def _valid_quantity(value):
    quantity(value)
    return value


# A strict subset of KubeRay ray.io/v1; the JSON names and types follow KubeRay's Go API types.
Quantity = Annotated[Union[StrictStr, StrictInt, StrictFloat], AfterValidator(_valid_quantity)]  # YAML may give 4 for "4"
Int32 = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _Strict(BaseModel):  # KubeRay objects, and the small Kubernetes ones modelled in full
    model_config = ConfigDict(extra="forbid", strict=True)


class _Loose(BaseModel):  # Kubernetes pod templates: only the fields named here are checked
    model_config = ConfigDict(extra="allow", strict=True)


class Resources(_Strict):
    limits: dict[Literal["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"], Quantity] = {}
    requests: dict[Literal["cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"], Quantity] = {}

    @model_validator(mode="after")
    def _requests_within_limits(self):
        for key in ("cpu", "memory", "nvidia.com/gpu"):
            if key in self.requests and key in self.limits and quantity(self.requests[key]) > quantity(self.limits[key]):
                raise ValueError(f"requests.{key} ({self.requests[key]}) exceeds limits.{key} ({self.limits[key]})")
        return self


class EnvVar(_Strict):
    name: str = Field(min_length=1)
    value: Optional[str] = None
    valueFrom: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.value is None) == (self.valueFrom is None):
            raise ValueError(f"env {self.name}: set exactly one of value, valueFrom")
        return self


class ContainerPort(_Strict):
    containerPort: Annotated[int, Field(ge=1, le=65535)]
    name: Optional[Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?$")]] = None  # IANA_SVC_NAME
    protocol: Optional[Literal["TCP", "UDP", "SCTP"]] = None


class Container(_Loose):
    name: str = Field(min_length=1)
    image: str = Field(min_length=1)
    env: list[EnvVar] = []
    resources: Resources = Resources()
    ports: list[ContainerPort] = []


class PodSpec(_Loose):
    containers: list[Container] = Field(min_length=1)


class PodTemplate(_Loose):
    spec: PodSpec


class AutoscalerOptions(_Strict):
    resources: Optional[Resources] = None
    idleTimeoutSeconds: Optional[Int32] = None
    upscalingMode: Optional[Literal["Default", "Aggressive", "Conservative"]] = None


class HeadGroupSpec(_Strict):
    rayStartParams: dict[str, str]  # map[string]string: a bare `num-cpus: 0` is an error
    template: PodTemplate
    serviceType: Optional[Literal["ClusterIP", "NodePort", "LoadBalancer"]] = None


class WorkerGroupSpec(_Strict):
    groupName: str = Field(min_length=1)
    replicas: Optional[Int32] = None
    minReplicas: Int32 = 0
    maxReplicas: Int32 = 2**31 - 1
    rayStartParams: dict[str, str]
    template: PodTemplate

    @model_validator(mode="after")
    def _replica_bounds(self):
        low, high = self.minReplicas, self.maxReplicas
        if low > high:
            raise ValueError(f"group {self.groupName}: minReplicas ({low}) > maxReplicas ({high})")
        if self.replicas is not None and not low <= self.replicas <= high:
            raise ValueError(f"group {self.groupName}: replicas ({self.replicas}) outside [minReplicas, maxReplicas] = [{low}, {high}]")
        return self


class RayClusterSpec(_Strict):
    rayVersion: Optional[str] = None
    enableInTreeAutoscaling: Optional[bool] = None
    autoscalerOptions: Optional[AutoscalerOptions] = None
    headGroupSpec: HeadGroupSpec
    workerGroupSpecs: list[WorkerGroupSpec] = []

    @field_validator("workerGroupSpecs")
    @classmethod
    def _unique_group_names(cls, groups):
        if duplicates := sorted(name for name, n in Counter(g.groupName for g in groups).items() if n > 1):
            raise ValueError(f"duplicate groupName {duplicates}")
        return groups


class RayJobSpec(_Strict):
    entrypoint: Optional[str] = None
    runtimeEnvYAML: Optional[str] = None
    entrypointNumCpus: Optional[float] = None
    shutdownAfterJobFinishes: Optional[bool] = None
    ttlSecondsAfterFinished: Optional[Int32] = None
    activeDeadlineSeconds: Optional[Annotated[int, Field(gt=0, le=2**31 - 1)]] = None
    rayClusterSpec: Optional[RayClusterSpec] = None
    submitterPodTemplate: Optional[PodTemplate] = None


class UpgradeStrategy(_Strict):
    type: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]


class RayServiceSpec(_Strict):
    serveConfigV2: str = Field(min_length=1)
    rayClusterConfig: RayClusterSpec
    upgradeStrategy: Optional[UpgradeStrategy] = None
    serveService: Optional[dict[str, Any]] = None


class _Object(_Strict):
    apiVersion: Literal["ray.io/v1"]
    metadata: dict[str, Any]


class RayCluster(_Object):
    kind: Literal["RayCluster"]
    spec: RayClusterSpec


class RayJob(_Object):
    kind: Literal["RayJob"]
    spec: RayJobSpec


class RayService(_Object):
    kind: Literal["RayService"]
    spec: RayServiceSpec


# Validators: each takes a loaded manifest and raises a ValueError (pydantic's ValidationError is one) naming the field.
def _repo_scripts(command: str) -> list[str]:
    """The repository-relative .py/.sh paths a shell command names."""
    return [token for token in shlex.split(command) if token.endswith((".py", ".sh"))
            and not token.startswith(("/", "~", "$", "-")) and "://" not in token]


def _check_scripts_exist(command: str, field: str) -> None:
    if missing := [script for script in _repo_scripts(command) if not (REPO / script).is_file()]:
        raise ValueError(f"{field}: {missing} not in the repository")


def _check_cluster(spec: RayClusterSpec, at: str, submitter: Optional[PodTemplate] = None) -> None:
    if spec.rayVersion != RAY_VERSION:
        raise ValueError(f"{at}.rayVersion is {spec.rayVersion!r}, the installed Ray is {RAY_VERSION!r}")
    templates = {f"{at}.headGroupSpec.template": spec.headGroupSpec.template,
                 **{f"{at}.workerGroupSpecs.{i}.template": group.template for i, group in enumerate(spec.workerGroupSpecs)}}
    if submitter is not None:
        templates["spec.submitterPodTemplate"] = submitter
    images = {f"{path}.spec.containers.{i}.image": container.image
              for path, template in templates.items() for i, container in enumerate(template.spec.containers)}
    for path, template in templates.items():  # every Ray node is scraped (kuberay/podmonitor.yaml)
        if path == "spec.submitterPodTemplate":
            continue
        ports = {port.name: port.containerPort for port in template.spec.containers[0].ports}
        if ports.get(METRICS_PORT_NAME) != METRICS_PORT:
            raise ValueError(f"{path}.spec.containers.0.ports: no port {METRICS_PORT_NAME!r} ({METRICS_PORT}), "
                             "where Prometheus scrapes the node")
    usual = Counter(images.values()).most_common(1)[0][0]
    if odd := [f"{field} is {image!r}" for field, image in images.items() if image != usual]:
        raise ValueError(f"all containers must run one image ({usual!r}): " + ", ".join(odd))


METRICS_PORT, METRICS_PORT_NAME = 8080, "metrics"  # KubeRay's --metrics-export-port


class PodMetricsEndpoint(_Strict):
    port: Literal["metrics"]
    path: Literal["/metrics"] = "/metrics"
    interval: Optional[Annotated[str, Field(pattern=r"^([0-9]+(ms|s|m|h))+$")]] = None
    relabelings: list[dict[str, Any]] = []


class PodMonitorSpec(_Strict):
    jobLabel: Optional[str] = None
    namespaceSelector: dict[Literal["any", "matchNames"], Any] = {}
    selector: dict[Literal["matchLabels"], dict[str, str]]
    podMetricsEndpoints: list[PodMetricsEndpoint] = Field(min_length=1)


class PodMonitor(_Strict):
    apiVersion: Literal["monitoring.coreos.com/v1"]
    kind: Literal["PodMonitor"]
    metadata: dict[str, Any]
    spec: PodMonitorSpec


def validate_podmonitor(doc: dict) -> None:
    """The Prometheus Operator's PodMonitor (a strict subset), selecting the pods of every Ray manifest here."""
    selector = PodMonitor.model_validate(doc).spec.selector["matchLabels"]
    kuberay = {"ray.io/is-ray-node": "yes"}  # what KubeRay puts on every Ray pod
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml"):
        for at, labels in _pod_labels(manifest(name)):
            if missing := {k: v for k, v in selector.items() if {**labels, **kuberay}.get(k) != v}:
                raise ValueError(f"spec.selector.matchLabels {missing} does not select {name} {at}")


def _pod_labels(doc: dict):
    """(where, labels) of each Ray pod template in a KubeRay manifest."""
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
    groups = [("headGroupSpec", spec["headGroupSpec"])] + [(f"workerGroupSpecs.{i}", g) for i, g in enumerate(spec["workerGroupSpecs"])]
    for at, group in groups:
        yield at, group["template"].get("metadata", {}).get("labels", {})


def validate_dashboard(doc: dict) -> None:
    """The Grafana dashboard charts every metric in spinml_ray/ray_layer/metrics.py, by the name Prometheus gives it,
    and no other spinml metric; panels have unique ids and a templated Prometheus data source."""
    from spinml_ray.ray_layer.metrics import NAMES

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    exported = {f"ray_{name}{suffix}": name for name, (kind, _, _) in NAMES.items() for suffix in suffixes[kind]}
    charted, ids = set(), Counter(panel["id"] for panel in doc["panels"])
    if doubled := [i for i, n in ids.items() if n > 1]:
        raise ValueError(f"panels: ids {doubled} are used twice")
    for i, panel in enumerate(doc["panels"]):
        for j, target in enumerate(panel["targets"]):
            if target.get("datasource", {}).get("uid") != "${datasource}":
                raise ValueError(f"panels.{i}.targets.{j}.datasource: not the dashboard's ${{datasource}}")
            for metric in re.findall(r"\bray_spinml_\w+", target["expr"]):
                if metric not in exported:
                    raise ValueError(f"panels.{i}.targets.{j}.expr: {metric} is not a metric spinml-ray exports")
                charted.add(exported[metric])
    if missing := sorted(set(NAMES) - charted):
        raise ValueError(f"panels: no chart for {missing}")


def validate_raycluster(doc: dict) -> None:
    _check_cluster(RayCluster.model_validate(doc).spec, "spec")


def validate_rayjob(doc: dict) -> None:
    spec = RayJob.model_validate(doc).spec
    if spec.rayClusterSpec is None:
        raise ValueError("spec.rayClusterSpec: missing (the job runs on a cluster created for it)")
    _check_cluster(spec.rayClusterSpec, "spec.rayClusterSpec", spec.submitterPodTemplate)
    if not _repo_scripts(spec.entrypoint or ""):
        raise ValueError(f"spec.entrypoint {spec.entrypoint!r} runs no repository script")
    _check_scripts_exist(spec.entrypoint, "spec.entrypoint")


def validate_serve_config(config: dict, at: str = "") -> None:
    """Ray's ServeDeploySchema, then what Ray cannot know: the builder, its args and deployment names."""
    from ray.serve.schema import ServeDeploySchema

    from spinml_ray.ray_layer import service

    prefix = f"{at}." if at else ""
    try:
        deploy = ServeDeploySchema.model_validate(config)
    except Exception as exc:  # Ray's pydantic error, re-raised with where it came from
        raise ValueError(f"{at or 'serve config'}: {exc}") from None
    for i, app in enumerate(deploy.applications):
        field = f"{prefix}applications.{i}"
        if app.import_path != "spinml_ray.ray_layer.service:app_builder":
            raise ValueError(f"{field}.import_path {app.import_path!r} is not spinml_ray.ray_layer.service:app_builder")
        if (app.name, app.route_prefix) != (service.APP_NAME, service.ROUTE_PREFIX):
            raise ValueError(f"{field}.name/route_prefix must be {service.APP_NAME!r} and {service.ROUTE_PREFIX!r}, "
                             "which the batch job and the docs use")
        try:
            service.SynthesisAppArgs.model_validate(app.args)
        except ValueError as exc:
            raise ValueError(f"{field}.args: {exc}") from None
        known = {"DiffusionDeployment", "SynthesisAPI"}
        for j, deployment in enumerate(app.deployments):
            if deployment.name not in known:
                raise ValueError(f"{field}.deployments.{j}.name {deployment.name!r} is not one of {sorted(known)}")


def validate_rayservice(doc: dict) -> None:
    spec = RayService.model_validate(doc).spec
    _check_cluster(spec.rayClusterConfig, "spec.rayClusterConfig")
    try:
        config = yaml.safe_load(spec.serveConfigV2)
    except yaml.YAMLError as exc:
        raise ValueError(f"spec.serveConfigV2: not YAML: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError("spec.serveConfigV2: not a Serve config (a mapping)")
    validate_serve_config(config, "spec.serveConfigV2")


@functools.cache
def launcher_schema() -> dict:  # found through the wheel's file list: no Ray module is imported
    return json.loads(Path(importlib.metadata.distribution("ray").locate_file("ray/autoscaler/ray-schema.json")).read_text())


def _commands(node: Any, at: str = ""):
    """(field, command) for every *_commands list in the launcher config, at any depth."""
    for key, value in node.items() if isinstance(node, dict) else ():
        field = f"{at}.{key}" if at else str(key)
        if str(key).endswith("_commands") and isinstance(value, list):
            yield from ((f"{field}.{i}", command) for i, command in enumerate(value))
        else:
            yield from _commands(value, field)


def validate_launcher(cfg: dict) -> None:
    errors = sorted(jsonschema.Draft7Validator(launcher_schema()).iter_errors(cfg), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        raise ValueError("; ".join(f"{'.'.join(map(str, e.absolute_path)) or '<top level>'}: {e.message}" for e in errors))
    if cfg.get("head_node_type") not in cfg.get("available_node_types", {}):
        raise ValueError(f"head_node_type {cfg.get('head_node_type')!r} is not one of available_node_types")
    docker = cfg.get("docker", {})
    images = {f"docker.{key}": docker[key] for key in ("image", "head_image", "worker_image") if key in docker}
    images.update({f"available_node_types.{name}.docker.worker_image": node["docker"]["worker_image"]
                   for name, node in cfg["available_node_types"].items() if "worker_image" in node.get("docker", {})})
    for field, image in images.items():
        if not re.match(rf"{re.escape(RAY_VERSION)}(-|$)", image.rpartition("/")[2].partition(":")[2]):
            raise ValueError(f"{field} {image!r}: the tag does not name the installed Ray {RAY_VERSION}")
    for field, command in _commands(cfg):
        _check_scripts_exist(command, field)
    for target, source in cfg.get("file_mounts", {}).items():
        if not source.startswith(("/", "~")) and not (REPO / source).exists():
            raise ValueError(f"file_mounts.{target}: source {source} is not in the repository")


VALIDATORS = {"aws-launcher.yaml": validate_launcher, "kuberay/raycluster.yaml": validate_raycluster,
              "kuberay/rayjob.yaml": validate_rayjob, "kuberay/rayservice.yaml": validate_rayservice,
              "serve-config.yaml": validate_serve_config, "kuberay/podmonitor.yaml": validate_podmonitor,
              "grafana/spinml.json": validate_dashboard}


class Rename(str):  # as an edit's value: rename the key to this
    pass


DROP = object()  # as an edit's value: delete the key


def edit(doc: dict, path: str, value: Any) -> None:
    """Set (or append, at index len), rename or drop the item at a dotted path ("spec.workerGroupSpecs.0.groupName")."""
    *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
    for part in parents:
        doc = doc[part]
    if value is DROP:
        del doc[last]
    elif isinstance(value, Rename):
        doc[value] = doc.pop(last)
    elif isinstance(doc, list) and last == len(doc):
        doc.append(value)
    else:
        doc[last] = value


L, C, J, S, V = "aws-launcher.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "kuberay/rayservice.yaml", "serve-config.yaml"
HEAD, GPU = "spec.headGroupSpec.template.spec.containers.0", "spec.workerGroupSpecs.1.template.spec.containers.0"
JC, JHEAD = "spec.rayClusterSpec", "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0"
M, D = "kuberay/podmonitor.yaml", "grafana/spinml.json"


@pytest.mark.parametrize("name, edits", [
    *(pytest.param(name, {}, id=name) for name in VALIDATORS),
    # Options the manifests' comments offer, and other spellings of the same values, stay accepted.
    pytest.param(L, {"provider.availability_zone": "us-west-2a,us-west-2b", "available_node_types.gpu_worker.node_config.ImageId": "ami-0123",
                     "available_node_types.cpu_worker.node_config.InstanceMarketOptions": {"MarketType": "spot"}}, id="launcher-options"),
    pytest.param(C, {f"{HEAD}.env.6": {"name": "HF_HUB_OFFLINE", "value": "1"}, f"{GPU}.resources.requests.memory": "32768Mi",
                     f"{GPU}.resources.limits.cpu": 8, "spec.workerGroupSpecs.1.template.spec.serviceAccountName": "spinml"}, id="raycluster-options"),
    pytest.param(J, {"spec.runtimeEnvYAML": 'working_dir: "s3://BUCKET/code/spinml-ray.zip"\n', "spec.activeDeadlineSeconds": 21600},
                 id="rayjob-options"),
])
def test_manifest_is_valid(name, edits):
    doc = manifest(name)
    for path, value in edits.items():
        edit(doc, path, value)
    VALIDATORS[name](doc)


@pytest.mark.parametrize("name, path, value, expected", [
    pytest.param(L, "max_worker", 4, "max_worker", id="launcher-unknown-top-level-key"),
    pytest.param(L, "docker.pull_before_run", Rename("pull_before_runs"), "pull_before_runs", id="launcher-misspelled-docker-key"),
    pytest.param(L, "available_node_types.gpu_worker.resources.GPU", "1", "available_node_types.gpu_worker.resources.GPU", id="launcher-type"),
    pytest.param(L, "head_node_type", "head_node", "head_node_type", id="launcher-head-node-type"),
    pytest.param(L, "docker.image", "rayproject/ray:2.9.3-py311-gpu", "docker.image", id="launcher-image-version"),
    pytest.param(L, "docker.worker_image", "rayproject/ray:latest-gpu", "docker.worker_image", id="launcher-worker-image-version"),
    pytest.param(L, "head_setup_commands", ["bash cluster/no-such.sh"], ("head_setup_commands.0", "cluster/no-such.sh"), id="launcher-missing-script"),
    pytest.param(L, "file_mounts./remote/x", "./no-such-dir", "file_mounts./remote/x", id="launcher-missing-file-mount"),
    pytest.param(C, "apiVersion", "ray.io/v1alpha1", "apiVersion", id="cluster-api-version"),
    pytest.param(C, "kind", "RayService", "kind", id="cluster-kind"),
    pytest.param(C, "spec.workerGroupSpecs", Rename("workerGroupSpec"), "spec.workerGroupSpec", id="cluster-misspelled-field"),
    pytest.param(C, "spec.headGroupSpec.rayVersion", RAY_VERSION, "spec.headGroupSpec.rayVersion", id="cluster-misplaced-field"),
    pytest.param(C, "spec.rayVersion", "2.9.3", "spec.rayVersion", id="cluster-ray-version"),
    pytest.param(C, "spec.rayVersion", 2.6, "spec.rayVersion", id="cluster-ray-version-unquoted"),
    pytest.param(C, "spec.enableInTreeAutoscaling", "true", "spec.enableInTreeAutoscaling", id="cluster-bool-as-string"),
    pytest.param(C, "spec.autoscalerOptions.upscalingMode", "Fast", "spec.autoscalerOptions.upscalingMode", id="cluster-upscaling-mode"),
    pytest.param(C, "spec.headGroupSpec.rayStartParams.num-cpus", 0, "spec.headGroupSpec.rayStartParams.num-cpus", id="cluster-start-param-int"),
    pytest.param(C, "spec.workerGroupSpecs.0.minReplicas", 9, ("spec.workerGroupSpecs.0", "minReplicas (9) > maxReplicas (8)"), id="cluster-min-above-max"),
    pytest.param(C, "spec.workerGroupSpecs.1.replicas", 9, ("spec.workerGroupSpecs.1", "replicas (9) outside"), id="cluster-replicas-above-max"),
    pytest.param(C, "spec.workerGroupSpecs.1.groupName", "cpu", ("spec.workerGroupSpecs", "duplicate groupName ['cpu']"), id="cluster-duplicate-group"),
    pytest.param(C, f"{HEAD}.image", DROP, (f"{HEAD}.image", "Field required"), id="cluster-container-without-image"),
    pytest.param(C, f"{GPU}.image", "REGISTRY/spinml-ray:0.2.0", f"{GPU}.image", id="cluster-image-mismatch"),
    pytest.param(C, f"{GPU}.resources.limits.gpu", "1", f"{GPU}.resources.limits.gpu", id="cluster-resource-name"),
    pytest.param(C, f"{HEAD}.resources.requests.memory", "16 GB", f"{HEAD}.resources.requests.memory", id="cluster-quantity"),
    pytest.param(C, f"{GPU}.resources.requests.memory", "32769Mi", (f"{GPU}.resources", "requests.memory (32769Mi) exceeds limits.memory (32Gi)"),
                 id="cluster-requests-above-limits"),
    pytest.param(C, f"{HEAD}.env.0.valueFrom", {"secretKeyRef": {"name": "s", "key": "k"}}, (f"{HEAD}.env.0", "exactly one of value, valueFrom"),
                 id="cluster-env-two-sources"),
    pytest.param(J, JC, Rename("rayClusterSpecs"), "spec.rayClusterSpecs", id="job-misspelled-field"),
    pytest.param(J, f"{JC}.entrypoint", "python jobs/run_request.py", f"{JC}.entrypoint", id="job-misplaced-field"),
    pytest.param(J, "spec.ttlSecondsAfterFinished", "600", "spec.ttlSecondsAfterFinished", id="job-int-as-string"),
    pytest.param(J, JC, DROP, JC, id="job-no-cluster"),
    pytest.param(J, f"{JC}.rayVersion", "2.59.0", f"{JC}.rayVersion", id="job-ray-version"),
    pytest.param(J, f"{JC}.workerGroupSpecs.1.rayStartParams.num-gpus", 1, f"{JC}.workerGroupSpecs.1.rayStartParams.num-gpus", id="job-start-param-int"),
    pytest.param(J, f"{JC}.workerGroupSpecs.1.minReplicas", 3, (f"{JC}.workerGroupSpecs.1", "minReplicas (3) > maxReplicas (2)"), id="job-min-above-max"),
    pytest.param(J, f"{JHEAD}.image", "rayproject/ray:2.60.0-py311-gpu", f"{JHEAD}.image", id="job-image-mismatch"),
    pytest.param(J, "spec.entrypoint", "python jobs/no_such_job.py --storage s3://B/x", ("spec.entrypoint", "jobs/no_such_job.py"), id="job-missing-script"),
    pytest.param(J, "spec.entrypoint", "python -m spinml_ray.cli run", "spec.entrypoint", id="job-entrypoint-without-script"),
    pytest.param(V, "applications.0.import_path", "spinml_ray.ray_layer.service:build", "applications.0.import_path", id="serve-import-path"),
    pytest.param(V, "applications.0.args.max_batch", 8, ("applications.0.args", "max_batch"), id="serve-unknown-arg"),
    pytest.param(V, "applications.0.args.max_batch_size", 0, ("applications.0.args", "max_batch_size"), id="serve-bad-arg"),
    pytest.param(V, "applications.0.deployments.0.name", "Diffusion", "applications.0.deployments.0.name", id="serve-unknown-deployment"),
    pytest.param(V, "applications.0.route_prefix", "/synthesis", "applications.0.name/route_prefix", id="serve-route-prefix"),
    pytest.param(V, "http_options.port", "eighty", ("serve config", "port"), id="serve-ray-schema"),
    pytest.param(S, "spec.serveConfig", "{}", "spec.serveConfig", id="service-misspelled-field"),
    pytest.param(S, "spec.serveConfigV2", "applications: [", "spec.serveConfigV2", id="service-config-not-yaml"),
    pytest.param(S, "spec.serveConfigV2", "applications:\n  - {name: spinml-synthesis, route_prefix: /spinml,\n"
                 "     import_path: spinml_ray.ray_layer.service:app_builder, args: {modle: tiny}}\n",
                 ("spec.serveConfigV2.applications.0.args", "modle"), id="service-config-bad-arg"),
    pytest.param(S, "spec.rayClusterConfig.rayVersion", "2.59.0", "spec.rayClusterConfig.rayVersion", id="service-ray-version"),
    pytest.param(C, f"{GPU}.ports", DROP, ("spec.workerGroupSpecs.1.template.spec.containers.0.ports", "'metrics'"),
                 id="cluster-worker-not-scraped"),
    pytest.param(S, "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.ports.3.containerPort", 9090,
                 "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.ports", id="service-head-metrics-port"),
    pytest.param(M, "spec.podMetricsEndpoints.0.port", "metric", "spec.podMetricsEndpoints.0.port", id="monitor-port-name"),
    pytest.param(M, "spec.selector.matchLabels.app", "spinml", ("spec.selector.matchLabels", "kuberay/raycluster.yaml"), id="monitor-selects-nothing"),
    pytest.param(M, "apiVersion", "monitoring.coreos.com/v1beta1", "apiVersion", id="monitor-api-version"),
    pytest.param(D, "panels.0.targets.0.expr", "sum(rate(ray_spinml_request_total[5m]))", "panels.0.targets.0.expr", id="dashboard-unknown-metric"),
    pytest.param(D, "panels.2.targets.0.expr", "sum(rate(ray_spinml_images_generated[5m]))", "panels.2.targets.0.expr",
                 id="dashboard-counter-without-total"),
    pytest.param(D, "panels.4", DROP, ("panels", "spinml_diffusion_queue_depth"), id="dashboard-metric-not-charted"),
    pytest.param(D, "panels.1.id", 1, ("panels", "ids [1]"), id="dashboard-duplicate-id"),
])
def test_broken_manifest_is_rejected(name, path, value, expected):
    doc = manifest(name)
    edit(doc, path, value)
    with pytest.raises(ValueError) as raised:
        VALIDATORS[name](doc)
    for part in (expected,) if isinstance(expected, str) else expected:  # named whole: "workerGroupSpec" is not "workerGroupSpecs"
        assert re.search(re.escape(part) + r"(?![\w-])", str(raised.value)), f"{part!r} not named in: {raised.value}"


@pytest.mark.parametrize("text, value", [("500m", Decimal("0.5")), ("16Gi", 16 * 2**30), ("32768Mi", 32 * 2**30),
                                         ("1e3", 1000), ("1.5k", 1500), (".5", Decimal("0.5")), (4, 4)])
def test_quantity_value(text, value):
    assert quantity(text) == value


@pytest.mark.parametrize("text", ["16 GB", "1.5.0", "Gi", "", "1Kb", "-"])
def test_quantity_rejects_malformed(text):
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity(text)


def test_the_rayservice_deploys_the_serve_config():
    """One application, two files: the RayService's serveConfigV2 is cluster/serve-config.yaml."""
    assert yaml.safe_load(manifest(S)["spec"]["serveConfigV2"]) == manifest(V)


def test_every_file_in_cluster_is_checked():
    """A manifest added to cluster/ without a check fails here (scripts and READMEs are checked elsewhere)."""
    files = {str(p.relative_to(REPO / "cluster")) for p in (REPO / "cluster").rglob("*") if p.suffix in (".yaml", ".yml", ".json")}
    assert files == set(VALIDATORS)


def test_the_application_builds_before_ray_is_connected():
    """`serve run ...:app_builder` builds the application before it starts or joins Ray."""
    import subprocess
    import sys

    script = ("import ray\nfrom spinml_ray.ray_layer.service import SynthesisAppArgs, app_builder\n"
              "app = app_builder(SynthesisAppArgs(model='tiny', storage_root='/tmp/spinml'))\n"
              "assert not ray.is_initialized(), 'the builder connected to Ray'\n"
              "print(type(app).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("Application")
