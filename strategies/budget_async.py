"""Allocation-aware asynchronous FL: merge every arrival at once, and size each site's local
work by what a step costs there and how stale its update will be.

flwr-hpc's answer to FedQueue and FedCompass on batch-queued facilities. Neither of them
(nor FedAsync, FedBuff) looks at what a job *costs*: a 512-node job charges 64x the
node-hours of an 8-node job for the same local steps, and an update from a site whose
queue holds jobs for hours arrives many aggregations stale and is discounted anyway. The
grid knows both -- each site's ``nodes`` per job and its timing history -- so this
strategy spends local steps where they are cheap and fresh.

Contract
--------
* **Asynchronous.** Every idle node is asked to train on the current global model; each
  usable reply is merged as it arrives (one Flower "round" = one arrival; several arriving
  at the same instant are merged together) and its node is asked again at once, on the
  new model. Merge on deltas against the model the update started from:
  ``w <- w + server_lr * s(tau) * delta`` with ``s(tau) = (1 + tau) ** -a``
  (``staleness_exponent``; several: weighted by ``num-examples``, normalised by their
  sum). Failed replies are skipped; updates staler than ``max_staleness`` are dropped.
* **Budgets.** From the grid's timing history of each site (``run = fixed + k * step``,
  least squares as in ``strategies/queue_aware.py``; queue wait and transfer EWMAs) and
  its ``nodes`` per job, a site's next job gets

      k = clamp(floor((B * s(tau_hat) - nodes * fixed) / (nodes * step)), min_steps, max_steps)

  local steps: ``B`` is the node-seconds of a default job (``default_steps``) at the
  median site, and ``tau_hat`` the site's predicted turnaround divided by the mean time
  between aggregations (its expected staleness). Cheap, fresh sites train up to
  ``max_steps``; expensive or long-queued ones down to ``min_steps``. A site without
  history gets ``default_steps``. The steps travel as ``local-steps`` (and ``lr-scale``
  1) in the train config; the ClientApp honours them.
"""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

from flwr.app import ConfigRecord

from flwr_hpc.protocol import LOCAL_STEPS_KEY, LR_SCALE_KEY
from flwr_hpc.server.timing import timings_of, transport_of
from strategies.buffered_async import BufferedAsyncFedAvg
from strategies.queue_aware import run_time_model
from strategies.scheduled import grid_now

log = logging.getLogger("flwr")


def budget_steps(*, budget_node_s: float, nodes: int, fixed_s: float, step_s: float,
                 staleness: float, exponent: float, min_steps: int, max_steps: int) -> int:
    """``clamp(floor((B * s(staleness) - nodes * fixed) / (nodes * step)))``."""
    if step_s <= 0:
        return max_steps
    room = budget_node_s * (1.0 + staleness) ** (-exponent) - nodes * fixed_s
    return int(min(max(math.floor(room / (nodes * step_s) + 1e-9), min_steps), max_steps))


class BudgetAsync(BufferedAsyncFedAvg):
    """Asynchronous merging with allocation- and staleness-aware step budgets.

    Parameters
    ----------
    default_steps : int
        The job's ``train.local_steps``: a site's steps without history, and the job that
        sets the node-second budget ``B``.
    min_steps, max_steps : int (default: default_steps // 2, 4 x default_steps)
        Bounds of a site's budget.
    server_lr : float (default: 1.0)
        Step size of a fresh update's delta.
    staleness_exponent : float (default: 0.5)
        ``a`` of ``s(tau) = (1 + tau) ** -a``, in the merge and the budget.
    ewma_alpha : float (default: 0.3)
        Weight of the newest observation in the queue-wait, transfer and merge-interval
        EWMAs.
    """

    redispatch_on_arrival = False  # each arrival closes its round; the next round asks again

    def __init__(self, *, default_steps: int, min_steps: int | None = None,
                 max_steps: int | None = None, ewma_alpha: float = 0.3,
                 **kwargs: Any) -> None:
        kwargs.pop("buffer_size", None)
        super().__init__(buffer_size=1, **kwargs)
        if default_steps < 1:
            raise ValueError("default_steps must be >= 1")
        self.default_steps = int(default_steps)
        self.min_steps = int(min_steps or max(1, default_steps // 2))
        self.max_steps = int(max_steps or 4 * default_steps)
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= min_steps ({self.min_steps}) <= max_steps "
                             f"({self.max_steps})")
        self.ewma_alpha = float(ewma_alpha)
        self.merge_interval_s: float | None = None
        self._last_merge: float | None = None
        self._budgets: dict[int, int] = {}

    def _site_cost(self, site: str, nodes: int) -> tuple[float, float, float] | None:
        """``(fixed_s, step_s, turnaround_s)`` predicted for the site (None: no history)."""
        timings = timings_of(self._grid)
        if timings is None:
            return None
        model = run_time_model(timings.history(site, phase="train"))
        if model is None:
            return None
        fixed, step = model
        q = timings.ewma(site, "queue_wait_s", alpha=self.ewma_alpha, default=0.0) or 0.0
        x = timings.ewma(site, "transfer_s", alpha=self.ewma_alpha, default=0.0) or 0.0
        return fixed, step, q + x + fixed + self.default_steps * step

    def select_train_nodes(self, server_round: int, idle: list[int],
                           all_nodes: list[int]) -> list[int]:
        now = grid_now(self._grid)
        if self._last_merge is not None and now > self._last_merge:
            gap = now - self._last_merge
            self.merge_interval_s = (gap if self.merge_interval_s is None else
                                     self.ewma_alpha * gap
                                     + (1 - self.ewma_alpha) * self.merge_interval_s)
        self._last_merge = now
        nodes = super().select_train_nodes(server_round, idle, all_nodes)
        self._plan(nodes)
        return nodes

    def _plan(self, nodes: list[int]) -> None:
        transport = transport_of(self._grid)
        if transport is None:
            self._budgets = {}
            return
        sites = {n: transport.site_of(n) for n in nodes}
        all_sites = sorted(getattr(transport, "sites", {}) or set(sites.values()))
        size = {s: int(getattr(transport.sites.get(s), "nodes", 1) or 1)
                if hasattr(transport, "sites") else 1 for s in all_sites}
        costs = {s: self._site_cost(s, size[s]) for s in all_sites}
        known = {s: c for s, c in costs.items() if c is not None}
        if not known:
            self._budgets = {}
            return
        budget = statistics.median(size[s] * (f + self.default_steps * k)
                                   for s, (f, k, _) in known.items())
        interval = self.merge_interval_s or 0.0
        self._budgets = {}
        for node, site in sites.items():
            cost = known.get(site)
            if cost is None:
                continue
            fixed, step, turnaround = cost
            tau_hat = turnaround / interval if interval > 0 else 0.0
            self._budgets[node] = budget_steps(
                budget_node_s=budget, nodes=size[site], fixed_s=fixed, step_s=step,
                staleness=tau_hat, exponent=self.staleness_exponent,
                min_steps=self.min_steps, max_steps=self.max_steps)
        if self._budgets:
            log.info("budget-async: %s", ", ".join(
                f"{sites[n]}={k} steps" for n, k in sorted(self._budgets.items())))

    def node_train_config(self, server_round: int, node_id: int,
                          config: ConfigRecord) -> ConfigRecord:
        config[LOCAL_STEPS_KEY] = self._budgets.get(node_id, self.default_steps)
        config[LR_SCALE_KEY] = 1.0
        return config

    def summary(self) -> None:
        log.info("\t├── budget-async: steps %d-%d (default %d), staleness a=%.2f",
                 self.min_steps, self.max_steps, self.default_steps, self.staleness_exponent)
        super().summary()
