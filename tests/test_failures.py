"""Lost nodes and processes: recognised through Ray's wrappers, retried where that is safe, and named
in the request's error (no cluster needed: Ray's exceptions and a stand-in deployment handle)."""

import asyncio

import pytest
from ray.exceptions import ActorDiedError, NodeDiedError, RayTaskError, WorkerCrashedError

from spinml_ray.errors import StageError
from spinml_ray.ray_layer.cluster import failure_reason, lost_process
from spinml_ray.ray_layer.synthesize import generate
from spinml_ray.synthesis.workitems import WorkItem


def _raised_from(inner: BaseException, *wrappers: type) -> BaseException:
    """`inner` wrapped as stages wrap errors (`raise Outer(...) from inner`), outermost last."""
    caught = inner
    for wrapper in wrappers:
        try:
            raise wrapper(f"wrapped: {caught}") from caught
        except wrapper as exc:
            caught = exc
    return caught


@pytest.mark.parametrize("inner", [ActorDiedError(), NodeDiedError("node 1 died"), WorkerCrashedError()])
def test_a_lost_process_is_found_however_deep_it_is_wrapped(inner):
    for depth in range(3):
        exc = _raised_from(inner, *[RuntimeError, StageError][:depth])
        assert lost_process(exc) == type(inner).__name__
        assert type(inner).__name__ in failure_reason(exc) and "a re-run resumes" in failure_reason(exc)


def test_a_task_errors_cause_is_followed():
    try:
        raise ActorDiedError()
    except ActorDiedError as actor_died:
        wrapped = RayTaskError("train", "traceback", actor_died)
    assert lost_process(wrapped) == "ActorDiedError"


def test_ordinary_errors_are_not_node_loss_and_keep_their_message():
    exc = _raised_from(ValueError("resolution must be a multiple of 8"), StageError)
    assert lost_process(exc) is None
    assert failure_reason(exc) == str(exc)


def test_a_cycle_in_the_chain_ends():
    a, b = RuntimeError("a"), RuntimeError("b")
    a.__context__, b.__context__ = b, a
    assert lost_process(a) is None


class _Response:
    def __init__(self, outcome):
        self.outcome = outcome

    def result(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


class _Handle:
    """A deployment handle whose replica dies under the first `losses` calls of chosen items."""

    def __init__(self, losses: dict[str, int], broken: frozenset = frozenset()):
        self.losses, self.broken, self.calls = dict(losses), broken, []
        self.generate = self

    def remote(self, item):
        self.calls.append(item.image_id)
        if self.losses.get(item.image_id, 0) > 0:
            self.losses[item.image_id] -= 1
            return _Response(ActorDiedError())
        if item.image_id in self.broken:
            return _Response(ValueError("cannot identify image file"))
        return _Response(f"image of {item.image_id}")


def _items(count):
    return [WorkItem(image_id=f"i{n}", request_id="r", tenant="t", label="a", pool="L0_L0", prompt="a duck",
                     seed=n, resolution=32, steps=2, guidance=5.0) for n in range(count)]


def test_images_whose_replica_was_lost_are_sent_again_once_each():
    handle = _Handle({"i1": 1, "i3": 2})
    outcomes, resent = generate(handle, _items(5))
    assert outcomes == [f"image of i{n}" for n in range(5)] and resent == 3  # in order, each once
    assert sorted(handle.calls) == sorted(["i0", "i1", "i1", "i2", "i3", "i3", "i3", "i4"])


def test_retries_are_bounded_and_other_errors_are_not_retried():
    handle = _Handle({"i0": 5}, broken=frozenset({"i1"}))
    outcomes, resent = generate(handle, _items(3), attempts=3)
    assert resent == 2
    assert isinstance(outcomes[0], ActorDiedError) and handle.calls.count("i0") == 3
    assert isinstance(outcomes[1], ValueError) and handle.calls.count("i1") == 1
    assert outcomes[2] == "image of i2"


def _board():
    """The fleet's job board as a plain object (the class under Ray's actor wrapper)."""
    from spinml_ray.ray_layer.fleet import JobBoard

    return JobBoard.__ray_metadata__.modified_class()


def test_a_job_whose_slot_was_lost_goes_back_to_the_queue_a_bounded_number_of_times():
    from spinml_ray.ray_layer.fleet import RETRIES_AFTER_LOSS

    async def scenario():
        board = _board()
        await board.put("t/r", {"epochs": 2})
        await board.put("t/other", {"epochs": 1})
        outcomes = []
        for attempt in range(RETRIES_AFTER_LOSS + 1):
            job_id, _ = await board.take(slot=attempt % 2, idle_s=0.01)
            assert job_id == "t/r"  # back at the front of the queue, before later jobs
            await board.fail_slot(attempt % 2, "training worker failed: a node was lost", retry=True)
            outcomes.append(job_id in board.outcomes)
        return outcomes, await board.outcome("t/r"), [job for job, _ in board.pending]

    requeued, (error, moved), pending = asyncio.run(scenario())
    assert requeued == [False] * RETRIES_AFTER_LOSS + [True]  # failed only after the retries ran out
    assert "node was lost" in error and moved == RETRIES_AFTER_LOSS and pending == ["t/other"]


def test_a_job_that_moved_once_and_then_trained_says_so():
    async def scenario():
        board = _board()
        await board.put("t/r", {})
        await board.take(slot=0, idle_s=0.01)
        await board.fail_slot(0, "training worker failed: a node was lost", retry=True)
        await board.take(slot=1, idle_s=0.01)
        await board.finish(1, None)
        return await board.outcome("t/r"), board.retried

    (error, moved), left = asyncio.run(scenario())
    assert error is None and moved == 1 and left == {}  # counted once, then forgotten


def test_a_job_whose_slot_failed_otherwise_fails_at_once():
    async def scenario():
        board = _board()
        await board.put("t/r", {})
        await board.take(slot=0, idle_s=0.01)
        await board.fail_slot(0, "training worker failed: out of memory")
        return await board.outcome("t/r"), board.pending

    (error, _), pending = asyncio.run(scenario())
    assert "out of memory" in error and pending == []


def test_the_status_table_says_what_a_stage_did_again():
    from spinml_ray.ray_layer.batch import format_summary, retried

    assert retried({"images": 8, "resent": 0}) is None and retried({}) is None
    assert retried({"images": 8, "resent": 2}) == "2 image send(s) repeated after a lost replica"
    assert "another fleet slot 1 time(s)" in retried({"requeued_after_node_loss": 1, "resumed_from_epoch": 2})
    assert "epoch 2" in retried({"requeued_after_node_loss": 1, "resumed_from_epoch": 2})
    assert retried({"steps": 30, "resumed_from": 20}) == "resumed from its stored state at step 20"
    row = {"request": "r.yaml", "request_id": "r", "state": "done",
           "stages": {"synthesize": {"state": "done", "seconds": 3.0, "retried": "2 image send(s) repeated"}}}
    assert "done 3.0s (retried)" in format_summary([row])
