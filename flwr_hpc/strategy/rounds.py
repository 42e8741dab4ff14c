"""The round loop for ServerApps under flwr-hpc: Flower's loop, made to survive faults.

:func:`start` is a drop-in for ``strategy.start(...)`` -- it runs Flower's own
``Strategy.start`` loop -- and adds, when a run directory is known (``$FLWR_HPC_RUN_DIR``,
set by the flwr-hpc runner):

* **a checkpoint after every completed round** and **resume** from the last one
  (:mod:`flwr_hpc.strategy.checkpoint`): rounds are presented to the strategy with their true
  numbers, the initial model is not re-evaluated, and the strategy, node Contexts and RNGs
  are restored;
* **reply screening**: a reply that would make Flower's aggregation raise (no or several
  ArrayRecords, keys or shapes unlike the global model's, non-finite values, a missing or
  non-positive weighting key, metric keys unlike the other replies') is turned into that
  node's error reply -- logged, recorded, left out of aggregation -- instead of aborting the
  ServerApp. Flower would stop the whole run on one such reply.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from flwr.serverapp.strategy import Strategy
from typing_extensions import override

import flwr_hpc.strategy.checkpoint as checkpoint
from flwr_hpc.protocol import ENV_RUN_DIR

log = logging.getLogger("flwr_hpc")


# ----------------------------------------------------------------------------- the log

_FLOWER_LOOP = os.sep + os.path.join("flwr", "serverapp", "strategy") + os.sep


class QuietFlowerLoop(logging.Filter):
    """Flower's round loop at DEBUG, its banner kept: on the ``flwr`` logger, the INFO
    records that ``Strategy.start`` and Flower's strategies emit after the banner (per-round
    sampling and aggregation lines, the MetricRecords, the 127-line "Final results" block)
    become DEBUG records -- in the run's ``debug.txt`` and in a verbose log, not in the
    stream. The banner names the strategy the user chose, not flwr-hpc's wrappers.
    """

    def __init__(self, strategy_name: str) -> None:
        super().__init__()
        self.strategy_name = strategy_name
        self.banner = True

    def filter(self, record: logging.LogRecord) -> bool:
        """Demote (never drop) a loop record."""
        if _FLOWER_LOOP not in record.pathname or record.levelno != logging.INFO:
            return True
        if self.banner:
            if record.msg == "Starting %s strategy:":
                record.args = (self.strategy_name,)
            elif record.msg == "" and record.pathname.endswith("strategy.py"):
                self.banner = False  # the blank line that ends Flower's banner
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def strategy_name(strategy: Any) -> str:
    """The class name of the strategy inside flwr-hpc's transparent wrappers (Flower's DP
    wrappers keep theirs).
    """
    return type(checkpoint.through(strategy)).__name__


@contextlib.contextmanager
def quiet_flower_loop(strategy: Any) -> Iterator[None]:
    """While the loop runs, :class:`QuietFlowerLoop` on the ``flwr`` logger."""
    flt = QuietFlowerLoop(strategy_name(strategy))
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addFilter(flt)
    try:
        yield
    finally:
        flwr_logger.removeFilter(flt)


# ----------------------------------------------------------------------------- screening


def _weighted_by_key(strategy: Any) -> str | None:
    for _ in range(4):
        if strategy is None:
            return None
        key = getattr(strategy, "weighted_by_key", None)
        if isinstance(key, str):
            return key
        strategy = getattr(strategy, "strategy", None)
    return None


def reply_problem(content: Any, *, train: bool, weighted_by_key: str | None,
                  reference: Any = None) -> str:
    """Why this reply content cannot be aggregated ('' if it can)."""
    if train:
        if len(content.array_records) != 1:
            return f"expected exactly one ArrayRecord, got {len(content.array_records)}"
        record = next(iter(content.array_records.values()))
        if reference is not None:
            want = {k: tuple(a.shape) for k, a in reference.items()}
            got = {k: tuple(a.shape) for k, a in record.items()}
            if set(got) != set(want):
                missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
                return (f"array keys differ from the global model's (missing {missing[:3]}, "
                        f"unexpected {extra[:3]})")
            bad = [k for k in want if got[k] != want[k]]
            if bad:
                return (f"array {bad[0]!r} has shape {got[bad[0]]}, the global model has "
                        f"{want[bad[0]]}")
        for key, arr in record.items():
            values = arr.numpy()
            if values.dtype.kind in "fc" and not np.isfinite(values).all():
                return f"array {key!r} has non-finite values"
    if len(content.metric_records) != 1:
        return f"expected exactly one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    if weighted_by_key is not None:
        if weighted_by_key not in metrics:
            return f"the MetricRecord lacks the weighting key {weighted_by_key!r}"
        weight = metrics[weighted_by_key]
        if isinstance(weight, list) or not np.isfinite(weight) or weight <= 0:
            return f"{weighted_by_key!r} must be a positive number, got {weight!r}"
    return ""


def _dropped(msg: Any, problem: str) -> Any:
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode

    reason = f"reply dropped by the server: {problem}"
    log.warning("node %s: %s", msg.metadata.src_node_id, reason)
    return Message(metadata=msg.metadata,
                   error=Error(ErrorCode.REPLY_MESSAGE_UNAVAILABLE, reason))


def screen_stream(replies: Iterable[Any], *, train: bool, weighted_by_key: str | None,
                  reference: Any = None) -> Iterator[Any]:
    """:func:`screen` one reply at a time, for streaming strategies (which aggregate only
    the metric keys every reply has, so differing metric keys are not a problem there).
    """
    for msg in replies:
        problem = "" if msg.has_error() else reply_problem(
            msg.content, train=train, weighted_by_key=weighted_by_key, reference=reference)
        yield _dropped(msg, problem) if problem else msg


def screen(replies: Iterable[Any], *, train: bool, weighted_by_key: str | None,
           reference: Any = None) -> list[Any]:
    """The replies with every unusable one replaced by an error reply for its node."""
    replies = list(replies)
    problems: dict[int, str] = {}
    for i, msg in enumerate(replies):
        if not msg.has_error():
            problem = reply_problem(msg.content, train=train, weighted_by_key=weighted_by_key,
                                    reference=reference)
            if problem:
                problems[i] = problem
    # Flower also needs the same metric keys in every reply: keep the most common set
    keysets = {i: frozenset(next(iter(m.content.metric_records.values())).keys())
               for i, m in enumerate(replies) if not m.has_error() and i not in problems}
    if len(set(keysets.values())) > 1:
        common = Counter(keysets.values()).most_common(1)[0][0]
        for i, keys in keysets.items():
            if keys != common:
                problems[i] = (f"metric keys {sorted(keys)} differ from the other replies' "
                               f"{sorted(common)}")
    return [_dropped(msg, problems[i]) if i in problems else msg
            for i, msg in enumerate(replies)]


def keep_dtypes(arrays: Any, reference: Any) -> Any:
    """The aggregate with the global model's float dtypes. FedOpt's and the DP wrappers'
    NumPy arithmetic promotes float32 to float64, which would double every later message.
    """
    if arrays is None or reference is None:
        return arrays
    from flwr.app import Array, ArrayRecord

    changed = False
    out = {}
    for key, arr in arrays.items():
        want = reference[key].dtype if key in reference else None
        values = arr.numpy()
        if want is not None and want != values.dtype and values.dtype.kind == "f" and (
                np.dtype(want).kind == "f"):
            out[key] = Array(values.astype(want))
            changed = True
        else:
            out[key] = arr
    return ArrayRecord(out) if changed else arrays


# ----------------------------------------------------------------------------- the loop


class RoundsFailed(Exception):
    """Rounds in a row trained nothing: no train reply succeeded and the strategy produced
    no new model. Raised so that the run fails with the reason instead of "completing"
    with an untrained model.
    """


class _Tally:
    """The train replies of one round as they pass: how many succeeded, the first errors."""

    def __init__(self) -> None:
        self.ok = 0
        self.errors: list[str] = []

    def watch(self, replies: Iterable[Any]) -> Iterator[Any]:
        for msg in replies:
            if not msg.has_error():
                self.ok += 1
            elif len(self.errors) < 3:
                self.errors.append(f"node {msg.metadata.src_node_id}: "
                                   f"{msg.error.reason[:300]}")
            yield msg


class _FailedRounds:
    """Counts rounds in a row that trained nothing; raises :class:`RoundsFailed` at ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self.in_a_row = 0

    def round_ended(self, server_round: int, tally: _Tally, arrays: Any, *,
                    waiting: bool = False) -> None:
        if tally.ok or arrays is not None:
            self.in_a_row = 0
            return
        if waiting and not tally.errors:
            # a scheduler-aware strategy's round closed (its deadline) while its tasks are
            # still queued at their sites: nothing failed, nothing came back yet
            log.info("[round %d] no update yet: train tasks still in flight", server_round)
            return
        self.in_a_row += 1
        why = "; ".join(tally.errors) or "no reply arrived before the deadline"
        log.error("[round %d] trained nothing: no train reply succeeded (%s)",
                  server_round, why)
        if self.in_a_row >= self.limit:
            raise RoundsFailed(
                f"{self.in_a_row} round(s) in a row up to round {server_round} trained "
                f"nothing: no train reply succeeded ({why})")


class ScreenedStrategy(Strategy):
    """Flower's round loop over ``strategy``, with its rounds shifted by ``offset`` (a
    resumed run continues its numbering), every reply screened before aggregation (an
    unusable one becomes that node's error), aggregates kept in the global model's dtypes,
    and rounds that train nothing counted (:class:`RoundsFailed` after
    ``max_failed_rounds`` in a row). A wrapper, as Flower's DP strategies are: it holds
    ``strategy`` and delegates to it; the wrapped strategy is not modified.

    Parameters
    ----------
    strategy : Strategy
        The strategy that configures and aggregates.
    offset : int
        Rounds already done (a resumed run).
    max_failed_rounds : int
        Rounds in a row without a successful train reply (and without a new model)
        before the run fails.
    """

    def __init__(self, strategy: Strategy, offset: int = 0, max_failed_rounds: int = 1 << 30
                 ) -> None:
        self.strategy = strategy
        self.offset = offset
        self._failed = _FailedRounds(max_failed_rounds)
        self._weighted_by_key = _weighted_by_key(strategy)
        # a streaming strategy gets the replies one by one; any other gets a list, as from
        # Flower's own grids (some strategies iterate more than once)
        self._streaming = bool(getattr(strategy, "streaming", False))
        self._check = screen_stream if self._streaming else screen
        self._sent: Any = None

    @override
    def configure_train(self, server_round, arrays, config, grid):
        self._sent = arrays
        return self.strategy.configure_train(server_round + self.offset, arrays, config, grid)

    @override
    def aggregate_train(self, server_round, replies):
        reference = self._sent
        replies = self._check(replies, train=True, weighted_by_key=self._weighted_by_key,
                              reference=reference)
        tally = _Tally()
        counted: Iterable[Any] = tally.watch(replies)
        if not self._streaming:
            counted = list(counted)  # a list, as from Flower's grids
        arrays, metrics = self.strategy.aggregate_train(server_round + self.offset, counted)
        self._failed.round_ended(server_round + self.offset, tally, arrays,
                                 waiting=bool(getattr(self.strategy, "waiting_only", False)))
        return keep_dtypes(arrays, reference), metrics

    @override
    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.strategy.configure_evaluate(server_round + self.offset, arrays, config,
                                                grid)

    @override
    def aggregate_evaluate(self, server_round, replies):
        replies = self._check(replies, train=False, weighted_by_key=self._weighted_by_key)
        return self.strategy.aggregate_evaluate(server_round + self.offset, replies)

    @override
    def summary(self) -> None:
        self.strategy.summary()


class _BudgetSpent(Exception):
    """Raised after the round that used up ``time_budget_s`` (ends the loop early)."""


def start(strategy: Any, grid: Any, initial_arrays: Any, num_rounds: int = 3,
          timeout: float = 3600, train_config: Any = None, evaluate_config: Any = None,
          evaluate_fn: Callable[[int, Any], Any] | None = None, *,
          run_dir: str | Path | None = None, time_budget_s: float | None = None,
          max_failed_rounds: int = 3) -> Any:
    """``strategy.start(...)`` with reply screening, a checkpoint after every round, and
    resume from the last checkpoint. ``run_dir`` defaults to ``$FLWR_HPC_RUN_DIR``; without
    one, rounds are screened but not checkpointed. With ``time_budget_s`` no round starts
    once that many seconds have passed on the grid's clock (virtual under the simulator)
    since this call: the round that crosses the budget is the last one. A round in which
    no train reply succeeded and the strategy produced no model trained nothing; after
    ``max_failed_rounds`` such rounds in a row the run fails (:class:`RoundsFailed`) with
    the nodes' errors, instead of ending with an untrained model.
    """
    from flwr_hpc.server.timing import clock_of, transport_of
    from flwr_hpc.strategy.streaming_grid import StreamingGrid

    clock = clock_of(grid)
    began = clock.now()
    last: dict[str, Any] = {}
    run_dir = run_dir or os.environ.get(ENV_RUN_DIR)
    root = Path(run_dir) / checkpoint.CHECKPOINT_DIR if run_dir else None
    transport = transport_of(grid)
    resumed = checkpoint.load_checkpoint(root) if root is not None else None
    offset, arrays = 0, initial_arrays
    if resumed is not None:
        offset, arrays = resumed.round, resumed.arrays
        checkpoint.restore_state(strategy, resumed.strategy, resumed.state_arrays)
        if transport is not None:
            transport.import_contexts(resumed.contexts)
        checkpoint.restore_rng(resumed.rng, resumed.state_arrays)
        log.info("resuming from the checkpoint of round %d (%s); %d of %d rounds left",
                 offset, resumed.path, max(num_rounds - offset, 0), num_rounds)
        if offset >= num_rounds:
            from flwr.serverapp.strategy import Result

            result = Result()
            result.arrays = arrays
            return result

    def round_done(server_round: int, round_arrays: Any) -> Any:
        if server_round == 0:
            # the initial model: evaluated on a fresh run, already evaluated when resuming
            return evaluate_fn(0, round_arrays) if evaluate_fn and not offset else None
        rnd = server_round + offset
        res = evaluate_fn(rnd, round_arrays) if evaluate_fn else None
        if root is not None:
            state_arrays: dict[str, np.ndarray] = {}
            ckpt = checkpoint.Checkpoint(
                round=rnd, arrays=round_arrays,
                strategy=checkpoint.capture_state(strategy, state_arrays),
                state_arrays=state_arrays,
                contexts=transport.export_contexts() if transport is not None else {})
            ckpt.rng = checkpoint.capture_rng(state_arrays)
            path = checkpoint.write_checkpoint(root, ckpt)
            log.debug("[round %d] checkpoint written: %s", rnd, path)
        last.update(round=rnd, arrays=round_arrays, metrics=res)
        elapsed = clock.now() - began
        if time_budget_s is not None and elapsed >= time_budget_s and rnd < num_rounds:
            log.info("[round %d] time budget of %.0f s spent (%.0f s on the %s clock); "
                     "no further rounds", rnd, time_budget_s, elapsed,
                     "virtual" if clock.virtual else "server")
            raise _BudgetSpent
        return res

    # a streaming strategy is handed the replies one at a time (the grid's opt-in);
    # every other strategy gets Flower's list
    loop_grid = StreamingGrid(grid) if getattr(strategy, "streaming", False) else grid
    try:
        with quiet_flower_loop(strategy):
            result = ScreenedStrategy(strategy, offset, max_failed_rounds).start(
                grid=loop_grid, initial_arrays=arrays, num_rounds=num_rounds - offset,
                timeout=timeout, train_config=train_config,
                evaluate_config=evaluate_config, evaluate_fn=round_done)
    except _BudgetSpent:
        from flwr.serverapp.strategy import Result

        result = Result()
        result.arrays = last["arrays"]
        if last.get("metrics") is not None:
            result.evaluate_metrics_serverapp[last["round"] - offset] = last["metrics"]
    if offset:
        for name in ("train_metrics_clientapp", "evaluate_metrics_clientapp",
                     "evaluate_metrics_serverapp"):
            shifted = {r + offset: v for r, v in getattr(result, name).items() if r > 0}
            setattr(result, name, shifted)
    return result
