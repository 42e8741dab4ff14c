"""Task bookkeeping: one :class:`Task` per message the grid sends, and its record.

A :class:`Task` is what the grid knows about one message on its way to a node and back:
its node, its objects, the future of the site-worker task, when it was submitted and
finished, and how it ended. :func:`task_record` turns a finished task into its
``tasks.jsonl`` row (``outcome`` values are listed in the README); :func:`wall_timing` is
its :class:`~flwr_hpc.server.timing.TaskTiming` on the server's clock.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message
from flwr.common.constant import ErrorCode

from flwr_hpc.config import ClientSlot
from flwr_hpc.payload.objects import Parts
from flwr_hpc.server.timing import TaskTiming

ERROR_NAMES = {getattr(ErrorCode, n): n for n in dir(ErrorCode) if n.isupper()}


def error_outcome(code: int) -> str:
    """The ``tasks.jsonl`` outcome of an error reply, e.g. ``error:NODE_UNAVAILABLE``."""
    return f"error:{ERROR_NAMES.get(code, code)}"


def round_of(message: Message) -> str:
    """The round a message belongs to: its group id, else the ``server-round`` it carries."""
    if message.metadata.group_id:
        return message.metadata.group_id
    if not message.has_error():
        for record in message.content.config_records.values():
            if "server-round" in record:
                return str(record["server-round"])
    return ""


@dataclass
class Task:
    """One message on its way to a node and back."""

    message: Message
    message_id: str
    node: ClientSlot
    submitted_at: float = 0.0
    stage_s: float = 0.0
    bytes_to_site: int = 0
    future: Future | None = None
    immediate: Message | None = None  # reply known without running (e.g. unknown node)
    abandoned: bool = False
    context_id: str = ""
    object_ids: list[str] = field(default_factory=list)  # what an inline task carries
    fetch_error: str = ""  # the site's reply transfer failed (Transfer stores)
    done_at: float | None = None  # server clock when the result was known
    steps: int | None = None  # local steps the message asks for (timing signals)
    parts: dict[str, Parts] | None = None  # held while it waits for its node (backlog)

    @property
    def phase(self) -> str:
        """The message type (``train``, ``evaluate``, ``query``, …)."""
        return self.message.metadata.message_type

    @property
    def round(self) -> str:
        """The round it belongs to (:func:`round_of`)."""
        return round_of(self.message)

    @property
    def ready(self) -> bool:
        """Its result (or an immediate reply) is known."""
        return self.immediate is not None or (self.future is not None and self.future.done())

    def safe_result(self) -> dict | None:
        """The site worker's result, or ``None`` (not finished, or the task failed)."""
        try:
            return self.future.result(timeout=0) if self.future else None
        except Exception:  # noqa: BLE001
            return None


def _r6(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def wall_timing(task: Task, outcome: str, result: dict | None, fetch_s: float) -> TaskTiming:
    """The task's durations, every one measured on the server's clock: the site's
    ``finished_at - started_at`` is a difference on one clock, so offsets cancel.
    """
    started = (result or {}).get("started_at")
    finished = (result or {}).get("finished_at")
    run_s = (finished - started) if started and finished else None
    turnaround = (task.done_at - task.submitted_at
                  if task.done_at is not None and task.submitted_at else None)
    queue_wait = (max(turnaround - run_s, 0.0)
                  if turnaround is not None and run_s is not None else None)
    return TaskTiming(site=task.node.site, node_id=task.node.node_id, round=task.round,
                      phase=task.phase, outcome=outcome, submitted_at=task.submitted_at,
                      turnaround_s=turnaround, queue_wait_s=queue_wait, run_s=run_s,
                      transfer_s=task.stage_s + fetch_s, steps=task.steps)


def clip(text: str, limit: int = 1000) -> str:
    """``text`` in at most about ``limit`` characters: its start (what failed) and its end
    (the log tail), joined by `` … ``.
    """
    if len(text) <= limit:
        return text
    head = text[:limit // 3]
    return f"{head} … {text[-(limit - len(head) - 3):]}"


def task_record(task: Task, outcome: str, timing: TaskTiming, *, run_id: int | None,
                virtual: bool, result: dict | None = None, bytes_from_site: int = 0,
                fetch_s: float = 0.0, error: str | None = None, nodes: int = 1
                ) -> dict[str, Any]:
    """The task's ``tasks.jsonl`` row (fields: :data:`~flwr_hpc.server.telemetry.TASK_FIELDS`).

    ``node_hours`` is what the allocation is charged: the run time times the ``nodes`` the
    job holds (queue time is free; a job that failed or was killed is charged for the time
    it ran, when that is known).
    """
    result = result or {}
    return {
        "run_id": run_id,
        "message_id": task.message_id,
        "node_id": task.node.node_id,
        "site": task.node.site,
        "phase": task.phase,
        "round": task.round,
        "outcome": outcome,
        "bytes_to_site": task.bytes_to_site,
        "bytes_from_site": bytes_from_site,
        "stage_s": round(task.stage_s, 6),
        "queue_wait_s": _r6(timing.queue_wait_s),
        "run_s": _r6(timing.run_s),
        "fetch_s": round(fetch_s, 6),
        "transfer_s": _r6(timing.transfer_s),
        "turnaround_s": _r6(timing.turnaround_s),
        "steps": task.steps,
        "nodes": nodes,
        "node_hours": (None if timing.run_s is None
                       else round(timing.run_s * nodes / 3600.0, 9)),
        "clock": "virtual" if virtual else "server",
        "ranks": result.get("ranks", 1),
        "launcher": result.get("launcher", "none"),
        # the site worker process that ran it and its ClientApp load time: a warm worker
        # keeps its pid across rounds and loads in milliseconds
        "worker_pid": result.get("pid"),
        "load_s": _r6(result.get("load_s")),
        "submitted_at": task.submitted_at,
        "error": (error or None) and clip(str(error)),
    }
