"""Site simulator: the ``sim`` compute backend and the virtual-time grid.

A federation whose sites all have ``compute.type: sim`` runs the **real** site worker and
the **real** ClientApps (the tiny model, on this machine's cores), but every task is also
given a *virtual* timeline drawn from the site's model, and the grid delivers replies in
virtual-time order on a :class:`~flwr_hpc.timing.VirtualClock`. A day of cross-facility
batch queues is simulated in the minutes the training itself takes.

Per task (``sites.<name>.compute.sim``)::

    transfer in  = latency_s + message array bytes / bandwidth_mb_s
    queue wait   ~ lognormal(median = queue_median_s, sigma = queue_sigma)
    run          = startup_s + local steps * step_s   (train)   |   eval_s   (evaluate)
    transfer out = latency_s + message array bytes / bandwidth_mb_s
    failure      : with probability failure_prob the job dies part-way through its run
                   (NODE_UNAVAILABLE; the ClientApp is not run)

The local steps are the message's ``local-steps`` config value or the job's
``train.local_steps`` (:func:`flwr_hpc.timing.local_steps_of`). Draws come from one
random stream per site seeded from ``(seed, site)``, consumed in the order of the site's
submissions, so the same seed and the same strategy decisions give the same timeline
whatever the real scheduling of the processes was. Server-side work (aggregation,
central evaluation) takes no virtual time.

All sim sites share one real process pool (``compute.workers`` of the first sim site,
at least 1): the real tasks only need to finish, not to run in parallel.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from flwr_hpc.compute.base import ComputeBackend
from flwr_hpc.grid import HPCGrid, Task
from flwr_hpc.payload.objects import array_bytes
from flwr_hpc.timing import TaskTiming, VirtualClock

log = logging.getLogger("flwr_hpc")


@dataclass(frozen=True)
class SimPlan:
    """One task's virtual timeline (seconds)."""

    transfer_in_s: float
    queue_wait_s: float
    run_s: float
    transfer_out_s: float
    fails: bool

    @property
    def total_s(self) -> float:
        return self.transfer_in_s + self.queue_wait_s + self.run_s + self.transfer_out_s


def site_rng(seed: int, site: str) -> np.random.Generator:
    """The site's own random stream (stable across processes and Python hash seeds)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(site.encode())])


class SimSiteBackend(ComputeBackend):
    """A simulated site: plans each task's virtual timeline; real work goes to ``runner``."""

    def __init__(self, site: str, params: dict[str, Any], runner: ComputeBackend) -> None:
        self.site = site
        self.params = dict(params)
        self._runner = runner
        self._rng = site_rng(int(self.params["seed"]), site)

    def plan(self, phase: str, steps: int | None, nbytes: int) -> SimPlan:
        p = self.params
        xfer = float(p["latency_s"]) + nbytes / (float(p["bandwidth_mb_s"]) * 1e6)
        median, sigma = float(p["queue_median_s"]), float(p["queue_sigma"])
        queue = median * math.exp(sigma * self._rng.standard_normal()) if median > 0 else 0.0
        if phase.startswith("train"):
            run = float(p["startup_s"]) + (steps or 0) * float(p["step_s"])
        else:
            run = float(p["eval_s"])
        fails = bool(self._rng.random() < float(p["failure_prob"]))
        if fails:  # dies part-way through its run; nothing comes back
            run *= float(self._rng.random())
            return SimPlan(xfer, queue, run, 0.0, True)
        return SimPlan(xfer, queue, run, xfer, False)

    def submit(self, fn: Callable[[dict], dict], job: dict[str, Any]) -> Future:
        return self._runner.submit(fn, job)

    def close(self) -> None:
        self._runner.close()  # shared; closing twice is a no-op


class VirtualTimeGrid(HPCGrid):
    """An :class:`HPCGrid` over simulated sites: replies arrive in virtual-time order and
    every deadline (the ``timeout`` of ``send_and_receive`` and ``stream_replies``,
    ``wait_any``'s ``until``) is virtual. The real tasks run as soon as they are submitted;
    the grid waits for the real result of the task that is due next on the virtual clock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = VirtualClock()
        self._plans: dict[str, SimPlan] = {}
        self._due: dict[str, float] = {}

    # -- submission: every task gets its timeline now
    @classmethod
    def from_federation(cls, federation: Any, fab_bytes: bytes, *, run_dir: Path,
                        **kwargs: Any) -> VirtualTimeGrid:
        """The grid over ``federation``'s simulated sites (each a :class:`SimSiteBackend`)."""
        return super().from_federation(federation, fab_bytes, run_dir=run_dir,
                                       backends=make_sim_backends(federation, run_dir),
                                       **kwargs)

    def _submit(self, task: Task) -> None:
        backend = self.sites[task.node.site].backend
        assert isinstance(backend, SimSiteBackend)
        plan = backend.plan(task.phase, task.steps, array_bytes(task.message))
        now = self.clock.now()
        self._plans[task.message_id] = plan
        self._due[task.message_id] = now + plan.total_s
        if plan.fails:
            task.submitted_at = now
            task.immediate = Message(
                Error(ErrorCode.NODE_UNAVAILABLE,
                      f"simulated failure: the job at site '{task.node.site}' died after "
                      f"{plan.queue_wait_s + plan.run_s:.0f} s (failure_prob="
                      f"{backend.params['failure_prob']})"),
                reply_to=task.message)
            self._mark_done(task.message_id)
            return
        super()._submit(task)
        task.submitted_at = now

    def _mark_done(self, message_id: str) -> None:
        task = self._tasks.get(message_id)
        if task is not None and task.done_at is None and message_id in self._due:
            task.done_at = self._due[message_id]
        super()._mark_done(message_id)

    def _timing(self, task: Task, outcome: str, result: dict | None,
                fetch_s: float) -> TaskTiming:
        plan = self._plans.pop(task.message_id, None)
        self._due.pop(task.message_id, None)
        if plan is None:  # never submitted (unknown node, staging failure)
            return super()._timing(task, outcome, result, fetch_s)
        return TaskTiming(site=task.node.site, node_id=task.node.node_id, round=task.round,
                          phase=task.phase, outcome=outcome, submitted_at=task.submitted_at,
                          turnaround_s=plan.total_s, queue_wait_s=plan.queue_wait_s,
                          run_s=plan.run_s, transfer_s=plan.transfer_in_s + plan.transfer_out_s,
                          steps=task.steps)

    # -- delivery in virtual time
    def _is_due(self, message_id: str) -> bool:
        return self._due.get(message_id, self.clock.now()) <= self.clock.now()

    def wait_any(self, message_ids: Iterable[str], until: float | None = None) -> list[str]:
        """Advance the virtual clock to the next completion among ``message_ids`` (waiting
        for its real result) and return the ids due then; at ``until`` return ``[]``."""
        with self._lock:
            live = [(self._due.get(m, self.clock.now()), m) for m in message_ids
                    if m in self._tasks and not self._tasks[m].abandoned]
        if not live:
            return []
        nxt = min(d for d, _ in live)
        if until is not None and nxt > until:
            self.clock.advance_to(until)
            return []
        due = sorted((d, m) for d, m in live if d <= nxt)
        with self._cond:
            for _, mid in due:
                while not self._is_ready(self._tasks[mid]):
                    if self._interrupted.is_set() or self._closed:
                        return []
                    self._cond.wait(timeout=1.0)
        self.clock.advance_to(nxt)
        return [m for _, m in due]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return super().pull_messages([m for m in message_ids if self._is_due(m)])

    def stream_replies(self, messages: Iterable[Message], *,
                       timeout: float | None = None) -> Iterator[Message]:
        ids = list(self.push_messages(messages))
        until = None if timeout is None else self.clock.now() + timeout
        return self._receive_virtual(ids, until, timeout)

    def _receive_virtual(self, ids: list[str], until: float | None,
                         timeout: float | None) -> Iterator[Message]:
        if not ids:
            return
        first = self._tasks.get(ids[0])
        round_, phase = (first.round, first.phase) if first else ("?", "?")
        started = self.clock.now()
        pending = set(ids)
        received = 0
        try:
            while pending:
                ready = self.wait_any(sorted(pending), until=until)
                if not ready:
                    break
                for mid in ready:
                    for reply in self.pull_messages([mid]):
                        pending.discard(mid)
                        received += 1
                        self.progress.task_finished(
                            round_, phase, received, len(ids), self._site_of(reply),
                            "error" if reply.has_error() else "ok")
                        yield reply
                        del reply
        finally:
            for mid in sorted(pending):
                self._abandon(mid, timeout)
            self.progress.phase_finished(round_, phase, received, len(ids),
                                         self.clock.now() - started)


def make_sim_backends(federation: Any, run_dir: Path) -> dict[str, SimSiteBackend]:
    """One :class:`SimSiteBackend` per site, sharing one local process pool."""
    from flwr_hpc.compute.local import LocalEngineBackend

    first = federation.sites[0]
    runner = LocalEngineBackend("sim", engine=first.compute["engine"],
                                workers=max(1, first.compute["workers"]),
                                run_dir=run_dir / "sites" / "sim")
    return {s.name: SimSiteBackend(s.name, s.compute["sim"], runner) for s in federation.sites}
