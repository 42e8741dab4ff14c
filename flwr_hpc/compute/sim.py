"""The site simulator's compute backend (``compute.type: sim``).

A simulated site runs the **real** site worker and the **real** ClientApps on this
machine (all sim sites share one local process pool: ``compute.workers`` of the first sim
site, at least 1), and plans, per task, the *virtual* timeline the site's model draws
(see :mod:`flwr_hpc.server.sim` for the model and the grid that delivers in virtual time)::

    transfer in  = latency_s + message array bytes / bandwidth_mb_s
    queue wait   ~ lognormal(median = queue_median_s, sigma = queue_sigma)
    run          = startup_s + local steps * step_s   (train)   |   eval_s   (evaluate)
    transfer out = latency_s + message array bytes / bandwidth_mb_s
    failure      : with probability failure_prob the job dies part-way through its run

Draws come from one random stream per site seeded from ``(seed, site)``, consumed in the
order of the site's submissions.
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

    def plan(self, phase: str, steps: int | None, nbytes: int) -> SimPlan:
        """Draw the next task's timeline from the site's model: ``phase`` (``train...``
        runs ``steps`` local steps, anything else takes ``eval_s``) and ``nbytes`` of
        arrays moved each way. Consumes the site's random stream.
        """
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

    @override
    def start(self, fn: Callable[[dict], dict], job: dict[str, Any]) -> Future:
        return self._runner.submit(fn, job)

    @override
    def close(self) -> None:
        self._runner.close()  # shared; closing twice is a no-op


def make_sim_backends(federation: Any, run_dir: Path) -> dict[str, SimSiteBackend]:
    """One :class:`SimSiteBackend` per site, sharing one local process pool."""
    from flwr_hpc.compute.local import LocalEngineBackend

    first = federation.sites[0]
    runner = LocalEngineBackend("sim", engine=first.compute["engine"],
                                workers=max(1, first.compute["workers"]),
                                run_dir=run_dir / "sites" / "sim")
    return {s.name: SimSiteBackend(s.name, s.compute["sim"], runner) for s in federation.sites}
