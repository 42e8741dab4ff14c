"""Delivery timelines: when a task counts as submitted, finished and due.

The grid (:class:`~flwr_hpc.server.grid.HPCGrid`) asks its :class:`Delivery` every
question whose answer depends on *whose time* the run lives in, and nothing else differs:

* :class:`WallDelivery` (real and local sites): the server's wall clock; a reply is due as
  soon as its result is known, and receive loops wait on the replies as they arrive.
* :class:`~flwr_hpc.server.sim.VirtualDelivery` (the site simulator): a virtual clock;
  each task gets a planned timeline when it is submitted and its reply is due when the
  virtual clock reaches its planned end; deadlines are virtual.

A delivery uses only the grid's public members, listed in the :class:`HPCGrid` protocol
here (``sites``, ``stopping``, ``live_tasks``, ``await_results``).
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterable
from typing import Protocol

from flwr.app import Message

from flwr_hpc.server.sites import SiteRuntime
from flwr_hpc.server.tasks import Task, wall_timing
from flwr_hpc.server.timing import TaskTiming, VirtualClock, WallClock


class HPCGrid(Protocol):
    """What a delivery may use of the grid (its public members; see
    :class:`flwr_hpc.server.grid.HPCGrid`).
    """

    sites: dict[str, SiteRuntime]

    @property
    def stopping(self) -> bool:
        """Whether the run is stopping (every wait ends)."""
        ...

    def live_tasks(self, message_ids: Iterable[str]) -> dict[str, Task]:
        """The tasks of ``message_ids`` still in flight."""
        ...

    def await_results(self, message_ids: Iterable[str], *, until: float | None = None,
                      every: bool = False) -> list[str]:
        """Block until one (``every``: each) of the in-flight ``message_ids`` has its
        result, the grid clock reaches ``until``, or the run stops; return the ids whose
        result is known now.
        """
        ...


class Delivery(Protocol):
    """The grid's timeline (see the module docstring)."""

    @property
    def clock(self) -> WallClock | VirtualClock:
        """The clock every timing signal of the run is read on."""
        ...

    def now(self) -> float:
        """The time receive deadlines are measured on."""
        ...

    def submitting(self, grid: HPCGrid, task: Task) -> Message | None:
        """``task`` is about to be submitted: stamp it; a reply returned here ends the task
        without running it (e.g. a simulated failure).
        """
        ...

    def finished_at(self, task: Task) -> float:
        """When ``task``'s result counts as known, on :attr:`clock`."""
        ...

    def is_due(self, task: Task) -> bool:
        """Whether the ServerApp may see ``task``'s reply now."""
        ...

    def timing(self, task: Task, outcome: str, result: dict | None,
               fetch_s: float) -> TaskTiming:
        """``task``'s durations for the timing history and ``tasks.jsonl``."""
        ...

    def wait_any(self, grid: HPCGrid, ids: list[str], until: float | None) -> list[str]:
        """:meth:`HPCGrid.wait_any` on this timeline."""
        ...

    def next_ready(self, grid: HPCGrid, inbox: queue.Queue[str], pending: set[str],
                   deadline: float | None) -> list[str] | None:
        """The next message ids a receive loop may collect (``[]``: none yet, ask again;
        ``None``: the deadline has passed). ``inbox`` gets each id of the loop's call
        once its result is known.
        """
        ...


class WallDelivery:
    """The server's wall clock: replies are due as soon as they are known."""

    def __init__(self) -> None:
        self.clock = WallClock()

    def now(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()

    def submitting(self, grid: HPCGrid, task: Task) -> Message | None:
        """Stamp ``task`` submitted now; every task runs (returns None)."""
        task.submitted_at = self.clock.now()
        return None

    def finished_at(self, task: Task) -> float:
        """Now, on the wall clock (asked when the result arrives)."""
        return self.clock.now()

    def is_due(self, task: Task) -> bool:
        """Always: a reply is due as soon as its result is known."""
        return True

    def timing(self, task: Task, outcome: str, result: dict | None,
               fetch_s: float) -> TaskTiming:
        """The durations measured on the server's clock (:func:`wall_timing`)."""
        return wall_timing(task, outcome, result, fetch_s)

    def wait_any(self, grid: HPCGrid, ids: list[str], until: float | None) -> list[str]:
        """Wait for the first result among ``ids``, until ``until`` at most."""
        return grid.await_results(ids, until=until)

    def next_ready(self, grid: HPCGrid, inbox: queue.Queue[str], pending: set[str],
                   deadline: float | None) -> list[str] | None:
        """The next id from ``inbox``, waiting a second at most (``[]`` if none came;
        ``None`` once ``deadline`` has passed).
        """
        wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
        if wait <= 0:
            return None
        try:
            return [inbox.get(timeout=wait)]
        except queue.Empty:
            return []
