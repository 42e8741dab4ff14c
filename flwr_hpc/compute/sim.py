"""The site simulator's compute backend (``compute.type: sim``).

A simulated site runs the **real** site worker and the **real** ClientApps on this
machine (all sim sites share one local process pool: ``compute.workers`` of the first sim
site, at least 1), and plans, per task, the *virtual* timeline the site's model draws
(see :mod:`flwr_hpc.server.sim` for the model and the grid that delivers in virtual time)::

    transfer in  = latency_s + message array bytes / bandwidth_mb_s
    held         = while max_jobs of the site's jobs are queued or running, a new one
                   waits for the first of them to end (a facility's per-user job limit)
    queue wait   ~ lognormal(median = queue_median_s, sigma = queue_sigma)
                   | the replay of a real trace's class (queue_model: trace;
                   :mod:`flwr_hpc.compute.queue_trace`)
    run          = startup_s + local steps * step_s   (train)   |   eval_s   (evaluate)
                   a run longer than walltime_s (> 0) is killed at walltime_s
    transfer out = latency_s + message array bytes / bandwidth_mb_s
    failure      : with probability failure_prob the job dies part-way through its run
    charged      = run * nodes node-seconds (queue time is free; a killed or failed job
                   is charged for the time it ran; ``tasks.jsonl``'s ``node_hours``)

Draws come from one random stream per site seeded from ``(seed, site)``, consumed in the
order of the site's submissions (the lognormal draw is made under the trace model too,
so both models consume the stream alike).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from typing_extensions import override

from flwr_hpc.compute.base import ComputeBackend
from flwr_hpc.compute.queue_trace import TraceReplay, available_traces, trace_class
from flwr_hpc.errors import ConfigError


@dataclass(frozen=True)
class SimPlan:
    """One task's virtual timeline (seconds)."""

    transfer_in_s: float
    queue_wait_s: float
    run_s: float
    transfer_out_s: float
    fails: bool
    held_s: float = 0.0  # waiting for the site's job limit (counted in queue_wait_s)
    killed: bool = False  # ran into the walltime

    @property
    def total_s(self) -> float:
        """Submission to reply: both transfers, the queue wait and the run."""
        return self.transfer_in_s + self.queue_wait_s + self.run_s + self.transfer_out_s


def site_rng(seed: int, site: str) -> np.random.Generator:
    """The site's own random stream (stable across processes and Python hash seeds)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(site.encode())])


class SimSiteBackend(ComputeBackend):
    """A simulated site: plans each task's virtual timeline; real work goes to ``runner``."""

    def __init__(self, site: str, params: dict[str, Any], runner: ComputeBackend) -> None:
        super().__init__(site)
        self.params = dict(params)
        self._runner = runner
        self._rng = site_rng(int(self.params["seed"]), site)
        self.replay: TraceReplay | None = None
        if self.params.get("queue_model", "lognormal") == "trace":
            self.replay = make_replay(site, self.params)
        self._ends: list[float] = []  # planned ends of the site's jobs (for max_jobs)

    def plan(self, phase: str, steps: int | None, nbytes: int, now: float = 0.0) -> SimPlan:
        """Draw the next task's timeline from the site's model: ``phase`` (``train...``
        runs ``steps`` local steps, anything else takes ``eval_s``), ``nbytes`` of arrays
        moved each way, submitted at virtual time ``now``. Consumes the site's random
        stream (and its trace replay).
        """
        p = self.params
        xfer = float(p["latency_s"]) + nbytes / (float(p["bandwidth_mb_s"]) * 1e6)
        held = self._held(now + xfer)
        median, sigma = float(p["queue_median_s"]), float(p["queue_sigma"])
        queue = median * math.exp(sigma * self._rng.standard_normal()) if median > 0 else 0.0
        if self.replay is not None:
            queue = self.replay.next_wait(now + xfer + held)
        if phase.startswith("train"):
            run = float(p["startup_s"]) + (steps or 0) * float(p["step_s"])
        else:
            run = float(p["eval_s"])
        fails = bool(self._rng.random() < float(p["failure_prob"]))
        walltime = float(p.get("walltime_s") or 0.0)
        if fails:  # dies part-way through its run; nothing comes back
            run *= float(self._rng.random())
        killed = not fails and walltime > 0 and run > walltime
        if killed:
            run = walltime
        out = 0.0 if fails or killed else xfer
        plan = SimPlan(xfer, held + queue, run, out, fails or killed, held_s=held,
                       killed=killed)
        self._ends.append(now + xfer + held + queue + run)
        return plan

    def _held(self, at: float) -> float:
        """How long a job reaching the site at ``at`` waits for the per-user job limit."""
        limit = int(self.params.get("max_jobs") or 0)
        self._ends = [e for e in self._ends if e > at]
        if not limit or len(self._ends) < limit:
            return 0.0
        # it enters when enough of the jobs ahead of it have ended
        return sorted(self._ends)[len(self._ends) - limit] - at

    @override
    def start(self, fn: Callable[[dict], dict], job: dict[str, Any]) -> Future:
        return self._runner.submit(fn, job)

    @override
    def close(self) -> None:
        self._runner.close()  # shared; closing twice is a no-op


def make_replay(site: str, params: dict[str, Any]) -> TraceReplay:
    """The site's trace replay (its own seeded stream, separate from the site's draws)."""
    name = params.get("trace")
    if name not in available_traces():
        raise ConfigError("federation", f"sites.{site}.compute.sim.trace",
                          f"no shipped queue trace {name!r}; shipped: {available_traces()}")
    cls = trace_class(str(name), int(params.get("nodes") or 1),
                      float(params.get("walltime_s") or 0))
    rng = np.random.default_rng([int(params["seed"]) & 0xFFFFFFFF, zlib.crc32(site.encode()),
                                 7])
    return TraceReplay(cls, rng, start_hour=float(params.get("start_hour", 9.0)),
                       mode=str(params.get("replay", "sequential")))


def make_sim_backends(federation: Any, run_dir: Path, preload: tuple[str, ...] = ()
                      ) -> dict[str, SimSiteBackend]:
    """One :class:`SimSiteBackend` per site, sharing one local process pool."""
    from flwr_hpc.compute.local import LocalEngineBackend

    first = federation.sites[0]
    runner = LocalEngineBackend("sim", engine=first.compute["engine"],
                                workers=max(1, first.compute["workers"]),
                                run_dir=run_dir / "sites" / "sim", preload=preload)
    return {s.name: SimSiteBackend(s.name, s.compute["sim"], runner) for s in federation.sites}
