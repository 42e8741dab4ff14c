"""Per-task records (``tasks.jsonl``) and progress reporting."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from typing_extensions import override

if TYPE_CHECKING:
    from rich.progress import TaskID

log = logging.getLogger("flwr_hpc")

TASK_FIELDS = (
    "run_id", "message_id", "node_id", "site", "phase", "round", "outcome",
    "bytes_to_site", "bytes_from_site", "stage_s", "queue_wait_s", "run_s", "fetch_s",
    "transfer_s", "turnaround_s", "steps", "clock", "submitted_at", "error",
    "ranks", "launcher", "worker_pid", "load_s", "nodes", "node_hours",
)


class TaskLog:
    """Appends one JSON object per finished (or abandoned) task to ``tasks.jsonl``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.records: list[dict[str, Any]] = []

    def write(self, record: dict[str, Any]) -> None:
        """Keep ``record`` in :attr:`records` and append it to the file, if there is one."""
        with self._lock:
            self.records.append(record)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as fh:
                    fh.write(json.dumps(record, sort_keys=True) + "\n")


def allocation_summary(records: list[dict[str, Any]]) -> str:
    """The node-hours a run was charged (``tasks.jsonl``'s ``node_hours``: run time x the
    nodes a job holds; queue time is free), in all and per site, e.g.
    ``12.5 node-hours (alpha 10.0, beta 2.5)``.
    """
    per_site: dict[str, float] = {}
    for r in records:
        per_site[r.get("site", "?")] = (per_site.get(r.get("site", "?"), 0.0)
                                        + float(r.get("node_hours") or 0.0))
    total = sum(per_site.values())
    sites = ", ".join(f"{s} {v:.3g}" for s, v in sorted(per_site.items()))
    return f"{total:.3g} node-hours ({sites})"


def human_bytes(n: float) -> str:
    """``712704`` -> ``'696.0 KiB'`` (binary units, one decimal; bytes as an integer)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(s: float) -> str:
    """``75.2`` -> ``'1 min 15 s'``; under a minute with one decimal."""
    if s < 60:
        return f"{s:.1f} s"
    minutes, sec = divmod(int(round(s)), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s"
    return f"{minutes // 60} h {minutes % 60} min"


class Progress:
    """Receives phase/task events from the grid. The default logs one line per phase at
    INFO (when it ends), a heartbeat every ``heartbeat_s`` while the ServerApp waits for a
    phase's replies (a batch queue can hold a round for hours), and the rest at DEBUG: the
    submission and each task's end (``tasks.jsonl`` has them all).
    """

    def __init__(self, heartbeat_s: float = 300.0) -> None:
        self.heartbeat_s = heartbeat_s
        self._lock = threading.Lock()
        # (round, phase) -> [done, total, errors, stop event, heartbeat thread or None]
        self._open: dict[tuple[str, str], list[Any]] = {}

    def phase_started(self, round_: str, phase: str, total: int) -> None:
        """The ``total`` tasks of a round's phase were submitted."""
        log.debug("[round %s] %s: submitted %d task(s)", round_, phase, total)
        with self._lock:
            self._open[(round_, phase)] = [0, total, 0, threading.Event(), None]

    def waiting(self, round_: str, phase: str) -> None:
        """The ServerApp waits for the phase's replies: the heartbeat starts (it stops at
        :meth:`phase_finished` or :meth:`close`).
        """
        with self._lock:
            state = self._open.get((round_, phase))
            if state is None or state[4] is not None or self.heartbeat_s <= 0:
                return
            beat = threading.Thread(target=self._heartbeat, args=(round_, phase, state),
                                    name=f"flwr-hpc-progress-{round_}-{phase}", daemon=True)
            state[4] = beat
            beat.start()

    def _heartbeat(self, round_: str, phase: str, state: list[Any]) -> None:
        began = time.monotonic()
        while not state[3].wait(self.heartbeat_s):
            log.info("[round %s] %s: %d/%d replies so far, waiting %s", round_, phase,
                     state[0], state[1], human_seconds(time.monotonic() - began))

    def task_finished(self, round_: str, phase: str, done: int, total: int,
                      site: str, outcome: str) -> None:
        """A task of the phase ended with ``outcome``; ``done`` of ``total`` are done."""
        with self._lock:
            state = self._open.get((round_, phase))
            if state is not None:
                state[0] = done
                state[2] += outcome != "ok"
        log.debug("[round %s] %s: %d/%d tasks done (site %s: %s)",
                  round_, phase, done, total, site, outcome)

    def _stop(self, state: list[Any] | None) -> None:
        if state is None:
            return
        state[3].set()
        if state[4] is not None and state[4] is not threading.current_thread():
            state[4].join(timeout=5)

    def phase_finished(self, round_: str, phase: str, done: int, total: int,
                       elapsed_s: float) -> None:
        """The phase ended after ``elapsed_s`` with ``done`` of ``total`` replies (the
        rest were dropped at the deadline).
        """
        with self._lock:
            state = self._open.pop((round_, phase), None)
        self._stop(state)
        missing = total - done
        extra = f", {missing} dropped at the deadline" if missing else ""
        errors = state[2] if state is not None else 0
        if errors:
            extra += f", {errors} of them error(s) (see tasks.jsonl)"
        log.info("[round %s] %s: %d/%d replies in %.2f s%s",
                 round_, phase, done, total, elapsed_s, extra)

    def close(self) -> None:
        """Stop every heartbeat (the grid closes; phases pulled without waiting end)."""
        with self._lock:
            states = list(self._open.values())
            self._open.clear()
        for state in states:
            self._stop(state)


class RichProgress(Progress):
    """A live progress bar for the foreground ``flwr-hpc run``; also logs like ``Progress``."""

    def __init__(self) -> None:
        super().__init__()
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RP

        self._rp = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), transient=False)
        self._task: TaskID | None = None
        self._rp.start()

    @override
    def phase_started(self, round_: str, phase: str, total: int) -> None:
        super().phase_started(round_, phase, total)
        self._task = self._rp.add_task(f"round {round_} · {phase}", total=total)

    @override
    def task_finished(self, round_: str, phase: str, done: int, total: int,
                      site: str, outcome: str) -> None:
        super().task_finished(round_, phase, done, total, site, outcome)
        if self._task is not None:
            self._rp.update(self._task, completed=done)

    @override
    def phase_finished(self, round_: str, phase: str, done: int, total: int,
                       elapsed_s: float) -> None:
        if self._task is not None:
            self._rp.update(self._task, completed=done)
        super().phase_finished(round_, phase, done, total, elapsed_s)

    def stop(self) -> None:
        """Stop the live display (the bar stays on screen)."""
        self._rp.stop()
