"""Buffered asynchronous FL (FedBuff-style): every site always busy, aggregate every K.

Contract
--------
* Every node is always training: a node whose reply arrives is asked again at once with
  the current global model (Nguyen et al., "Federated Learning with Buffered Asynchronous
  Aggregation", AISTATS 2022; a Flower "round" here is one aggregation), so no site ever
  waits for another one's batch queue or for the buffer to fill.
* An aggregation happens as soon as ``buffer_size`` (K) usable updates have arrived, from
  whichever rounds they were dispatched in (or at ``deadline_s`` on the grid's clock with
  what has arrived, if a deadline is set).
* Each update is a delta against the model version it started from, discounted by its
  staleness ``tau`` (aggregations since then) with ``(1 + tau) ** -staleness_exponent``;
  ``w <- w + server_lr * sum(n_i s_i delta_i) / sum(n_i)``: unlike Deadline, staleness
  shrinks the step instead of only re-weighting the updates. Updates staler than
  ``max_staleness`` are dropped.
* With K = all nodes, fresh updates only and ``server_lr = 1`` a step is FedAvg.

Built on the grid's non-blocking ``push_messages`` / ``wait_any`` / ``pull_messages``
(``strategies/scheduled.py``).
"""

from __future__ import annotations

from typing import Any

from strategies.scheduled import ScheduledFedAvg


class BufferedAsyncFedAvg(ScheduledFedAvg):
    """FedBuff: aggregate every ``buffer_size`` arrivals, staleness-discounted.

    Expects from the ClientApp what ``FedAvg`` does; from the grid ``push_messages`` /
    ``pull_messages`` and, under flwr-hpc, ``wait_any`` and the grid clock.

    Parameters
    ----------
    buffer_size : int (default: 2)
        Usable updates per aggregation (K).
    server_lr : float (default: 1.0)
        Server step size applied to the buffered, staleness-discounted mean delta.
    staleness_exponent, max_staleness, deadline_s, round_timeout_s, **fedavg
        As for :class:`strategies.deadline.DeadlineFedAvg`.

    Example
    -------
    >>> strategy = BufferedAsyncFedAvg(buffer_size=2, fraction_evaluate=0.0)
    >>> flwr_hpc.strategy.rounds.start(strategy, grid, initial_arrays, num_rounds=200,
    ...                       time_budget_s=48 * 3600)
    """

    normalize_by_staleness = False
    redispatch_on_arrival = True

    def __init__(self, *, buffer_size: int = 2, **kwargs: Any) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        super().__init__(**kwargs)
        self.buffer_size = int(buffer_size)

    def select_train_nodes(self, server_round: int, idle: list[int],
                           all_nodes: list[int]) -> list[int]:
        return list(idle)  # keep everybody busy

    def round_closed(self, server_round: int, fresh: int, arrived: int, dispatched: int,
                     in_flight: int) -> bool:
        return arrived >= self.buffer_size

    def summary(self) -> None:
        from strategies.scheduled import log

        log.info("\t├── buffer of %d updates per aggregation", self.buffer_size)
        super().summary()
