"""The resource plan of a batch job: what each kind of Ray work asks of the cluster, in one place.

Plain arithmetic over the cluster's CPU and GPU counts (nothing here imports Ray); the Ray layer
reads the plan where it starts each piece of work. The asks are Ray's logical resources: they decide
how Ray packs work onto nodes, not how much memory a process may use. Where today's code leaves an
ask to Ray's default, the plan states that default (Ray 2.x): a Serve replica and a Ray Data actor
hold one CPU unless told otherwise, a Ray Train worker with a GPU share holds no CPU, and one
without GPUs holds one CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from spinml_ray.spec import PersonalizationSpec, TrainingSpec

TRAINING_GPU_FRACTION = TrainingSpec().gpu_fraction  # the fleet's slot share: the requests' default
PERSONALIZATION_GPU_FRACTION = PersonalizationSpec().gpu_fraction
REPLICA_CPUS = 1.0  # `SynthesisAppArgs.cpus_per_replica`, and Serve's own default beside a GPU share
MAX_SANITIZE_WORKERS = 8


def synthesis_gpu_share(gpus: float) -> float:
    """The synthesis replica's GPU share: a whole card where there are two or more; on a one-GPU
    machine half of it, so that what asks for GPU shares while the service is up (SAM, personalization,
    the training fleet) still fits beside it instead of waiting for a card the service never gives back."""
    if gpus <= 0:
        return 0.0
    return 1.0 if gpus >= 2 else 0.5


def training_cpus(cluster_cpus: float, concurrent: int, reserved: float = 0) -> int:
    """CPUs (and threads) of each training when `concurrent` trainings share the cluster's CPUs less
    `reserved` ones (the synthesis replica's): a lone training gets the whole machine, none gets below one."""
    return max(1, int((cluster_cpus - reserved) // max(1, concurrent)))


def sanitize_workers(cpus: float) -> int:
    """SanitizeWorker actors per request: one per CPU but one, at most eight, never none. At its
    largest the pool leaves a CPU free (in a batch job, the one the synthesis replica holds)."""
    return max(1, min(MAX_SANITIZE_WORKERS, int(cpus) - 1))


@dataclass(frozen=True)
class Ask:
    """What one process (replica, actor, worker) asks Ray for."""

    gpus: float = 0.0
    cpus: float = 0.0


@dataclass(frozen=True)
class Fleet:
    """The training fleet (`fleet.TrainingFleet`): one-worker slots, each holding `gpu_fraction` of a
    GPU (and no CPU) on GPU clusters, else `cpus_per_slot` CPUs and as many torch threads."""

    slots: int
    cpus_per_slot: int
    use_gpu: bool
    gpu_fraction: float

    @property
    def gpus(self) -> float:
        return self.slots * self.gpu_fraction if self.use_gpu else 0.0

    @property
    def cpus(self) -> float:
        return 0.0 if self.use_gpu else float(self.slots * self.cpus_per_slot)


@dataclass(frozen=True)
class ResourcePlan:
    """What every consumer of a batch job asks for; build it with `ResourcePlan.plan`."""

    cpus: float
    gpus: float
    max_concurrent: int  # requests a batch runs at once
    synthesis: Ask  # one Serve replica of DiffusionDeployment
    ingress: Ask  # SynthesisAPI: it only routes calls to the replica
    sanitize_workers: int  # the largest SAM actor pool of one request (`sanitize_pool` caps it further)
    sam: Ask  # each SanitizeWorker actor, when SAM is needed
    personalization: Ask  # each personalization worker
    fleet: Fleet

    @property
    def use_gpu(self) -> bool:
        """Whether personalization, training and SAM run on GPUs: whenever the cluster has any."""
        return self.gpus > 0

    @classmethod
    def plan(cls, cpus: float, gpus: float, concurrent: int | None = None, requests: int | None = None,
             training_gpu_fraction: float = TRAINING_GPU_FRACTION,
             personalization_gpu_fraction: float = PERSONALIZATION_GPU_FRACTION,
             workers: int | None = None) -> ResourcePlan:
        """The plan for a cluster of `cpus` CPUs and `gpus` GPUs running `requests` requests (None:
        unknown), at most `concurrent` at once (None: about one per two CPUs). `workers` overrides the
        SAM pool's size, as `run_sanitize(workers=)` does."""
        if concurrent is not None and concurrent < 1:
            raise ValueError(f"concurrent must be at least 1, not {concurrent}")
        max_concurrent = concurrent if concurrent is not None else max(1, int(cpus) // 2)
        # the fleet has a slot per request that can train at once: no more than the batch holds
        at_once = max_concurrent if requests is None else min(max_concurrent, requests)
        share = synthesis_gpu_share(gpus)
        pool = workers or sanitize_workers(cpus)
        if gpus > 0:
            # never more slots than the GPU shares left beside the replica, so a slot never waits on
            # resources the service keeps for the whole job (at least one slot, though)
            room = int((gpus - share) / training_gpu_fraction + 1e-9)
            fleet = Fleet(max(1, min(at_once, room)), cpus_per_slot=0, use_gpu=True,
                          gpu_fraction=training_gpu_fraction)
        else:
            # the replica holds a CPU on CPU-only clusters; the slots share the rest evenly
            per_slot = training_cpus(cpus, at_once, reserved=REPLICA_CPUS)
            slots = max(1, min(at_once, int((cpus - REPLICA_CPUS) // per_slot)))
            fleet = Fleet(slots, cpus_per_slot=per_slot, use_gpu=False, gpu_fraction=0.0)
        return cls(
            cpus=cpus, gpus=gpus, max_concurrent=max_concurrent,
            synthesis=Ask(gpus=share, cpus=REPLICA_CPUS), ingress=Ask(),
            # the pool's actors together ask for at most one GPU, so each request's SAM fits on one card
            sanitize_workers=pool, sam=Ask(gpus=1.0 / pool if gpus > 0 else 0.0, cpus=1.0),
            # a share of a GPU each, so several requests' adapters train side by side
            personalization=Ask(gpus=personalization_gpu_fraction) if gpus > 0 else Ask(cpus=1.0),
            fleet=fleet,
        )

    def sanitize_pool(self, references: int, batch_size: int = 8) -> int:
        """The request's actor pool at its largest (`ActorPoolStrategy(min_size=1, max_size=...)`, Ray
        Data's only concurrency setting): no more actors than its batches of references, plus one."""
        return min(self.sanitize_workers, max(1, references // batch_size + 1))

    def describe(self) -> str:
        """A line per consumer, to print as a batch starts."""
        fleet = self.fleet
        each = _amount(fleet.gpu_fraction, "GPU") if fleet.use_gpu else _amount(fleet.cpus_per_slot, "CPU")
        return "\n".join([
            f"cluster: {_amount(self.cpus, 'CPU')}, {_amount(self.gpus, 'GPU')}; {self.max_concurrent} request(s) at once",
            f"synthesis replica: {_ask(self.synthesis)}",
            f"synthesis ingress: {_ask(self.ingress)}",
            f"sanitize (SAM actors): up to {self.sanitize_workers} per request, {_ask(self.sam)} each",
            f"personalization: {_ask(self.personalization)} per worker",
            f"training fleet: {fleet.slots} slot(s), {each} each",
        ])


def _amount(value: float, unit: str) -> str:
    number = str(int(value)) if value == int(value) else f"{value:.3g}"
    return f"{number} {unit}" + ("s" if value == 0 or value > 1 else "")


def _ask(ask: Ask) -> str:
    parts = [_amount(v, unit) for v, unit in ((ask.gpus, "GPU"), (ask.cpus, "CPU")) if v]
    return ", ".join(parts) or "no CPU or GPU"
