"""FedQueue: queue-aware compute budgets and admission (APPFL's baseline, reimplemented).

From APPFL's ``QueueScheduler`` / ``FedQueueAggregator`` (arXiv 2605.02125; the APPFL
repository, ``src/appfl/algorithm/scheduler/queue_scheduler.py``); written here from the
published algorithm, with APPFL's defaults.

Contract
--------
* **Estimates.** Per node, an EWMA of its jobs' queue delay
  ``q <- beta_queue * q_obs + (1 - beta_queue) * q`` (seeded with ``q_init``) and of its
  compute time per local step ``c <- alpha_compute * c_obs + (1 - alpha_compute) * c``
  (seeded with the first observation), both from the grid's timing of each reply.
* **Budget.** A node is sent the current model with a compute budget
  ``J = max(0.5, t_sync - q - theta)`` turned into local steps
  ``k = max(floor(J / c), warm_up_steps)`` (``warm_up_steps`` until ``c`` is known;
  capped at ``max_steps`` if set -- APPFL has no cap) and a learning rate scaled by
  ``min_j k_j / k`` (``k_j`` the budgets of all nodes with an estimate): ``local-steps``
  and ``lr-scale`` in the train config.
* **Admission.** An update whose queue delay is ``<= q_prior + alpha_admission * t_sync``
  (``q_prior``: the node's estimate when it was sent the model) is admitted to the next
  aggregation; a later one goes to a late buffer and is merged one aggregation later
  (an entry from the current model version is held over once), or at once if nothing was
  admitted. A node whose update waits in the late buffer is not asked again until the
  update is merged.
* **Aggregation** (one Flower round): when every node's update has arrived (admitted, late
  or failed), or ``(1 + admission_tolerance) * t_sync`` after the previous aggregation on
  the grid's clock, whichever is first. ``w = sum_i f_i w_i`` with
  ``f_i ∝ s(tau_i) * k_i`` normalised (``s`` = ``(1 + tau) ** -staleness_exponent``;
  APPFL's default is constant, exponent 0). Only the nodes merged are asked again; the
  others keep training.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message

from flwr_hpc.protocol import LOCAL_STEPS_KEY, LR_SCALE_KEY
from flwr_hpc.server.timing import timings_of
from strategies.scheduled import (
    InFlight,
    ScheduledFedAvg,
    grid_now,
    mix_models,
    model_of,
    staleness_weight,
)

log = logging.getLogger("flwr")


def fedqueue_budget(t_sync: float, q_hat: float, theta: float) -> float:
    """``max(0.5, t_sync - q_hat - theta)`` seconds of compute for one job."""
    return max(0.5, t_sync - q_hat - theta)


def fedqueue_steps(budget_s: float, step_s: float | None, warm_up_steps: int,
                   max_steps: int | None = None) -> int:
    """``max(floor(budget / step_s), warm_up_steps)`` (warm-up without an estimate)."""
    k = warm_up_steps if not step_s or step_s <= 0 else max(
        math.floor(budget_s / step_s), warm_up_steps)
    return int(min(k, max_steps)) if max_steps else int(k)


def admitted(q_delay: float, q_prior: float, alpha_admission: float, t_sync: float) -> bool:
    """Whether an update whose job queued ``q_delay`` s is admitted."""
    return q_delay <= q_prior + alpha_admission * t_sync


def fedqueue_weights(staleness: list[int], steps: list[int], exponent: float) -> list[float]:
    """``f_i ∝ s(tau_i) * k_i / sum(k)``, normalised to sum 1."""
    total = float(sum(steps))
    raw = [staleness_weight(t, exponent) * k / total for t, k in zip(staleness, steps,
                                                                     strict=True)]
    norm = sum(raw)
    return [r / norm for r in raw]


def reply_timing(grid: Any, node_id: int, server_round: int) -> Any:
    """The grid's timing record of ``node_id``'s train task of ``server_round`` (or None)."""
    timings = timings_of(grid)
    if timings is None:
        return None
    for site in timings.sites():
        for t in reversed(timings.history(site, phase="train")):
            if t.node_id == node_id and str(t.round) == str(server_round):
                return t
    return None


class FedQueue(ScheduledFedAvg):
    """Queue-aware budgets with admission control and a sync timer (module docstring).

    Parameters
    ----------
    t_sync : float (default: 3600)
        Target seconds between aggregations.
    theta : float (default: 60)
        Safety margin subtracted from the budget.
    alpha_admission : float (default: 0.2)
        Admission slack, as a share of ``t_sync``.
    admission_tolerance : float (default: 0.15)
        The timer fires at ``(1 + tolerance) * t_sync``.
    beta_queue, alpha_compute : float (default: 0.5, 0.5)
        EWMA weights of the newest queue-delay and per-step observations.
    q_init : float (default: 2.0)
        Queue-delay estimate before any observation.
    warm_up_steps : int (default: 20)
        Local steps without a compute estimate, and the least a budget gives.
    max_steps : int, optional
        Cap on a budget (APPFL has none; the bench sets the same cap for every strategy).
    staleness_exponent : float (default: 0.0)
        ``s(tau) = (1 + tau) ** -exponent``; 0 = APPFL's constant.
    """

    def __init__(self, *, t_sync: float = 3600.0, theta: float = 60.0,
                 alpha_admission: float = 0.2, admission_tolerance: float = 0.15,
                 beta_queue: float = 0.5, alpha_compute: float = 0.5, q_init: float = 2.0,
                 warm_up_steps: int = 20, max_steps: int | None = None,
                 staleness_exponent: float = 0.0, max_staleness: int = 1000,
                 **kwargs: Any) -> None:
        super().__init__(staleness_exponent=staleness_exponent, max_staleness=max_staleness,
                         **kwargs)
        if t_sync <= 0 or warm_up_steps < 1:
            raise ValueError("t_sync must be > 0 and warm_up_steps >= 1")
        self.t_sync = float(t_sync)
        self.theta = float(theta)
        self.alpha_admission = float(alpha_admission)
        self.admission_tolerance = float(admission_tolerance)
        self.beta_queue = float(beta_queue)
        self.alpha_compute = float(alpha_compute)
        self.q_init = float(q_init)
        self.warm_up_steps = int(warm_up_steps)
        self.max_steps = max_steps
        self.q_hat: dict[int, float] = {}
        self.c_hat: dict[int, float] = {}
        self._q_prior: dict[int, float] = {}
        self._steps: dict[int, int] = {}
        self._late: list[tuple[InFlight, Message]] = []
        self._last_agg: float | None = None

    checkpoint_transient = ScheduledFedAvg.checkpoint_transient + ("_late",)

    # ------------------------------------------------------------------ dispatch

    def budget_steps(self, node: int) -> int:
        """The node's local steps for its next job."""
        budget = fedqueue_budget(self.t_sync, self.q_hat.get(node, self.q_init), self.theta)
        return fedqueue_steps(budget, self.c_hat.get(node), self.warm_up_steps, self.max_steps)

    def select_train_nodes(self, server_round: int, idle: list[int],
                           all_nodes: list[int]) -> list[int]:
        waiting = {t.node_id for t, _ in self._late}
        if self._last_agg is None:
            self._last_agg = grid_now(self._grid)
        return [n for n in idle if n not in waiting]

    def node_train_config(self, server_round: int, node_id: int,
                          config: ConfigRecord) -> ConfigRecord:
        steps = self.budget_steps(node_id)
        known = [self.budget_steps(n) for n in self.c_hat]
        scale = (min(known) / steps) if known and node_id in self.c_hat else 1.0
        self._steps[node_id] = steps
        self._q_prior[node_id] = self.q_hat.get(node_id, self.q_init)
        config[LOCAL_STEPS_KEY] = steps
        config[LR_SCALE_KEY] = float(scale)
        return config

    # ------------------------------------------------------------------ collecting

    def _observe(self, task: InFlight, reply: Message) -> float:
        """Update the node's estimates from its reply's timing; return its queue delay."""
        timing = reply_timing(self._grid, task.node_id, task.round)
        q = float(timing.queue_wait_s) if timing and timing.queue_wait_s is not None else 0.0
        node = task.node_id
        self.q_hat[node] = (self.beta_queue * q
                            + (1 - self.beta_queue) * self.q_hat.get(node, self.q_init))
        if timing and timing.run_s is not None and timing.steps:
            c = float(timing.run_s) / int(timing.steps)
            prev = self.c_hat.get(node, c)
            self.c_hat[node] = self.alpha_compute * c + (1 - self.alpha_compute) * prev
        return q

    def aggregate_train(self, server_round: int,
                        replies: Any) -> tuple[ArrayRecord | None, Any]:
        for reply in replies:
            log.warning("ignoring a reply that FedQueue did not dispatch (node %s)",
                        reply.metadata.src_node_id)
        grid = self._grid
        num_nodes = len(list(grid.get_node_ids()))
        start = self._last_agg if self._last_agg is not None else grid_now(grid)
        until = start + (1 + self.admission_tolerance) * self.t_sync
        admitted_now: list[tuple[InFlight, Message]] = []
        failed = 0
        while self._inflight and len(admitted_now) + len(self._late) + failed < num_nodes:
            batch = self._next_replies(grid, until)
            if not batch:
                break  # the timer
            for task, reply in batch:
                if reply.has_error():
                    failed += 1
                    admitted_now.append((task, reply))  # screened out (and counted) below
                    continue
                q = self._observe(task, reply)
                prior = self._q_prior.get(task.node_id, self.q_init)
                if admitted(q, prior, self.alpha_admission, self.t_sync):
                    admitted_now.append((task, reply))
                else:
                    log.info("FedQueue: node %s's update queued %.0f s > %.0f s: late",
                             task.node_id, q, prior + self.alpha_admission * self.t_sync)
                    self._late.append((task, reply))
        # late entries from an earlier model version are merged now; this version's wait
        held = [e for e in self._late if e[0].version >= self.version]
        merged_late = [e for e in self._late if e[0].version < self.version]
        entries = admitted_now + merged_late
        if not any(not r.has_error() for _, r in entries) and held:
            entries, held = entries + held, []  # nothing admitted: use the late ones
        self._late = held
        self._last_agg = grid_now(grid)
        current = self._models[self.version]
        arrays, metrics = self._merge(current, entries)
        if arrays is not None:
            self.version += 1
            metrics["late-held"] = len(held)
            metrics["late-merged"] = len(merged_late)
        self._forget_models()
        return arrays, metrics

    def combine(self, current: ArrayRecord,
                used: list[tuple[float, float, InFlight, Message]]) -> ArrayRecord:
        taus = [self.version - t.version for _, _, t, _ in used]
        steps = [self._steps.get(t.node_id, self.warm_up_steps) for _, _, t, _ in used]
        weights = fedqueue_weights(taus, steps, self.staleness_exponent)
        return mix_models(current, [(f, model_of(r)) for f, (_, _, _, r)
                                    in zip(weights, used, strict=True)])

    def held_updates(self) -> list[InFlight]:
        return [t for t, _ in self._late]

    def summary(self) -> None:
        log.info("\t├── FedQueue: t_sync %.0f s, theta %.0f s, admission %.2f, tolerance "
                 "%.2f", self.t_sync, self.theta, self.alpha_admission,
                 self.admission_tolerance)
        super().summary()

