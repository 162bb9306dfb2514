"""Progress a person can see: per request and stage, how much of the planned work is done.

In a terminal, a live display (rich): one bar per request and stage, counting references sanitized,
adapter steps, images generated and epochs. Anywhere else (Ray job logs, CI, a pipe), plain log
lines: one when a stage starts or ends and at most one per tenth of its work, so a log stays short.

Stages count their work through a callable `(done, total)`. Where the work runs in the driver
(sanitize's results, synthesis's responses) that is `Progress.counter`; where it runs in Ray Train
workers (adapter steps, epochs) it is a `Reporter`, a small picklable callable that sends counts to a
`ProgressRelay` actor on the driver's node, which the driver polls. A lost relay costs only the
display: reporting never fails a stage.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Callable, TextIO

log = logging.getLogger(__name__)

UNITS = {"sanitize": "references", "personalize": "steps", "synthesize": "images", "train": "epochs"}
Counter = Callable[[int, int], None]


class ProgressRelay:
    """Counts reported by Ray workers, kept until the driver takes them (a Ray actor: `Progress.reporter`)."""

    def __init__(self):
        self.latest: dict[tuple[str, str], tuple[int, int]] = {}

    def report(self, request: str, stage: str, done: int, total: int) -> None:
        self.latest[(request, stage)] = (done, total)

    def take(self) -> dict[tuple[str, str], tuple[int, int]]:
        latest, self.latest = self.latest, {}
        return latest


class Reporter:
    """A worker's `(done, total)` callable for one request's stage: fire and forget, never raises."""

    def __init__(self, relay, request: str, stage: str):
        self.relay, self.request, self.stage = relay, request, stage

    def __call__(self, done: int, total: int) -> None:
        try:
            self.relay.report.remote(self.request, self.stage, int(done), int(total))
        except Exception:  # the display is not worth a failed stage
            pass


class Progress:
    """What every request's stages have done, shown live in a terminal or as log lines elsewhere.

    `live`: None decides by `stream.isatty()`. Use as a context manager (or `close()` at the end)."""

    def __init__(self, stream: TextIO | None = None, live: bool | None = None, poll_s: float = 0.5):
        self.stream = stream or sys.stderr
        self.live = bool(self.stream.isatty()) if live is None else live
        self.poll_s = poll_s
        self.lock = threading.Lock()
        self.counts: dict[tuple[str, str], tuple[int, int | None]] = {}
        self.logged: dict[tuple[str, str], int] = {}  # tenths of the work last logged
        self.relay = None
        self.stopped = threading.Event()
        self.poller: threading.Thread | None = None
        self.display, self.tasks = None, {}
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self.console = Console(file=self.stream)
            self.display = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                        TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                                        console=self.console)  # prints meanwhile go above the bars
            self.display.start()

    def log_handler(self) -> logging.Handler:
        """A handler that prints log records above the live display (plain stderr when not live)."""
        if self.display is None:
            return logging.StreamHandler(self.stream)
        from rich.logging import RichHandler

        return RichHandler(console=self.console, show_path=False)

    def stage(self, request: str, stage: str, state: str) -> None:
        """A stage started ("running") or ended ("done", "failed", "skipped ...")."""
        if state != "running" and self.relay is not None:
            self._drain()  # the workers' last counts first, so the end line shows them
        with self.lock:
            done, total = self.counts.get((request, stage), (0, None))
            if self.display is not None:
                self._task(request, stage, total)
                if state != "running":
                    self.display.update(self.tasks[(request, stage)], description=f"{request} {stage}: {state}",
                                        **({"completed": total} if state == "done" and total else {}))
        if self.display is None:
            count = f" ({done}/{total} {UNITS.get(stage, '')})" if total else ""
            log.info("%s %s: %s%s", request, stage, state, count)

    def update(self, request: str, stage: str, done: int, total: int | None = None) -> None:
        """`done` of `total` units of the stage's work (references, steps, images, epochs)."""
        key = (request, stage)
        with self.lock:
            self.counts[key] = (done, total)
            if self.display is not None:
                self._task(request, stage, total)
                self.display.update(self.tasks[key], completed=done, total=total)
                return
            tenth = int(10 * done / total) if total else done
            if self.logged.get(key) == tenth:
                return
            self.logged[key] = tenth
        log.info("%s %s: %d/%s %s", request, stage, done, total if total else "?", UNITS.get(stage, ""))

    def counter(self, request: str, stage: str) -> Counter:
        """The `(done, total)` callable for work counted in this process."""
        return lambda done, total: self.update(request, stage, done, total)

    def reporter(self, request: str, stage: str) -> Reporter:
        """The `(done, total)` callable for work counted in Ray workers (starts the relay on first use)."""
        with self.lock:
            if self.relay is None:
                import ray

                from spinml_ray.ray_layer.cluster import on_this_node

                self.relay = ray.remote(num_cpus=0)(ProgressRelay).options(scheduling_strategy=on_this_node()).remote()
                self.poller = threading.Thread(target=self._poll, name="progress-relay", daemon=True)
                self.poller.start()
        return Reporter(self.relay, request, stage)

    def close(self) -> None:
        """Stop polling (after showing the last counts) and end the live display; idempotent."""
        if self.poller is not None:
            self.stopped.set()
            self.poller.join()
            self.poller = None
        if self.display is not None and self.display.live.is_started:
            self.display.stop()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _task(self, request: str, stage: str, total: int | None) -> None:
        if (request, stage) not in self.tasks:
            self.tasks[(request, stage)] = self.display.add_task(f"{request} {stage}", total=total,
                                                                 unit=UNITS.get(stage, ""))

    def _drain(self) -> bool:
        """Show what the relay holds; False once the relay (or Ray) is gone."""
        import ray

        try:
            latest = ray.get(self.relay.take.remote(), timeout=30)
        except Exception:
            return False
        for (request, stage), (done, total) in latest.items():
            self.update(request, stage, done, total)
        return True

    def _poll(self) -> None:
        while True:
            stopping = self.stopped.wait(self.poll_s)
            if not self._drain() or stopping:
                return
