"""Queue-aware budgets (in the spirit of FedQueue): each site trains as long as its queue
lets it, so that every update arrives by the round's target time.

Contract
--------
* From the grid's timing history (``flwr_hpc.server.timing``, measured on the server's clock) the
  strategy predicts, per site, the queue wait ``q`` and transfer time ``x`` (EWMAs with
  ``ewma_alpha``) and the run time of ``k`` local steps, ``r(k) = fixed + k * per_step``
  (least squares over the site's recent train tasks; ``per_step = run / steps`` until two
  different step counts have been seen).
* The round's target time ``T`` is ``target_round_s`` if set, else the predicted arrival of
  the slowest site asked this round with the default budget:
  ``max(q + x + r(default_steps))``.
* Each site gets ``steps = floor((T - q - x - fixed) / per_step)`` clamped to
  ``[min_steps, max_steps]`` -- sites with short queues train longer instead of idling
  while the slowest queue drains -- and its learning rate is scaled by
  ``(default_steps / steps) ** lr_exponent`` clamped to ``[1/lr_scale_max, lr_scale_max]``
  (more steps, smaller steps). Sites without history get the defaults.
* Both travel in the train message's config as ``local-steps`` and ``lr-scale``; the
  ClientApp honours them and the simulator charges the steps.
* Rounds are synchronous (``quorum = 1``) unless ``quorum`` / ``deadline_s`` say otherwise;
  late updates are merged with a staleness weight exactly as in ``strategies/deadline.py``,
  which this strategy extends.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord

from flwr_hpc.protocol import LOCAL_STEPS_KEY, LR_SCALE_KEY
from flwr_hpc.server.timing import timings_of, transport_of
from strategies.deadline import DeadlineFedAvg

log = logging.getLogger("flwr")



@dataclass(frozen=True)
class SitePrediction:
    """Predicted durations of one site's next train task (seconds)."""

    queue_wait_s: float
    transfer_s: float
    fixed_s: float  # run time that does not depend on the steps (start-up, loading)
    step_s: float  # run time per local step

    def arrival_s(self, steps: int) -> float:
        return self.queue_wait_s + self.transfer_s + self.fixed_s + steps * self.step_s


def step_budgets(predictions: dict[str, SitePrediction | None], *, default_steps: int,
                 min_steps: int, max_steps: int, target_s: float | None = None
                 ) -> tuple[float | None, dict[str, int]]:
    """``(T, {site: steps})`` for the sites of one round (see the module docstring)."""
    known = [p for p in predictions.values() if p is not None]
    if target_s is None and known:
        target_s = max(p.arrival_s(default_steps) for p in known)
    budgets: dict[str, int] = {}
    for site, p in predictions.items():
        if p is None or target_s is None:
            budgets[site] = default_steps
            continue
        room = target_s - p.queue_wait_s - p.transfer_s - p.fixed_s
        steps = max_steps if p.step_s <= 0 else math.floor(room / p.step_s + 1e-9)
        budgets[site] = int(min(max(steps, min_steps), max_steps))
    return target_s, budgets


def lr_scale(steps: int, default_steps: int, *, exponent: float, max_scale: float) -> float:
    """``(default_steps / steps) ** exponent`` clamped to ``[1/max_scale, max_scale]``."""
    scale = (default_steps / steps) ** exponent
    return float(min(max(scale, 1.0 / max_scale), max_scale))


def run_time_model(history: list[Any], window: int = 8) -> tuple[float, float] | None:
    """``(fixed_s, step_s)`` from a site's recent train tasks (``run_s``, ``steps``)."""
    points = [(t.steps, t.run_s) for t in history[-window:] if t.steps and t.run_s is not None]
    if not points:
        return None
    ks = [k for k, _ in points]
    if len(set(ks)) < 2:
        return 0.0, sum(r / k for k, r in points) / len(points)
    n = len(points)
    mk, mr = sum(ks) / n, sum(r for _, r in points) / n
    var = sum((k - mk) ** 2 for k in ks)
    slope = sum((k - mk) * (r - mr) for k, r in points) / var
    slope = max(slope, 0.0)
    return max(mr - slope * mk, 0.0), slope


class QueueAwareFedAvg(DeadlineFedAvg):
    """Per-site step budgets and learning-rate scales from predicted queue waits.

    Expects from the ClientApp that it trains ``config["local-steps"]`` steps with its
    learning rate times ``config["lr-scale"]`` (this repository's ClientApp does); from the
    grid, under flwr-hpc, the timing history (``flwr_hpc.server.timing.timings_of``) and
    ``site_of``. On other grids every node gets the defaults.

    Parameters
    ----------
    default_steps : int
        The job's ``train.local_steps``: the budget without history and of the slowest site.
    min_steps, max_steps : int (default: 1, 4 x default_steps)
        Bounds of a site's budget.
    target_round_s : float, optional
        The round's target time; default: the slowest asked site's predicted arrival.
    lr_exponent, lr_scale_max : float (default: 0.5, 4.0)
        ``lr-scale = (default_steps / steps) ** lr_exponent`` within ``[1/max, max]``.
    ewma_alpha : float (default: 0.3)
        Weight of the newest observation in the queue-wait and transfer EWMAs.
    quorum : float (default: 1.0)
        Synchronous by default; see :class:`strategies.deadline.DeadlineFedAvg`.

    Example
    -------
    >>> strategy = QueueAwareFedAvg(default_steps=30, max_steps=120, fraction_evaluate=0.0)
    """

    def __init__(self, *, default_steps: int, min_steps: int = 1, max_steps: int | None = None,
                 target_round_s: float | None = None, lr_exponent: float = 0.5,
                 lr_scale_max: float = 4.0, ewma_alpha: float = 0.3, quorum: float = 1.0,
                 **kwargs: Any) -> None:
        super().__init__(quorum=quorum, **kwargs)
        if default_steps < 1 or min_steps < 1:
            raise ValueError("default_steps and min_steps must be >= 1")
        self.default_steps = int(default_steps)
        self.min_steps = int(min_steps)
        self.max_steps = int(max_steps or 4 * default_steps)
        if self.max_steps < self.min_steps:
            raise ValueError(f"max_steps ({self.max_steps}) < min_steps ({self.min_steps})")
        self.target_round_s = target_round_s
        self.lr_exponent = float(lr_exponent)
        self.lr_scale_max = float(lr_scale_max)
        self.ewma_alpha = float(ewma_alpha)
        self._budgets: dict[int, tuple[int, float]] = {}
        self.last_target_s: float | None = None

    def predict(self, site: str) -> SitePrediction | None:
        """The site's next train task, from the grid's timing history (None: no history)."""
        timings = timings_of(self._grid)
        if timings is None:
            return None
        history = timings.history(site, phase="train")
        model = run_time_model(history)
        if model is None:
            return None
        q = timings.ewma(site, "queue_wait_s", alpha=self.ewma_alpha, default=0.0)
        x = timings.ewma(site, "transfer_s", alpha=self.ewma_alpha, default=0.0)
        return SitePrediction(queue_wait_s=q, transfer_s=x, fixed_s=model[0], step_s=model[1])

    def select_train_nodes(self, server_round: int, idle: list[int],
                           all_nodes: list[int]) -> list[int]:
        nodes = super().select_train_nodes(server_round, idle, all_nodes)
        self._plan(sorted(nodes))
        return nodes

    def _plan(self, nodes: list[int]) -> None:
        transport = transport_of(self._grid)
        site_of = (transport.site_of if transport is not None
                   else (lambda n: f"node-{n}"))
        sites = {n: site_of(n) for n in nodes}
        predictions = {s: self.predict(s) for s in sorted(set(sites.values()))}
        target, budgets = step_budgets(predictions, default_steps=self.default_steps,
                                       min_steps=self.min_steps, max_steps=self.max_steps,
                                       target_s=self.target_round_s)
        self.last_target_s = target
        self._budgets = {
            n: (budgets[s], lr_scale(budgets[s], self.default_steps,
                                     exponent=self.lr_exponent, max_scale=self.lr_scale_max))
            for n, s in sites.items()}
        if target is not None:
            log.info("queue-aware budgets for a %.0f s round: %s", target, ", ".join(
                f"{s}={budgets[s]} steps" for s in sorted(budgets)))

    def node_train_config(self, server_round: int, node_id: int,
                          config: ConfigRecord) -> ConfigRecord:
        steps, scale = self._budgets.get(node_id, (self.default_steps, 1.0))
        config[LOCAL_STEPS_KEY] = steps
        config[LR_SCALE_KEY] = scale
        return config
