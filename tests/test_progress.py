"""Progress a person can see: live bars on a terminal, short log lines elsewhere (no Ray needed)."""

import io
import logging
import os
import re

import pytest

from spinml_ray.ray_layer.progress import Progress, ProgressRelay, Reporter

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _drive(progress: Progress, total: int = 20) -> None:
    progress.stage("demo/duck", "synthesize", "running")
    for done in range(1, total + 1):
        progress.update("demo/duck", "synthesize", done, total)
    progress.stage("demo/duck", "synthesize", "done")
    progress.stage("demo/duck", "train", "running")
    progress.update("demo/duck", "train", 1, 2)
    progress.stage("demo/duck", "train", "failed")


def test_off_a_terminal_progress_is_a_few_log_lines(caplog):
    stream = io.StringIO()  # not a terminal: a pipe, a Ray job log
    caplog.set_level(logging.INFO, logger="spinml_ray.ray_layer.progress")
    with Progress(stream) as progress:
        assert not progress.live
        _drive(progress, total=200)
    lines = [r.getMessage() for r in caplog.records if r.name == "spinml_ray.ray_layer.progress"]
    counts = [line for line in lines if line.startswith("demo/duck synthesize: ") and "/200 images" in line
              and "running" not in line and "done" not in line]
    assert 10 <= len(counts) <= 11  # one per tenth of the work, not one per image
    assert "demo/duck synthesize: 200/200 images" in counts
    assert lines[0] == "demo/duck synthesize: running"
    assert "demo/duck synthesize: done (200/200 images)" in lines
    assert "demo/duck train: 1/2 epochs" in lines and "demo/duck train: failed (1/2 epochs)" in lines
    assert stream.getvalue() == ""  # nothing drawn


def test_on_a_terminal_progress_draws_bars_and_logs_above_them(caplog):
    leader, follower = os.openpty()  # a real terminal, as an operator's shell gives
    try:
        with os.fdopen(follower, "w", closefd=False) as stream:
            progress = Progress(stream)
            assert progress.live
            handler = progress.log_handler()
            logging.getLogger("spinml_ray.test").addHandler(handler)
            try:
                _drive(progress)
                logging.getLogger("spinml_ray.test").warning("a line from the job")
            finally:
                logging.getLogger("spinml_ray.test").removeHandler(handler)
                progress.close()
                progress.close()  # idempotent
            stream.flush()
        drawn = b""
        while True:  # all that was written is buffered in the terminal already
            os.set_blocking(leader, False)
            try:
                chunk = os.read(leader, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
        os.close(follower)
    text = ANSI.sub("", drawn.decode(errors="replace"))
    assert "demo/duck synthesize: done" in text and "20/20" in text and "images" in text
    assert "demo/duck train: failed" in text and "1/2" in text and "epochs" in text
    assert "━" in text  # a bar
    assert "a line from the job" in text
    assert not [r for r in caplog.records if r.name == "spinml_ray.ray_layer.progress"]  # no log lines besides the bars


def test_a_forced_live_display_writes_to_its_stream_not_the_log(caplog):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    caplog.set_level(logging.INFO, logger="spinml_ray.ray_layer.progress")
    with Progress(stream) as progress:
        _drive(progress)
    assert "20/20" in ANSI.sub("", stream.getvalue())
    assert not [r for r in caplog.records if r.name == "spinml_ray.ray_layer.progress"]


def test_workers_counts_reach_the_display_through_the_relay():
    relay = ProgressRelay()

    class Actor:  # what a Ray actor handle looks like to a Reporter
        class report:
            @staticmethod
            def remote(*args):
                relay.report(*args)

    report = Reporter(Actor, "demo/duck", "train")
    report(1, 3)
    report(2, 3)  # the newest count wins
    assert relay.take() == {("demo/duck", "train"): (2, 3)}
    assert relay.take() == {}  # taken once


def test_a_lost_relay_never_fails_the_stage():
    class Gone:
        class report:
            @staticmethod
            def remote(*args):
                raise RuntimeError("actor died")

    Reporter(Gone, "demo/duck", "train")(1, 3)  # no exception


@pytest.mark.parametrize("stage", ["sanitize", "personalize", "synthesize", "train"])
def test_every_stage_has_a_unit(stage, caplog):
    caplog.set_level(logging.INFO, logger="spinml_ray.ray_layer.progress")
    with Progress(io.StringIO()) as progress:
        progress.update("t/r", stage, 1, 1)
    assert re.fullmatch(r"t/r \w+: 1/1 \w+", caplog.records[-1].getMessage())
