"""FedAsync: every arrival is an aggregation, mixed in by a staleness-discounted weight.

Xie, Koyejo & Gupta, "Asynchronous Federated Optimization" (arXiv:1903.03934), as run in
the cross-facility study with polynomial staleness ``a = 0.5`` and ``alpha = 0.9`` (APPFL's
``FedAsyncAggregator``). Written here from the published algorithm.

Contract
--------
* Every idle node is asked to train on the current global model; a node whose update has
  been merged is asked again at once, on the model its update went into (one Flower
  "round" = one arrival = one aggregation; the next round starts at the same instant).
* An update ``x_i`` trained from global version ``tau_i`` arriving at version ``t`` is
  mixed in with ``alpha_t = alpha * (t - tau_i + 1) ** -a``::

      x_t = (1 - alpha_t) * x_(t-1) + alpha_t * x_i

  (the local *model* is mixed, not its delta against its base). Several arrivals at the
  same instant are mixed one after another in arrival order, each with its own
  ``alpha_t``; the version counts aggregations (Flower rounds).
* Failed replies are skipped (the node is asked again); updates staler than
  ``max_staleness`` are dropped.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Message

from strategies.buffered_async import BufferedAsyncFedAvg
from strategies.scheduled import InFlight, mix_models, model_of, staleness_weight


def fedasync_alpha(alpha: float, staleness: int, exponent: float) -> float:
    """``alpha * (staleness + 1) ** -exponent`` (polynomial staleness function)."""
    return float(alpha) * staleness_weight(staleness, exponent)


class FedAsync(BufferedAsyncFedAvg):
    """Asynchronous FedAvg with polynomial staleness mixing (see the module docstring).

    Parameters
    ----------
    alpha : float (default: 0.9)
        Mixing weight of a fresh update.
    staleness_exponent : float (default: 0.5)
        ``a`` of the polynomial staleness function ``(staleness + 1) ** -a``.
    max_staleness : int (default: 1000)
        Updates more aggregations old than this are dropped (FedAsync drops none; a
        safety net).
    **kwargs
        :class:`~strategies.scheduled.ScheduledFedAvg`'s and ``FedAvg``'s arguments.
    """

    redispatch_on_arrival = False  # each arrival closes its round; the next round asks again

    def __init__(self, *, alpha: float = 0.9, max_staleness: int = 1000,
                 **kwargs: Any) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        kwargs.pop("buffer_size", None)
        super().__init__(buffer_size=1, max_staleness=max_staleness, **kwargs)
        self.alpha = float(alpha)

    def combine(self, current: ArrayRecord,
                used: list[tuple[float, float, InFlight, Message]]) -> ArrayRecord:
        out = current
        for _, _, task, reply in used:  # in arrival order
            a = fedasync_alpha(self.alpha, self.version - task.version,
                               self.staleness_exponent)
            out = mix_models(out, [(a, model_of(reply))])
        return out

    def summary(self) -> None:
        from strategies.scheduled import log

        log.info("\t├── FedAsync: alpha %.2f, polynomial staleness a=%.2f", self.alpha,
                 self.staleness_exponent)
        super().summary()
