"""Site simulator: the virtual-time grid (its backend is :mod:`flwr_hpc.compute.sim`).

A federation whose sites all have ``compute.type: sim`` runs the **real** site worker and
the **real** ClientApps (the tiny model, on this machine's cores), but every task is also
given a *virtual* timeline drawn from the site's model, and the grid delivers replies in
virtual-time order on a :class:`~flwr_hpc.server.timing.VirtualClock`. A day of cross-facility
batch queues is simulated in the minutes the training itself takes.

Per task (``sites.<name>.compute.sim``)::

    transfer in  = latency_s + message array bytes / bandwidth_mb_s
    queue wait   ~ lognormal(median = queue_median_s, sigma = queue_sigma)
    run          = startup_s + local steps * step_s   (train)   |   eval_s   (evaluate)
    transfer out = latency_s + message array bytes / bandwidth_mb_s
    failure      : with probability failure_prob the job dies part-way through its run
                   (NODE_UNAVAILABLE; the ClientApp is not run)

The local steps are the message's ``local-steps`` config value or the job's
``train.local_steps`` (:func:`flwr_hpc.server.timing.local_steps_of`). Draws come from one
random stream per site seeded from ``(seed, site)``, consumed in the order of the site's
submissions, so the same seed and the same strategy decisions give the same timeline
whatever the real scheduling of the processes was. Server-side work (aggregation,
central evaluation) takes no virtual time.

All sim sites share one real process pool (``compute.workers`` of the first sim site,
at least 1): the real tasks only need to finish, not to run in parallel.

The simulator is composed, not patched in: :class:`VirtualTimeGrid` is an
:class:`~flwr_hpc.server.grid.HPCGrid` given a :class:`VirtualDelivery` (the timeline that
plans each task and delivers in virtual time, through the grid's public members only) and
:class:`~flwr_hpc.compute.sim.SimSiteBackend` backends; it overrides nothing.
"""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

from flwr_hpc.compute.sim import SimPlan, SimSiteBackend, make_sim_backends
from flwr_hpc.payload.objects import array_bytes
from flwr_hpc.server.delivery import HPCGrid as GridView
from flwr_hpc.server.grid import HPCGrid
from flwr_hpc.server.tasks import Task, wall_timing
from flwr_hpc.server.timing import TaskTiming, VirtualClock


class VirtualDelivery:
    """Virtual time: every task gets its planned timeline when it is submitted, its reply
    is due when the virtual clock reaches the plan's end, and every deadline (the
    ``timeout`` of ``send_and_receive`` and ``stream_replies``, ``wait_any``'s ``until``)
    is virtual. The real tasks run as soon as they are submitted; the grid waits for the
    real result of the task that is due next on the virtual clock.
    """

    def __init__(self) -> None:
        self.clock = VirtualClock()
        self._plans: dict[str, SimPlan] = {}
        self._due: dict[str, float] = {}

    def now(self) -> float:
        """The virtual clock's time."""
        return self.clock.now()

    def submitting(self, grid: GridView, task: Task) -> Message | None:
        """Draw ``task``'s plan from its site's simulator and stamp it submitted now
        (virtual); a plan that fails returns the ``NODE_UNAVAILABLE`` reply instead.
        """
        backend = grid.sites[task.node.site].backend
        assert isinstance(backend, SimSiteBackend)
        now = self.clock.now()
        plan = backend.plan(task.phase, task.steps, array_bytes(task.message), now)
        self._plans[task.message_id] = plan
        self._due[task.message_id] = now + plan.total_s
        task.submitted_at = now
        if not plan.fails:
            return None
        if plan.killed:
            why = (f"simulated walltime: the job at site '{task.node.site}' was killed at its "
                   f"walltime of {plan.run_s:.0f} s (sim.walltime_s; it needed "
                   f"{backend.params['startup_s']:g} s + {task.steps or 0} steps x "
                   f"{backend.params['step_s']:g} s)")
        else:
            why = (f"simulated failure: the job at site '{task.node.site}' died after "
                   f"{plan.queue_wait_s + plan.run_s:.0f} s (failure_prob="
                   f"{backend.params['failure_prob']})")
        return Message(Error(ErrorCode.NODE_UNAVAILABLE, why), reply_to=task.message)

    def finished_at(self, task: Task) -> float:
        """The planned end of ``task`` (now, if it has no plan)."""
        return self._due.get(task.message_id, self.clock.now())

    def is_due(self, task: Task) -> bool:
        """Whether the virtual clock has reached ``task``'s planned end."""
        return self._due.get(task.message_id, self.clock.now()) <= self.clock.now()

    def timing(self, task: Task, outcome: str, result: dict | None,
               fetch_s: float) -> TaskTiming:
        """The planned durations (the wall-clock ones for a task that was never
        submitted); forgets the task's plan.
        """
        plan = self._plans.pop(task.message_id, None)
        self._due.pop(task.message_id, None)
        if plan is None:  # never submitted (unknown node, staging failure)
            return wall_timing(task, outcome, result, fetch_s)
        return TaskTiming(site=task.node.site, node_id=task.node.node_id, round=task.round,
                          phase=task.phase, outcome=outcome, submitted_at=task.submitted_at,
                          turnaround_s=plan.total_s, queue_wait_s=plan.queue_wait_s,
                          run_s=plan.run_s, transfer_s=plan.transfer_in_s + plan.transfer_out_s,
                          steps=task.steps)

    def wait_any(self, grid: GridView, ids: list[str], until: float | None) -> list[str]:
        """Advance the virtual clock to the next completion among ``ids`` (waiting for its
        real result) and return the ids due then; at ``until`` return ``[]``.
        """
        now = self.clock.now()
        live = [(self._due.get(m, now), m) for m in grid.live_tasks(ids)]
        if not live:
            return []
        nxt = min(d for d, _ in live)
        if until is not None and nxt > until:
            self.clock.advance_to(until)
            return []
        due = [m for d, m in sorted(live) if d <= nxt]
        grid.await_results(due, every=True)
        if grid.stopping:
            return []
        self.clock.advance_to(nxt)
        return due

    def next_ready(self, grid: GridView, inbox: queue.Queue[str], pending: set[str],
                   deadline: float | None) -> list[str] | None:
        """:meth:`wait_any` on ``pending`` until ``deadline``, with ``None`` for ``[]``
        (nothing due before the deadline, or nothing in flight).
        """
        return self.wait_any(grid, sorted(pending), deadline) or None


class VirtualTimeGrid(HPCGrid):
    """An :class:`HPCGrid` over simulated sites, living in virtual time
    (:class:`VirtualDelivery`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("delivery", VirtualDelivery())
        super().__init__(*args, **kwargs)

    @classmethod
    def from_federation(cls, federation: Any, fab_bytes: bytes, *, run_dir: Path,
                        **kwargs: Any) -> VirtualTimeGrid:
        """The grid over ``federation``'s simulated sites (each a :class:`SimSiteBackend`)."""
        from flwr_hpc.fab import heavy_imports

        kwargs.setdefault("backends", make_sim_backends(
            federation, run_dir, tuple(heavy_imports(fab_bytes))))
        return super().from_federation(federation, fab_bytes, run_dir=run_dir, **kwargs)
