"""Deadline: semi-synchronous FedAvg -- a round closes at a quorum or a deadline.

Contract
--------
* Round ``r`` asks Flower's usual sample of nodes, drawn from the nodes that are **idle**
  (a node whose update from an earlier round is still out is not asked again).
* The round closes as soon as ``quorum`` of this round's tasks (``ceil(quorum * asked)``)
  have returned a usable update, or ``deadline_s`` after the round started on the grid's
  clock (virtual under the simulator), whichever is first. With nothing asked (every node
  busy) it closes at the first update.
* Updates that miss their round are **not thrown away**: they keep running, and whatever
  has arrived when a later round closes is merged into it with the staleness weight
  ``(1 + tau) ** -staleness_exponent`` (``tau`` = aggregations since the update's base
  model); updates staler than ``max_staleness`` are dropped.
* The merge is FedAvg on deltas, weighted ``num-examples * staleness weight`` and
  normalised by the sum of those weights: with ``quorum = 1``, no deadline and no
  failures it is exactly FedAvg (tested).

See ``strategies/scheduled.py`` for the machinery shared with the other scheduler-aware
strategies.
"""

from __future__ import annotations

from typing import Any

from strategies.scheduled import ScheduledFedAvg, quorum_count


class DeadlineFedAvg(ScheduledFedAvg):
    """Semi-synchronous FedAvg with a quorum, a deadline and stale-update merging.

    Expects from the ClientApp what ``FedAvg`` does (one ArrayRecord, a MetricRecord with
    ``num-examples``); from the grid ``push_messages`` / ``pull_messages`` and, under
    flwr-hpc, ``wait_any`` and the grid clock (any other Flower grid is polled on wall time).

    Parameters
    ----------
    quorum : float (default: 0.5)
        Share of the nodes asked this round whose usable replies close the round.
    deadline_s : float, optional
        Seconds after the round started (grid clock) at which it closes regardless.
    staleness_exponent : float (default: 0.5)
        ``a`` in the staleness weight ``(1 + tau) ** -a``.
    max_staleness : int (default: 8)
        Updates more aggregations old than this are dropped.
    round_timeout_s : float, optional
        Without a deadline, stop waiting after this long (the tasks stay in flight).
    **fedavg
        ``FedAvg``'s arguments (``fraction_train``, ``min_train_nodes``, ...).

    Example
    -------
    >>> strategy = DeadlineFedAvg(quorum=0.5, deadline_s=3600, fraction_evaluate=0.0)
    >>> flwr_hpc.strategy.rounds.start(strategy, grid, initial_arrays, num_rounds=50)
    """

    def __init__(self, *, quorum: float = 0.5, deadline_s: float | None = None,
                 **kwargs: Any) -> None:
        if not 0 < quorum <= 1:
            raise ValueError(f"quorum must be in (0, 1], got {quorum}")
        super().__init__(deadline_s=deadline_s, **kwargs)
        self.quorum = float(quorum)

    def round_closed(self, server_round: int, fresh: int, arrived: int, dispatched: int,
                     in_flight: int) -> bool:
        if not dispatched:
            return arrived >= 1
        return fresh >= quorum_count(self.quorum, dispatched)

    def summary(self) -> None:
        from strategies.scheduled import log

        log.info("\t├── quorum %.2f of the nodes asked each round", self.quorum)
        super().summary()
