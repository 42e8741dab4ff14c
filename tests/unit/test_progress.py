"""Progress lines a user reads while a round waits: one per phase, a heartbeat while a
batch queue holds it, errors counted; readable sizes and durations."""

from __future__ import annotations

import logging
import threading
import time

from flwr_hpc.server.telemetry import Progress, human_bytes, human_seconds


def test_one_line_per_phase_a_heartbeat_while_waiting_and_errors_counted(caplog):
    caplog.set_level(logging.DEBUG, logger="flwr_hpc")
    progress = Progress(heartbeat_s=0.05)
    progress.phase_started("3", "train", 4)
    progress.task_finished("3", "train", 1, 4, "alpha", "ok")
    time.sleep(0.2)  # submitted, but nobody waits yet: no heartbeat
    assert "replies so far" not in caplog.text
    progress.waiting("3", "train")
    deadline = time.monotonic() + 5
    while "replies so far" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.01)
    progress.task_finished("3", "train", 2, 4, "beta", "error:CLIENT_APP_CRASHED")
    progress.phase_finished("3", "train", 3, 4, 12.5)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    beats = [m for m in info if "replies so far" in m]
    assert beats and beats[0].startswith("[round 3] train: 1/4 replies so far, waiting "), info
    assert info[-1] == ("[round 3] train: 3/4 replies in 12.50 s, 1 dropped at the deadline, "
                        "1 of them error(s) (see tasks.jsonl)")
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug[0] == "[round 3] train: submitted 4 task(s)"
    assert "[round 3] train: 2/4 tasks done (site beta: error:CLIENT_APP_CRASHED)" in debug
    # the heartbeat stopped with its phase (phase_finished joins it)
    assert not [t for t in threading.enumerate() if t.name == "flwr-hpc-progress-3-train"]
    beats_then = len([r for r in caplog.records if "replies so far" in r.getMessage()])
    time.sleep(0.2)
    assert len([r for r in caplog.records if "replies so far" in r.getMessage()]) == beats_then


def test_human_units():
    assert human_bytes(0) == "0 B" and human_bytes(1023) == "1023 B"
    assert human_bytes(712704) == "696.0 KiB" and human_bytes(3.6 * 2**20) == "3.6 MiB"
    assert human_bytes(5 * 2**40) == "5.0 TiB"
    assert human_seconds(40.94) == "40.9 s" and human_seconds(75.2) == "1 min 15 s"
    assert human_seconds(2 * 3600 + 61) == "2 h 1 min"


def test_close_stops_heartbeats_of_phases_that_never_finished():
    """A pull-based app (push_messages, then pull_messages) never finishes a phase in the
    grid's eyes: closing the grid stops what it started."""
    progress = Progress(heartbeat_s=0.05)
    progress.phase_started("7", "evaluate", 2)
    progress.waiting("7", "evaluate")
    assert [t for t in threading.enumerate() if t.name == "flwr-hpc-progress-7-evaluate"]
    progress.close()
    assert not [t for t in threading.enumerate() if t.name == "flwr-hpc-progress-7-evaluate"]
