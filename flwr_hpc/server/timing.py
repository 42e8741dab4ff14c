"""Timing signals: what the transport knows about each site's queue waits and run times.

Every finished task of an :class:`~flwr_hpc.server.grid.HPCGrid` adds one :class:`TaskTiming` to
``grid.timings`` (a :class:`SiteTimings`), and the same fields go to ``tasks.jsonl``.
Scheduler-aware strategies (``strategies/queue_aware.py``, ...) read them through this small
public API:

>>> timings = timings_of(grid)                 # None on grids that are not flwr-hpc's
>>> timings.history("polaris")[-1].queue_wait_s
>>> timings.ewma("polaris", "queue_wait_s", alpha=0.3)
>>> timings.step_time("polaris")                # seconds per local step, EWMA

**Every duration is measured on the server's own clock**, so no clock synchronisation
between the server and the sites is assumed:

``transfer_s``
    staging to the site plus fetching the reply, both timed by the server;
``turnaround_s``
    server clock at completion minus server clock at submission;
``run_s``
    the site worker's own ``finished_at - started_at``: a *difference* of two readings of
    the site's clock, so an offset between the clocks cancels;
``queue_wait_s``
    ``turnaround_s - run_s``: everything between submission and completion that was not the
    task running (the batch queue, endpoint start-up, result delivery).

Under the site simulator (``compute.type: sim``) the clock is virtual and the same fields
hold the simulated durations.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from flwr_hpc.protocol import LOCAL_STEPS_KEY

# A train message may carry these in any ConfigRecord: the ClientApp honours them, the
# simulator charges the steps, the timing history divides run time by them.


@dataclass(frozen=True)
class TaskTiming:
    """One finished task, as the server saw it (seconds; ``None`` = not known)."""

    site: str
    node_id: int
    round: str
    phase: str  # "train" / "evaluate" / ... (the message type)
    outcome: str  # "ok" or "error:<CODE>"
    submitted_at: float  # server clock
    turnaround_s: float | None
    queue_wait_s: float | None
    run_s: float | None
    transfer_s: float
    steps: int | None = None  # local steps the message asked for, when known

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return asdict(self)


class SiteTimings:
    """Per-site history of finished tasks, thread-safe, in completion order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_site: dict[str, list[TaskTiming]] = defaultdict(list)

    def add(self, timing: TaskTiming) -> None:
        """Append a finished task to its site's history."""
        with self._lock:
            self._by_site[timing.site].append(timing)

    def sites(self) -> list[str]:
        """The sites with a history, sorted."""
        with self._lock:
            return sorted(self._by_site)

    def history(self, site: str, *, phase: str | None = None,
                ok_only: bool = True) -> list[TaskTiming]:
        """The site's finished tasks, oldest first (``phase`` e.g. ``"train"``)."""
        with self._lock:
            items = list(self._by_site.get(site, ()))
        return [t for t in items if (phase is None or t.phase.split(".")[0] == phase)
                and (not ok_only or t.outcome == "ok")]

    def ewma(self, site: str, field: str, *, alpha: float = 0.3, phase: str | None = "train",
             default: float | None = None) -> float | None:
        """Exponentially weighted mean of ``field`` over the site's history (newest weighs
        ``alpha``); ``default`` when the site has no value yet.
        """
        return ewma([getattr(t, field) for t in self.history(site, phase=phase)],
                    alpha=alpha, default=default)

    def step_time(self, site: str, *, alpha: float = 0.3,
                  default: float | None = None) -> float | None:
        """EWMA of seconds per local step (``run_s / steps``) of the site's train tasks."""
        values = [t.run_s / t.steps for t in self.history(site, phase="train")
                  if t.run_s is not None and t.steps]
        return ewma(values, alpha=alpha, default=default)

    def failure_rate(self, site: str) -> float:
        """Fraction of the site's tasks that did not return a usable reply."""
        items = self.history(site, ok_only=False)
        return sum(t.outcome != "ok" for t in items) / len(items) if items else 0.0

    BREAKDOWN = ("queue_wait_s", "run_s", "transfer_s", "turnaround_s")

    def round_breakdown(self, round_: int | str, *, phase: str = "train"
                        ) -> dict[str, dict[str, float]]:
        """Per site, the mean of each :attr:`BREAKDOWN` field over the round's successful
        ``phase`` tasks, and their count (``tasks``): where the round's time went.
        """
        out: dict[str, dict[str, float]] = {}
        for site in self.sites():
            items = [t for t in self.history(site, phase=phase) if t.round == str(round_)]
            if not items:
                continue
            row: dict[str, float] = {"tasks": float(len(items))}
            for name in self.BREAKDOWN:
                values = [getattr(t, name) for t in items if getattr(t, name) is not None]
                if values:
                    row[name] = round(sum(values) / len(values), 6)
            out[site] = row
        return out

    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """Every site's history as plain dicts (``{site: [timing, ...]}``)."""
        with self._lock:
            return {s: [t.to_dict() for t in v] for s, v in self._by_site.items()}


def ewma(values: Iterable[float | None], *, alpha: float = 0.3,
         default: float | None = None) -> float | None:
    """``m <- alpha * x + (1 - alpha) * m`` over the non-missing values, seeded with the
    first one; ``default`` when there is none.
    """
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    out: float | None = None
    for x in values:
        if x is None or not math.isfinite(x):
            continue
        out = float(x) if out is None else alpha * float(x) + (1 - alpha) * out
    return default if out is None else out


# ----------------------------------------------------------------------------- clocks


class WallClock:
    """The server's clock (seconds since the epoch)."""

    virtual = False

    def now(self) -> float:
        """``time.time()``."""
        return time.time()


class VirtualClock:
    """Simulated time: moves only when the simulator says so, never backwards."""

    virtual = True

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def now(self) -> float:
        """The simulated time."""
        return self._now

    def advance_to(self, t: float) -> None:
        """Move the clock to ``t``, unless it is past that already."""
        with self._lock:
            self._now = max(self._now, float(t))


# ----------------------------------------------------------------------------- helpers


def transport_of(grid: Any) -> Any:
    """The flwr-hpc grid (``HPCGrid``) below wrappers (``.grid`` / ``._grid``), if any."""
    for _ in range(8):
        if grid is None or hasattr(grid, "timings"):
            return grid
        grid = getattr(grid, "grid", None) or getattr(grid, "_grid", None)
    return None


def timings_of(grid: Any) -> SiteTimings | None:
    """The timing history of ``grid`` (``None`` for grids without one, e.g. Flower's)."""
    transport = transport_of(grid)
    return transport.timings if transport is not None else None


def clock_of(grid: Any) -> WallClock | VirtualClock:
    """The grid's clock: virtual under the simulator, else the server's wall clock."""
    transport = transport_of(grid)
    return transport.clock if transport is not None else WallClock()


def site_of(grid: Any, node_id: int) -> str:
    """The site hosting ``node_id`` (``"node-<id>"`` on grids that do not know sites)."""
    transport = transport_of(grid)
    if transport is not None:
        return transport.site_of(node_id)
    return f"node-{node_id}"


def local_steps_of(message: Any) -> int | None:
    """The local steps a train message asks for: its ``local-steps`` config value (the
    flwr-hpc ServerApp sends one in every train message), else None.
    """
    if message.has_error() or not message.metadata.message_type.startswith("train"):
        return None
    for record in message.content.config_records.values():
        if LOCAL_STEPS_KEY in record:
            return int(record[LOCAL_STEPS_KEY])
    return None
