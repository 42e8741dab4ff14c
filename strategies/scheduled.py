"""What the scheduler-aware strategies share: train tasks that outlive a round.

A batch-queued site answers minutes to hours after it was asked, so the strategies in
``deadline.py``, ``buffered_async.py`` and ``queue_aware.py`` do not hand their train
messages to Flower's blocking ``send_and_receive`` (which drops whatever misses the round).
``configure_train`` *pushes* the messages itself (``grid.push_messages``) and returns none
to Flower's loop; ``aggregate_train`` then collects replies from every train task still in
flight -- this round's and earlier rounds' -- with the grid's non-blocking ``wait_any`` /
``pull_messages`` (flwr-hpc's grids; any other Flower grid is polled), until the subclass
says the round is closed. Nothing is thrown away for being late: a late update is merged
into a later round with a **staleness weight**.

Aggregation is on model deltas, so stale updates are comparable with fresh ones::

    delta_i  = w_i - w_(base of i)              (the global model node i started from)
    tau_i    = rounds (model versions) between i's base and now
    s(tau)   = (1 + tau) ** -staleness_exponent       (polynomial, as in FedAsync)
    w_new    = w + server_lr * sum(n_i s_i delta_i) / norm

with ``n_i`` the reply's ``num-examples``; ``norm = sum(n_i s_i)`` (Deadline, QueueAware:
with only fresh updates this *is* FedAvg) or ``sum(n_i)`` (BufferedAsync: staleness
shrinks the step, as in FedBuff). Updates staler than ``max_staleness`` are dropped.

Without a deadline a round still stops waiting after ``round_timeout_s`` (the job's
``strategy.round_timeout_s``); what has not arrived stays in flight for later rounds.
A node with a task in flight is busy: it gets no second task (its ``Context`` would fork)
and no evaluate message. Unusable replies are screened as ``flwr_hpc.strategy.rounds`` does and
count as failures of their node. Tasks still in flight when the run ends are abandoned
by the grid; after a restart from a checkpoint they are simply dispatched again.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from flwr_hpc.server.timing import clock_of, transport_of
from flwr_hpc.strategy.rounds import reply_problem

log = logging.getLogger("flwr")


def staleness_weight(tau: int, exponent: float) -> float:
    """``(1 + tau) ** -exponent``: 1 for a fresh update, smaller the staler it is."""
    if tau < 0:
        raise ValueError(f"staleness must be >= 0, got {tau}")
    return float((1.0 + tau) ** (-exponent))


@dataclass
class InFlight:
    """A train task pushed by the strategy and not yet aggregated."""

    node_id: int
    round: int  # the round that dispatched it
    version: int  # the global model version it started from


def grid_now(grid: Any) -> float:
    """The grid's clock (virtual under the flwr-hpc simulator), else wall time."""
    return clock_of(grid).now()


class ScheduledFedAvg(FedAvg):
    """FedAvg whose train tasks may span rounds (see the module docstring).

    Subclasses decide *whom* to ask (:meth:`select_train_nodes`), *what* each node is told
    (:meth:`node_train_config`) and *when* a round closes (:meth:`round_closed`).
    """

    streaming = False  # rounds.start hands over a list (this strategy pulls its own replies)
    # tasks in flight, the base models they started from, this round's ids, the grid: the
    # submitting process's state; a resumed run starts with none in flight
    checkpoint_transient = ("_inflight", "_models", "_dispatched", "_grid", "_round_config")
    normalize_by_staleness = True
    # a node whose reply arrives is asked again at once with the current global model
    # (FedBuff: nobody waits for the buffer to fill), instead of at the next round
    redispatch_on_arrival = False

    def __init__(self, *, staleness_exponent: float = 0.5, max_staleness: int = 8,
                 server_lr: float = 1.0, deadline_s: float | None = None,
                 round_timeout_s: float | None = None, poll_s: float = 0.5,
                 **fedavg: Any) -> None:
        super().__init__(**fedavg)
        if staleness_exponent < 0 or max_staleness < 0 or server_lr <= 0:
            raise ValueError("staleness_exponent and max_staleness must be >= 0 and "
                             "server_lr > 0")
        self.staleness_exponent = float(staleness_exponent)
        self.max_staleness = int(max_staleness)
        self.server_lr = float(server_lr)
        self.deadline_s = deadline_s
        # a safety net without a deadline: stop waiting (tasks stay in flight, nothing is lost)
        self.round_timeout_s = round_timeout_s
        self.poll_s = poll_s
        self.version = 0  # how many aggregations the global model has seen
        self._inflight: dict[str, InFlight] = {}
        self._models: dict[int, ArrayRecord] = {}  # base models still referenced
        self._grid: Grid | None = None
        self._round_started = 0.0
        self._dispatched: set[str] = set()  # this round's message ids
        self._failed_nodes = 0
        self._round_config = ConfigRecord()
        # the last round ended with nothing to merge only because every task is still
        # in flight (queued at its site): not a failed round (flwr_hpc.strategy.rounds)
        self.waiting_only = False

    # ------------------------------------------------------------------ hooks

    def select_train_nodes(self, server_round: int, idle: list[int],
                           all_nodes: list[int]) -> list[int]:
        """Nodes to ask this round: Flower's sample size, drawn from the idle nodes."""
        wanted = max(int(len(all_nodes) * self.fraction_train), self.min_train_nodes)
        return random.sample(idle, min(wanted, len(idle)))

    def node_train_config(self, server_round: int, node_id: int,
                          config: ConfigRecord) -> ConfigRecord:
        """The config one node receives (a copy of the round's)."""
        return config

    def round_closed(self, server_round: int, fresh: int, arrived: int, dispatched: int,
                     in_flight: int) -> bool:
        """Whether to stop collecting: ``fresh`` of this round's ``dispatched`` tasks and
        ``arrived`` usable updates in all are in; ``in_flight`` tasks are still out."""
        raise NotImplementedError

    # ------------------------------------------------------------------ Flower hooks

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self._models[self.version] = arrays
        self._round_config = config
        self._round_started = grid_now(grid)
        all_nodes = sorted(grid.get_node_ids())
        busy = {t.node_id for t in self._inflight.values()}
        idle = [n for n in all_nodes if n not in busy]
        nodes = sorted(self.select_train_nodes(server_round, idle, all_nodes))
        self._dispatched = set(self._push(server_round, nodes))
        log.info("configure_train: asked %d node(s) (%d busy from earlier rounds, %d idle)",
                 len(nodes), len(busy), len(idle) - len(nodes))
        return []  # pushed already: Flower's loop has nothing to send and wait for

    def _push(self, server_round: int, nodes: list[int]) -> list[str]:
        """Send ``nodes`` a train task on the current global model (this round's config,
        through :meth:`node_train_config`); record them in flight; return the ids."""
        arrays = self._models[self.version]
        messages = []
        for node in nodes:
            cfg = ConfigRecord(dict(self._round_config))
            cfg["server-round"] = server_round
            cfg = self.node_train_config(server_round, node, cfg)
            content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: cfg})
            messages.append(Message(content=content, dst_node_id=node,
                                    message_type=MessageType.TRAIN, group_id=str(server_round)))
        ids = list(self._grid.push_messages(messages)) if messages else []
        for mid, node in zip(ids, nodes, strict=True):
            self._inflight[mid] = InFlight(node, server_round, self.version)
        return ids

    def on_arrival(self, server_round: int, task: InFlight, reply: Message) -> None:
        """Called for a reply collected while its round stays open (the replies that close
        a round are asked again by the next round, on the new model); asks the node again
        at once, on the current model, when :attr:`redispatch_on_arrival` is set."""
        if self.redispatch_on_arrival:
            self._push(server_round, [task.node_id])

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        busy = {t.node_id for t in self._inflight.values()}
        messages = [m for m in super().configure_evaluate(server_round, arrays, config, grid)
                    if m.metadata.dst_node_id not in busy]
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, Any]:
        for reply in replies:  # Flower's loop sent nothing; a wrapper may still pass some
            log.warning("ignoring a reply that %s did not dispatch (node %s)",
                        type(self).__name__, reply.metadata.src_node_id)
        updates = self._collect(server_round)
        current = self._models[self.version]
        arrays, metrics = self._merge(current, updates)
        if arrays is not None:
            self.version += 1
        self._forget_models()
        return arrays, metrics

    # ------------------------------------------------------------------ collecting

    def _until(self) -> float | None:
        limits = [x for x in (self.deadline_s, self.round_timeout_s) if x is not None]
        return self._round_started + min(limits) if limits else None

    def _collect(self, server_round: int) -> list[tuple[InFlight, Message]]:
        grid = self._grid
        got: list[tuple[InFlight, Message]] = []
        fresh = arrived = 0
        until = self._until()
        while self._inflight and not self.round_closed(
                server_round, fresh, arrived, len(self._dispatched), len(self._inflight)):
            batch = self._next_replies(grid, until)
            if not batch:
                break  # the deadline
            closed = False
            for task, reply in batch:
                got.append((task, reply))
                if not reply.has_error():
                    arrived += 1
                    fresh += task.round == server_round
                closed = closed or self.round_closed(server_round, fresh, arrived,
                                                     len(self._dispatched), len(self._inflight))
                if not closed:  # the arrivals that close the round wait for its model
                    self.on_arrival(server_round, task, reply)
        # whatever else is already in is merged now rather than next round
        now = grid_now(grid)
        while self._inflight and (batch := self._next_replies(grid, now, block=False)):
            got.extend(batch)
        return got

    def _next_replies(self, grid: Any, until: float | None, *,
                      block: bool = True) -> list[tuple[InFlight, Message]]:
        """Block until some in-flight replies are in (or ``until``); pop and return them."""
        ids = sorted(self._inflight)
        transport = transport_of(grid)
        if transport is not None and hasattr(transport, "wait_any"):
            ready = transport.wait_any(ids, until=until if block else grid_now(grid))
            replies = list(grid.pull_messages(ready)) if ready else []
            if ready and not replies:  # abandoned meanwhile
                for mid in ready:
                    self._inflight.pop(mid, None)
        else:  # any other Flower grid: poll
            while True:
                replies = list(grid.pull_messages(ids))
                now = time.time()
                if replies or not block or (until is not None and now >= until):
                    break
                time.sleep(self.poll_s if until is None else
                           max(0.0, min(self.poll_s, until - now)))
        out = []
        for reply in sorted(replies, key=lambda m: m.metadata.reply_to_message_id):
            task = self._inflight.pop(reply.metadata.reply_to_message_id, None)
            if task is not None:
                out.append((task, reply))
        return out

    # ------------------------------------------------------------------ merging

    def _usable(self, task: InFlight, reply: Message) -> str:
        """Why this reply cannot be merged ('' if it can)."""
        if reply.has_error():
            return f"error {reply.error.code}: {reply.error.reason}"
        return reply_problem(reply.content, train=True, weighted_by_key=self.weighted_by_key,
                             reference=self._models.get(task.version))

    def _screen(self, updates: list[tuple[InFlight, Message]]
                ) -> tuple[list[tuple[float, float, InFlight, Message]], int, int]:
        """``(used, failed, dropped_stale)``: the usable updates as ``(num-examples,
        staleness weight, task, reply)``."""
        used: list[tuple[float, float, InFlight, Message]] = []
        dropped_stale = failed = 0
        for task, reply in updates:
            problem = self._usable(task, reply)
            if problem:
                failed += 1
                log.info("node %s (round %d): not merged: %s", task.node_id, task.round,
                         problem)
                continue
            tau = self.version - task.version
            if tau > self.max_staleness:
                dropped_stale += 1
                log.info("node %s: update %d versions old dropped (max_staleness %d)",
                         task.node_id, tau, self.max_staleness)
                continue
            metrics = next(iter(reply.content.metric_records.values()))
            n = float(metrics[self.weighted_by_key])
            used.append((n, staleness_weight(tau, self.staleness_exponent), task, reply))
        self._failed_nodes += failed
        return used, failed, dropped_stale

    def _merge(self, current: ArrayRecord, updates: list[tuple[InFlight, Message]]
               ) -> tuple[ArrayRecord | None, Any]:
        self.waiting_only = not updates and bool(self._inflight)
        used, failed, dropped_stale = self._screen(updates)
        if not used:
            log.warning("no usable update this round (%d failed, %d too stale); the global "
                        "model is unchanged", failed, dropped_stale)
            return None, None
        out = self.combine(current, used)
        taus = [self.version - t.version for _, _, t, _ in used]
        metrics = self.train_metrics_aggr_fn(
            [reply.content for _, _, _, reply in used], self.weighted_by_key)
        metrics["updates"] = len(used)
        metrics["stale-updates"] = sum(t > 0 for t in taus)
        metrics["staleness-mean"] = float(np.mean(taus))
        metrics["staleness-max"] = int(max(taus))
        metrics["failed-updates"] = failed
        metrics["dropped-stale"] = dropped_stale
        log.info("merged %d update(s) (%d stale, max staleness %d)", len(used),
                 metrics["stale-updates"], metrics["staleness-max"])
        return out, metrics

    def combine(self, current: ArrayRecord,
                used: list[tuple[float, float, InFlight, Message]]) -> ArrayRecord:
        """The new global model from the usable updates (``(num-examples, staleness
        weight, task, reply)``): FedAvg on deltas, see the module docstring."""
        coeffs = [n * s for n, s, _, _ in used]
        norm = sum(coeffs) if self.normalize_by_staleness else sum(n for n, _, _, _ in used)
        total: dict[str, np.ndarray] = {}
        for (_, _, task, reply), c in zip(used, coeffs, strict=True):
            base = self._models[task.version]
            record = next(iter(reply.content.array_records.values()))
            for key, arr in record.items():
                delta = arr.numpy().astype(np.float64) - base[key].numpy().astype(np.float64)
                if key in total:
                    total[key] += (c / norm) * delta
                else:
                    total[key] = (c / norm) * delta
        out = {}
        for key, arr in current.items():
            values = arr.numpy()
            out[key] = Array((values.astype(np.float64) + self.server_lr * total[key])
                             .astype(values.dtype))
        return ArrayRecord(out)

    def held_updates(self) -> list[InFlight]:
        """Collected updates a subclass holds for a later aggregation (their base models
        are kept)."""
        return []

    def _forget_models(self) -> None:
        keep = ({t.version for t in self._inflight.values()} | {self.version}
                | {t.version for t in self.held_updates()})
        for v in list(self._models):
            if v not in keep:
                del self._models[v]

    def summary(self) -> None:
        log.info("\t├── %s: staleness exponent %.2f, max staleness %d, server lr %.2f, "
                 "deadline %s", type(self).__name__, self.staleness_exponent,
                 self.max_staleness, self.server_lr,
                 "none" if self.deadline_s is None else f"{self.deadline_s:.0f} s")
        super().summary()


def mix_models(current: ArrayRecord, parts: list[tuple[float, ArrayRecord]]) -> ArrayRecord:
    """``w + sum_i c_i (w_i - w)`` = ``(1 - sum c_i) w + sum_i c_i w_i`` for ``parts`` =
    ``[(c_i, w_i)]``: the model-mixing update of FedAsync, FedCompass and FedQueue (which
    mix *models*, not deltas against each update's base); in float64, cast back."""
    out = {}
    for key, arr in current.items():
        w = arr.numpy().astype(np.float64)
        acc = w.copy()
        for c, record in parts:
            acc += c * (record[key].numpy().astype(np.float64) - w)
        out[key] = Array(acc.astype(arr.numpy().dtype))
    return ArrayRecord(out)


def model_of(reply: Message) -> ArrayRecord:
    """The (one) ArrayRecord a train reply carries."""
    return next(iter(reply.content.array_records.values()))


def quorum_count(quorum: float, dispatched: int) -> int:
    """Replies that close a round: ``ceil(quorum * dispatched)``, at least 1."""
    return max(1, math.ceil(quorum * dispatched - 1e-9)) if dispatched else 0
