"""The training fleet: long-lived Ray Train slots that train many requests' models, one after another.

Starting a `TorchTrainer` costs about as much as training a small model (a controller, worker
processes, imports: about 9 s on a 2-core machine). A batch job therefore trains its one-worker
requests in `slots` long-lived `TorchTrainer`s, each with one worker holding `cpus_per_slot` CPUs
(and as many threads) or `gpu_fraction` of a GPU, so Ray packs several onto a card. Every slot runs
`slot_loop`: take a job from the `JobBoard` actor, train it with the same `training.loop.fit` as a
lone request (its own data, its own stored state, its own best weights), report the outcome, next.

Isolation: an exception in one request's training (bad data, out of memory) is caught in the slot,
recorded for that request alone, and the slot goes on. A dead worker process is restarted by Ray
Train (`FailureConfig`), and the restarted slot first takes back the job it was running, which
resumes from its stored state; if the slot gives up, its job fails and a new slot starts.
Slots leave after `idle_s` without work, so their CPUs go back to the other stages. A batch job
`expect`s each request's training while the request is synthesized: a slot starts then, and idle
slots stay while a job is expected, so the start-up overlaps synthesis instead of delaying training.
(An expectation ends with synthesis, before the request's other Ray work, e.g. detection's labelling,
could wait for the CPUs an idle slot holds.) A request's personalization, which runs before its
synthesis and asks for the same kind of resources, runs `making_room`: idle slots leave for it, so
it does not wait for every other request's synthesis to end.

Node loss: the board lives on the driver's node (the head, under `ray job submit`), pinned there. It
holds no resources, so Ray would otherwise place it on any node, and losing that node would fail every
request of the job. Pinned, it shares the driver's fate, and a re-run of the job finishes the rest.
A slot whose worker's node is lost is restarted elsewhere by Ray Train and takes its job back; if its
run ends instead (Ray Train gave up, or its controller went with the node), the job goes back to the
queue for another slot, twice at most, and resumes from its stored state. A slot whose board is gone
stops, and a request waiting on a lost board fails with a reason that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import ray
from ray.exceptions import RayActorError

from spinml_ray import storage
from spinml_ray.ray_layer import metrics
from spinml_ray.ray_layer.cluster import lost_process, on_this_node

RETRIES_AFTER_LOSS = 2
BOARD_LOST = "the training fleet's job board was lost with its node ({}); a re-run of the job resumes this request"


@ray.remote(num_cpus=0)
class JobBoard:
    """Pending jobs, the job each slot is running, and outcomes (an async actor: waits don't block)."""

    def __init__(self):
        self.pending: list[tuple[str, object]] = []
        self.running: dict[int, tuple[str, object]] = {}
        self.outcomes: dict[str, str | None] = {}
        self.expected: set[str] = set()  # jobs whose requests are being synthesized: slots wait for them
        self.forgotten_at = 0.0  # when the last expectation ended (idle slots count from then)
        self.closed = False
        self.making_room = 0  # Ray work outside the fleet waiting for resources: idle slots leave for it
        self.started: set[int] = set()  # slots whose loop has asked for work at least once
        self.kept_idle = 0  # idle periods after which a slot stayed because a job was expected
        self.retried: dict[str, int] = {}  # jobs put back after their slot's node was lost
        self.idle_slots = 0  # slots waiting in `take`
        self.changed = asyncio.Condition()

    def _gauges(self) -> None:
        """The fleet's state for the platform's dashboards (`metrics.py`)."""
        metrics.record("spinml_fleet_slots", len(self.running), state="busy")
        metrics.record("spinml_fleet_slots", self.idle_slots, state="idle")
        metrics.record("spinml_fleet_jobs_waiting", len(self.pending))

    async def put(self, job_id: str, job) -> None:
        async with self.changed:
            self.outcomes.pop(job_id, None)
            self.pending.append((job_id, job))
            self._gauges()
            self.changed.notify_all()

    async def expect(self, job_id: str) -> bool:
        """Whether a slot started for the job now would stay (not while room is being made)."""
        async with self.changed:
            self.expected.add(job_id)
            return not self.making_room

    async def forget(self, job_id: str) -> None:
        async with self.changed:
            self.expected.discard(job_id)
            self.forgotten_at = asyncio.get_running_loop().time()
            self.changed.notify_all()

    async def make_room(self, delta: int) -> None:
        async with self.changed:
            self.making_room += delta
            self.changed.notify_all()

    async def take(self, slot: int, idle_s: float):
        """The slot's unfinished job (after a restart), else the next pending one; None once the slot
        has been idle for `idle_s` with no job pending or expected, or at once while room is wanted."""
        clock = asyncio.get_running_loop().time
        async with self.changed:
            self.started.add(slot)
            if slot not in self.running:
                self.idle_slots += 1
                self._gauges()
                try:
                    idle_since = clock()
                    while not (self.pending or self.closed):
                        if self.making_room:
                            return None
                        idle_since = clock() if self.expected else max(idle_since, self.forgotten_at)
                        remaining = idle_since + idle_s - clock()
                        if remaining <= 0:
                            return None
                        try:
                            await asyncio.wait_for(self.changed.wait(), remaining)
                        except asyncio.TimeoutError:
                            self.kept_idle += bool(self.expected)
                    if not self.pending:
                        return None
                    self.running[slot] = self.pending.pop(0)
                finally:
                    self.idle_slots -= 1
                    self._gauges()
            return self.running[slot]

    async def finish(self, slot: int, error: str | None) -> None:
        async with self.changed:
            self._finish(slot, error)

    def _finish(self, slot: int, error: str | None) -> None:  # with `changed` held
        job_id, _ = self.running.pop(slot)
        self.outcomes[job_id] = error
        self._gauges()
        self.changed.notify_all()

    async def fail_slot(self, slot: int, error: str, retry: bool = False) -> None:
        """The slot's run ended with its job unfinished: the job fails, or with `retry` (its worker's
        node was lost) goes back to the front of the queue, at most `RETRIES_AFTER_LOSS` times."""
        async with self.changed:
            if slot not in self.running:
                return
            job_id, config = self.running[slot]
            if not (retry and self.retried.get(job_id, 0) < RETRIES_AFTER_LOSS):
                self._finish(slot, error)
                return
            self.retried[job_id] = self.retried.get(job_id, 0) + 1
            del self.running[slot]
            self.pending.insert(0, (job_id, config))
            self._gauges()
            self.changed.notify_all()

    async def outcome(self, job_id: str) -> tuple[str | None, int]:
        """Wait for a job: (None when it trained, else its error; how often it was put back after a loss)."""
        async with self.changed:
            await self.changed.wait_for(lambda: job_id in self.outcomes)
            return self.outcomes.pop(job_id), self.retried.pop(job_id, 0)

    def pending_count(self) -> int:
        return len(self.pending)

    def started_count(self) -> int:
        return len(self.started)

    def kept_idle_count(self) -> int:
        return self.kept_idle

    async def close(self) -> None:
        """Idle slots leave now, not after `idle_s`."""
        async with self.changed:
            self.closed = True
            self.changed.notify_all()


def slot_loop(config: dict) -> None:
    """A fleet slot's Ray Train worker loop: train jobs until none comes for `idle_s`."""
    import gc
    from dataclasses import replace

    import torch

    from spinml_ray.ray_layer.train import ray_workers
    from spinml_ray.training.loop import fit

    board, slot = config["board"], config["slot"]
    while True:
        try:
            job = ray.get(board.take.remote(slot, config["idle_s"]))
        except RayActorError:  # the board is gone (with the driver's node): nothing more comes
            return
        if job is None:
            return
        _, training_job = job
        try:
            fit(replace(training_job, run=replace(training_job.run, threads=config["threads"])), ray_workers())
            error = None
        except Exception as exc:  # this request fails alone; the slot goes on
            error = f"{type(exc).__name__}: {exc}"
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            ray.get(board.finish.remote(slot, error))
        except RayActorError:
            return


class TrainingFleet:
    """Up to `slots` long-lived one-worker trainers, started when jobs wait and none is free."""

    def __init__(self, slots: int, cpus_per_slot: int = 1, use_gpu: bool = False, gpu_fraction: float = 0.25,
                 runs_uri: str = "spinml-data/_fleet", idle_s: float = 10.0, max_failures: int = 3):
        self.max_slots, self.cpus, self.use_gpu, self.gpu_fraction = slots, cpus_per_slot, use_gpu, gpu_fraction
        self.runs_uri, self.idle_s, self.max_failures = runs_uri, idle_s, max_failures
        self.board = JobBoard.options(scheduling_strategy=on_this_node()).remote()
        self.lock = threading.Lock()
        self.live: dict[int, threading.Thread] = {}
        self.starts = 0  # slot runs started (a restarted worker stays within its run)

    def fits(self, num_workers: int, gpu_fraction: float) -> bool:
        """Whether a training of this shape runs in a slot (else it gets a `TorchTrainer` of its own)."""
        return num_workers == 1 and (not self.use_gpu or gpu_fraction == self.gpu_fraction)

    def train(self, job_id: str, job) -> int:
        """Train one job (a `training.job.TrainingJob`) in a slot; raises RuntimeError with its error. Returns
        how many times the job moved to another slot because its slot's node was lost."""
        try:
            with self.lock:
                ray.get(self.board.put.remote(job_id, job))
                self._start_slot_if_room()
            error, moved = ray.get(self.board.outcome.remote(job_id))
        except RayActorError as exc:
            raise RuntimeError(BOARD_LOST.format(type(exc).__name__)) from None
        if error is not None:
            raise RuntimeError(error)
        return moved

    def expect(self, job_id: str) -> None:
        """A job will come once its request is synthesized: start a slot now if one may still start,
        and keep idle slots until `forget` (so the slot's start-up overlaps the synthesis)."""
        with self.lock, contextlib.suppress(RayActorError):  # a lost board: `train` says so
            if ray.get(self.board.expect.remote(job_id)):  # else a slot started now would leave at once
                self._start_slot_if_room()

    @contextlib.contextmanager
    def making_room(self):
        """For Ray work outside the fleet that needs the resources slots hold (a request's
        personalization): meanwhile idle slots leave, even for expected jobs, and `expect` starts
        none; a job put meanwhile still gets a slot, which leaves once the job is done."""
        with contextlib.suppress(RayActorError):
            ray.get(self.board.make_room.remote(1))
        try:
            yield
        finally:
            with contextlib.suppress(RayActorError):
                ray.get(self.board.make_room.remote(-1))

    def forget(self, job_id: str) -> None:
        """The job's synthesis ended (done or failed): idle slots leave `idle_s` after this."""
        with contextlib.suppress(RayActorError):
            ray.get(self.board.forget.remote(job_id))

    def start(self, timeout_s: float = 300) -> None:
        """Start every slot now and wait until all are ready for work (they still leave after idle_s)."""
        with self.lock:
            while self._start_slot_if_room():
                pass
        deadline = time.time() + timeout_s
        while ray.get(self.board.started_count.remote()) < self.max_slots:
            if time.time() > deadline:
                raise TimeoutError(f"the training fleet's {self.max_slots} slots did not start in {timeout_s} s")
            time.sleep(0.2)

    def _start_slot_if_room(self) -> bool:
        """Start one more slot unless all `slots` are live (call with `lock` held); whether it did."""
        if len(self.live) >= self.max_slots:
            return False
        slot = next(i for i in range(self.max_slots) if i not in self.live)
        self.live[slot] = threading.Thread(target=self._run_slot, args=(slot,), name=f"fleet-slot-{slot}")
        self.live[slot].start()
        return True

    def _run_slot(self, slot: int) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        fs, runs_path = storage.filesystem(self.runs_uri)
        while True:
            name = f"slot-{slot}-{time.time_ns()}"
            with self.lock:
                self.starts += 1
            trainer = TorchTrainer(
                slot_loop,
                train_loop_config={"board": self.board, "slot": slot, "idle_s": self.idle_s,
                                   "threads": 1 if self.use_gpu else self.cpus},
                scaling_config=ScalingConfig(num_workers=1, use_gpu=self.use_gpu,
                                             resources_per_worker={"GPU": self.gpu_fraction} if self.use_gpu
                                             else {"CPU": self.cpus}),
                run_config=RunConfig(name=name, storage_path=runs_path,
                                     storage_filesystem=fs, failure_config=FailureConfig(max_failures=self.max_failures)),
            )
            try:
                try:
                    trainer.fit()
                except Exception as exc:  # the slot gave up (its worker kept dying): its job fails, not the others
                    lost = lost_process(exc)  # ... unless a node was lost: then it goes to a new slot
                    reason = f"a node or worker process was lost ({lost})" if lost else str(exc)
                    ray.get(self.board.fail_slot.remote(slot, f"training worker failed: {reason}", retry=bool(lost)))
                finally:  # the slot's run holds nothing once it ends (each job keeps its state with its request)
                    storage.delete_dir(storage.join(self.runs_uri, name))
                with self.lock:  # leave only when no job waits (a job put meanwhile would find no slot)
                    if ray.get(self.board.pending_count.remote()) == 0:
                        del self.live[slot]
                        return
            except RayActorError:  # the board is gone: its jobs' requests fail on their own (`train`)
                with self.lock:
                    del self.live[slot]
                return

    def close(self) -> None:
        """Let the slots leave once their jobs are done, and wait for them (before Ray shuts down)."""
        with contextlib.suppress(RayActorError):  # a lost board: its slots are leaving on their own
            ray.get(self.board.close.remote())
        with self.lock:
            threads = list(self.live.values())
        for thread in threads:
            thread.join()
