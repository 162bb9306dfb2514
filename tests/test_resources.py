"""The batch job's resource plan (`spinml_ray/resources.py`): concrete plans and invariants."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spinml_ray.resources import (
    Ask,
    ResourcePlan,
    sanitize_workers,
    synthesis_gpu_share,
    training_cpus,
)
from spinml_ray.spec import PersonalizationSpec, TrainingSpec

CPUS = st.one_of(st.integers(1, 256), st.floats(1, 256, allow_nan=False))
GPUS = st.integers(0, 16)
CONCURRENT = st.none() | st.integers(1, 64)
REQUESTS = st.none() | st.integers(0, 200)


def test_module_is_pure():
    """Importing the plan never imports Ray (it is read by code that runs before Ray is up)."""
    code = "import sys, spinml_ray.resources; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("gpus, share", [(0, 0.0), (0.0, 0.0), (1, 0.5), (1.5, 0.5), (2, 1.0), (8, 1.0)])
def test_synthesis_gpu_share(gpus, share):
    assert synthesis_gpu_share(gpus) == share


def test_helpers_keep_todays_rules():
    assert training_cpus(2, 1) == 2 and training_cpus(2, 2) == 1 and training_cpus(2, 16) == 1
    assert training_cpus(16, 4, reserved=1) == 3 and training_cpus(2, 1, reserved=1) == 1
    assert training_cpus(16, 0) == 16  # no concurrency counts as one
    assert [sanitize_workers(c) for c in (1, 2, 3, 4, 9, 16, 64, 4.9)] == [1, 1, 2, 3, 8, 8, 8, 3]


def test_defaults_follow_the_request_spec():
    plan = ResourcePlan.plan(16, 1)
    assert plan.fleet.gpu_fraction == TrainingSpec().gpu_fraction == 0.25
    assert plan.personalization.gpus == PersonalizationSpec().gpu_fraction == 0.5


# (cpus, gpus, concurrent, requests) -> (max_concurrent, slots, cpus_per_slot, sanitize workers)
CASES = {
    (1, 0, None, None): (1, 1, 1, 1),
    (2, 0, None, None): (1, 1, 1, 1),
    (4, 0, None, None): (2, 2, 1, 3),
    (16, 0, None, None): (8, 8, 1, 8),
    (64, 0, None, None): (32, 32, 1, 8),
    (16, 0, 2, None): (2, 2, 7, 8),
    (16, 0, 1, None): (1, 1, 15, 8),
    (2, 0, 4, None): (4, 1, 1, 1),
    (64, 0, None, 5): (32, 5, 12, 8),
    (64, 0, 4, 3): (4, 3, 21, 8),
    (16, 0, None, 0): (8, 1, 15, 8),
    (1, 1, None, None): (1, 1, 0, 1),
    (2, 1, None, None): (1, 1, 0, 1),
    (4, 1, None, None): (2, 2, 0, 3),
    (16, 1, None, None): (8, 2, 0, 8),
    (64, 1, None, None): (32, 2, 0, 8),
    (16, 2, None, None): (8, 4, 0, 8),
    (2, 2, None, None): (1, 1, 0, 1),
    (4, 8, None, None): (2, 2, 0, 3),
    (16, 8, None, None): (8, 8, 0, 8),
    (64, 8, None, None): (32, 28, 0, 8),
    (64, 8, None, 10): (32, 10, 0, 8),
}


@pytest.mark.parametrize("inputs, expected", CASES.items(), ids=[str(k) for k in CASES])
def test_concrete_plans(inputs, expected):
    cpus, gpus, concurrent, requests = inputs
    plan = ResourcePlan.plan(cpus, gpus, concurrent, requests)
    fleet = plan.fleet
    assert (plan.max_concurrent, fleet.slots, fleet.cpus_per_slot, plan.sanitize_workers) == expected
    assert plan.synthesis == Ask(gpus=synthesis_gpu_share(gpus), cpus=1.0)
    assert plan.ingress == Ask(0.0, 0.0)
    assert fleet.use_gpu == plan.use_gpu == (gpus > 0)
    if gpus:
        assert fleet.gpu_fraction == 0.25 and fleet.cpus == 0
        assert plan.sam == Ask(gpus=1.0 / plan.sanitize_workers, cpus=1.0)
        assert plan.personalization == Ask(gpus=0.5, cpus=0.0)
    else:
        assert fleet.gpu_fraction == 0.0 and fleet.gpus == 0
        assert plan.sam == Ask(gpus=0.0, cpus=1.0) and plan.personalization == Ask(gpus=0.0, cpus=1.0)


def test_one_gpu_fleet_and_personalization_take_turns():
    """On one GPU the replica (0.5) and a full fleet (2 x 0.25) fill the card: a personalization
    worker (0.5) fits only once idle slots leave for it (`TrainingFleet.making_room`)."""
    plan = ResourcePlan.plan(16, 1)
    assert plan.synthesis.gpus + plan.fleet.gpus == 1.0
    assert plan.synthesis.gpus + plan.personalization.gpus == 1.0
    assert plan.synthesis.gpus + plan.fleet.gpus + plan.personalization.gpus == 1.5


def test_overrides():
    plan = ResourcePlan.plan(16, 2, training_gpu_fraction=0.5, personalization_gpu_fraction=1.0, workers=2)
    assert plan.fleet.slots == 2 and plan.fleet.gpu_fraction == 0.5 and plan.fleet.gpus == 1.0
    assert plan.personalization.gpus == 1.0
    assert plan.sanitize_workers == 2 and plan.sam.gpus == 0.5
    assert ResourcePlan.plan(16, 1, training_gpu_fraction=0.75).fleet.slots == 1  # no room: still one slot
    assert ResourcePlan.plan(16, 1, workers=0).sanitize_workers == 8  # 0 means the default, as in run_sanitize
    with pytest.raises(ValueError):
        ResourcePlan.plan(16, 1, concurrent=0)


@pytest.mark.parametrize("references, pool", [(0, 1), (1, 1), (7, 1), (8, 2), (20, 3), (56, 8), (1000, 8)])
def test_sanitize_pool(references, pool):
    assert ResourcePlan.plan(16, 0).sanitize_pool(references) == pool
    assert ResourcePlan.plan(16, 0).sanitize_pool(references, batch_size=1) == min(8, references + 1)
    assert ResourcePlan.plan(2, 0).sanitize_pool(references) == 1


def test_describe():
    text = ResourcePlan.plan(16, 1).describe()
    assert text.splitlines() == [
        "cluster: 16 CPUs, 1 GPU; 8 request(s) at once",
        "synthesis replica: 0.5 GPU, 1 CPU",
        "synthesis ingress: no CPU or GPU",
        "sanitize (SAM actors): up to 8 per request, 0.125 GPU, 1 CPU each",
        "personalization: 0.5 GPU per worker",
        "training fleet: 2 slot(s), 0.25 GPU each",
    ]
    cpu_only = ResourcePlan.plan(16, 0, concurrent=2).describe()
    assert "training fleet: 2 slot(s), 7 CPUs each" in cpu_only and "synthesis replica: 1 CPU\n" in cpu_only
    assert "1000 CPUs" in ResourcePlan.plan(1000, 0).describe()


def test_plan_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ResourcePlan.plan(4, 0).max_concurrent = 3


@settings(max_examples=300, deadline=None)
@given(cpus=CPUS, gpus=GPUS, concurrent=CONCURRENT, requests=REQUESTS)
def test_invariants(cpus, gpus, concurrent, requests):
    plan = ResourcePlan.plan(cpus, gpus, concurrent, requests)
    fleet = plan.fleet
    assert fleet.slots >= 1 and fleet.cpus_per_slot >= (0 if gpus else 1)
    assert plan.max_concurrent >= 1 and 1 <= plan.sanitize_workers <= 8
    assert fleet.slots <= max(1, plan.max_concurrent if requests is None else min(plan.max_concurrent, requests))
    assert plan.synthesis.cpus == 1.0  # the replica always holds a CPU (on GPU clusters, Serve's default)
    if cpus >= 2:  # a fleet and a full SAM pool each leave the replica its CPU
        assert fleet.cpus_per_slot * fleet.slots + plan.synthesis.cpus <= cpus
        assert fleet.cpus + plan.synthesis.cpus <= cpus
        assert plan.sanitize_workers * plan.sam.cpus + plan.synthesis.cpus <= cpus
    if gpus:  # the fleet fits beside the replica; personalization fits once idle slots leave
        assert plan.synthesis.gpus + fleet.gpus <= gpus
        assert plan.synthesis.gpus + plan.personalization.gpus <= gpus
        assert plan.sanitize_workers * plan.sam.gpus == pytest.approx(1.0)  # a request's SAM: one card at most
    else:
        assert not fleet.use_gpu and plan.synthesis.gpus == plan.sam.gpus == plan.personalization.gpus == 0
    names = ("synthesis replica", "synthesis ingress", "sanitize", "personalization", "training fleet")
    lines = plan.describe().splitlines()
    assert all(sum(line.startswith(name) for line in lines) == 1 for name in names)


@settings(max_examples=200, deadline=None)
@given(cpus=CPUS, gpus=GPUS, concurrent=st.integers(1, 64), requests=REQUESTS)
def test_fewer_requests_never_grow_the_fleet(cpus, gpus, concurrent, requests):
    alone = ResourcePlan.plan(cpus, gpus, concurrent).fleet
    batch = ResourcePlan.plan(cpus, gpus, concurrent, requests).fleet
    assert batch.slots <= alone.slots
