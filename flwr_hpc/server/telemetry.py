"""Per-task records (``tasks.jsonl``) and progress reporting."""

from __future__ import annotations

import json
import logging
import threading
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
    "ranks", "launcher", "worker_pid", "load_s",
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


class Progress:
    """Receives phase/task events from the grid. The default logs when a phase starts and
    when it ends at INFO, and the per-task events at DEBUG (``tasks.jsonl`` has them all).
    """

    def phase_started(self, round_: str, phase: str, total: int) -> None:
        """The ``total`` tasks of a round's phase were submitted."""
        log.info("[round %s] %s: submitted %d task(s)", round_, phase, total)

    def task_finished(self, round_: str, phase: str, done: int, total: int,
                      site: str, outcome: str) -> None:
        """A task of the phase ended with ``outcome``; ``done`` of ``total`` are done."""
        log.debug("[round %s] %s: %d/%d tasks done (site %s: %s)",
                 round_, phase, done, total, site, outcome)

    def phase_finished(self, round_: str, phase: str, done: int, total: int,
                       elapsed_s: float) -> None:
        """The phase ended after ``elapsed_s`` with ``done`` of ``total`` replies (the
        rest were dropped at the deadline).
        """
        missing = total - done
        extra = f", {missing} dropped at the deadline" if missing else ""
        log.info("[round %s] %s: %d/%d replies in %.2f s%s",
                 round_, phase, done, total, elapsed_s, extra)


class RichProgress(Progress):
    """A live progress bar for the foreground ``flwr-hpc run``; also logs like ``Progress``."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RP

        self._rp = RP(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), transient=False)
        self._task: TaskID | None = None
        self._rp.start()

    @override
    def phase_started(self, round_: str, phase: str, total: int) -> None:
        self._task = self._rp.add_task(f"round {round_} · {phase}", total=total)

    @override
    def task_finished(self, round_: str, phase: str, done: int, total: int,
                      site: str, outcome: str) -> None:
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
