"""Streaming aggregation: Flower's FedAvg family, aggregating replies one at a time.

Part of the plugin's public API (the counterpart of the grid's streaming opt-in,
:class:`flwr_hpc.strategy.streaming_grid.StreamingGrid`): any ServerApp may use it, this project's
LoRA job and the transport benchmark's app do.

Flower's ``FedAvg.aggregate_train`` turns the replies into a list and then averages them,
so the server holds every client's model at once: O(clients x model). ``HPCGrid`` yields
replies as they arrive; :class:`StreamingFedAvg` folds each into a running weighted sum
(float64) and lets it go, so the server holds O(model) whatever the number of clients.
The result equals Flower's FedAvg on the same replies (to float32 rounding; tested to 1e-6
relative). Metrics are aggregated by the strategy's own ``train_metrics_aggr_fn`` from the
replies' MetricRecords only (a few numbers each).

The FedOpt family and FedAvgM call ``FedAvg.aggregate_train`` through ``super()``; putting
:class:`StreamingFedAvg` after them in the bases (``class StreamingFedAdam(FedAdam,
StreamingFedAvg)``) makes their averaging stream too. Flower's DP wrappers clip every
reply first and so take a list: they still work, without the memory saving.
"""

from __future__ import annotations

import gc
import io
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Result,
)
from flwr.serverapp.strategy.strategy_utils import InconsistentMessageReplies
from typing_extensions import override

from flwr_hpc.errors import PayloadIntegrityError, PayloadMissingError

log = logging.getLogger("flwr")

_BLOCK = 1 << 20  # elements per step of the running sum (8 MiB of float64 scratch)


def ndarray_view(arr: Array) -> np.ndarray:
    """``arr.numpy()`` without the copy: a read-only view of the ``np.save`` bytes the
    Array holds (Flower's ``numpy()`` reads them through a BytesIO into a new array).
    """
    if arr.stype != SType.NUMPY:
        return arr.numpy()
    fp = io.BytesIO(arr.data)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        return arr.numpy()
    if dtype.hasobject:
        return arr.numpy()  # refuses it (allow_pickle=False), as Flower does
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(arr.data, dtype=dtype, count=count, offset=fp.tell())
    if fortran:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)


def _accumulate(total: np.ndarray, values: np.ndarray, weight: np.float64) -> None:
    """``total += values * weight`` (the same float64 operations, bit for bit) in blocks,
    so no temporary the size of the tensor is made for every reply.
    """
    if (values.size <= _BLOCK or values.shape != total.shape
            or not total.flags.c_contiguous):
        total += values * weight
        return
    flat_total = total.reshape(-1)
    flat_values = np.ascontiguousarray(values).reshape(-1)
    scratch = np.empty(_BLOCK, dtype=np.result_type(values.dtype, weight))
    for start in range(0, flat_values.size, _BLOCK):
        part = flat_values[start:start + _BLOCK]
        step = scratch[:part.size]
        np.multiply(part, weight, out=step)
        flat_total[start:start + _BLOCK] += step


# a reply's array that cannot be read from the store when it is first used (a
# :class:`~flwr_hpc.payload.objects.StoredArray` whose chunk failed its sha256, or is gone)
_UNREADABLE = (PayloadIntegrityError, PayloadMissingError, OSError)


_READER: list[ThreadPoolExecutor] = []  # one thread reading the next stored array


def _read_ahead(items: list[tuple[str, Array]], i: int) -> Future | None:
    """Start reading (and verifying) the ``i``-th array if it is still in the store, on a
    thread of its own: file reads and sha256 release the GIL, so the next array is read
    while this one is added (the server's part of a round is otherwise strictly serial).
    """
    if i < len(items) and getattr(items[i][1], "loaded", True) is False:
        arr = items[i][1]
        return _reader().submit(lambda: arr.data)
    return None


def _reader() -> ThreadPoolExecutor:
    if not _READER:
        _READER.append(ThreadPoolExecutor(1, thread_name_prefix="flwr-hpc-read-ahead"))
    return _READER[0]


def _fold(record: ArrayRecord, weight: np.float64, sums: dict[str, np.ndarray],
          dtypes: dict[str, np.dtype]) -> None:
    """Add ``weight`` x every array of one reply to ``sums``, one array at a time, letting
    each array's bytes go once added (a stored array is read again only if asked for; the
    next one is read ahead while this one is added, so two are in memory at most).
    If an array cannot be read, the arrays of this reply already added are taken out again
    (in float64: the float32 model it yields is not changed by it, but for the rare element
    that sits on a rounding boundary) and the error is raised.
    """
    done: list[tuple[str, Array, bool]] = []
    items = list(record.items())
    ahead, ahead_i = _read_ahead(items, 0), 0
    try:
        for i, (key, arr) in enumerate(items):
            if ahead is not None:
                ahead.result()  # this array's bytes (or why they cannot be read)
            ahead, ahead_i = _read_ahead(items, i + 1), i + 1
            values = ndarray_view(arr)  # no copy of the reply's bytes
            created = key not in sums
            if created:
                dtypes[key] = values.dtype
                sums[key] = np.multiply(values, weight, order="C")
            else:
                _accumulate(sums[key], values, weight)
            del values
            done.append((key, arr, created))
            _release(arr)
    except _UNREADABLE:
        if ahead is not None:  # a read still under way: let it finish, then let it go
            ahead.exception()
            _release(items[ahead_i][1])
        for key, arr, created in done:
            if created:
                del sums[key], dtypes[key]
            else:
                _accumulate(sums[key], ndarray_view(arr), -weight)
                _release(arr)
        raise


def _release(arr: Array) -> None:
    release = getattr(arr, "release", None)  # a StoredArray: its bytes are in the store
    if release is not None:
        release()


class StreamingFedAvg(FedAvg):
    """FedAvg whose ``aggregate_train`` consumes the replies one by one.

    ``start(..., release_initial=True)``: Flower's round loop keeps ``initial_arrays`` for
    the whole run, next to the current model (two models on the server). With it, the
    record passed as ``initial_arrays`` is emptied once a later round's model has replaced
    it (as Flower's own ``keep_input=False`` empties its input), so the initial model is
    freed after round 1 unless the caller keeps its arrays elsewhere. Not for a subclass
    that keeps the round-1 model it was given (e.g. for deltas).
    """

    streaming = True  # flwr_hpc.strategy.rounds passes replies through without a list

    @override
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              *, release_initial: bool = False) -> Result:
        if release_initial:
            self.__dict__["_initial_record"] = initial_arrays
        try:
            return super().start(grid=grid, initial_arrays=initial_arrays,
                                 num_rounds=num_rounds, timeout=timeout,
                                 train_config=train_config, evaluate_config=evaluate_config,
                                 evaluate_fn=evaluate_fn)
        finally:
            self.__dict__.pop("_initial_record", None)

    @override
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        initial = self.__dict__.get("_initial_record")
        if initial is not None and arrays is not initial:  # a later model replaced it
            initial.clear()
            del self.__dict__["_initial_record"]
        return super().configure_train(server_round, arrays, config, grid)

    @override
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        sums: dict[str, np.ndarray] = {}
        dtypes: dict[str, np.dtype] = {}
        keys: list[str] | None = None
        total = 0.0
        metric_only: list[RecordDict] = []
        failures = 0
        for msg in replies:
            if msg.has_error():
                failures += 1
                log.info("\t> Received error in reply from node %d: %s",
                         msg.metadata.src_node_id, msg.error.reason)
                continue
            content = msg.content
            if len(content.array_records) != 1 or len(content.metric_records) != 1:
                raise InconsistentMessageReplies(
                    reason="Expected exactly one ArrayRecord and one MetricRecord in "
                    "replies. Skipping aggregation.")
            (metrics,) = content.metric_records.values()
            if self.weighted_by_key not in metrics:
                raise InconsistentMessageReplies(
                    reason=f"Missing required key `{self.weighted_by_key}` in the "
                    "MetricRecord of reply messages.")
            # a float64 scalar: float32 x float64 products are float64 (NEP 50), so the sum
            # does not depend on the order replies arrive in (beyond float64 rounding)
            weight = np.float64(metrics[self.weighted_by_key])
            (record,) = content.array_records.values()
            if keys is None:
                keys = list(record.keys())
            elif list(record.keys()) != keys and set(record.keys()) != set(keys):
                raise InconsistentMessageReplies(
                    reason="All ArrayRecords must have the same keys for aggregation.")
            try:
                _fold(record, weight, sums, dtypes)
            except _UNREADABLE as err:  # a stored array failed its check: reply taken out
                failures += 1
                log.error("reply of node %d dropped from the aggregation: %s",
                          msg.metadata.src_node_id, err)
                if not metric_only:
                    keys = None
                del content, record, msg
                continue
            total += float(weight)
            metric_only.append(RecordDict(dict(content.metric_records)))
            del content, record, msg  # nothing of this reply outlives the loop
            # Flower's ``RecordDict.array_records`` (and friends) build a ``_SyncedDict``
            # that refers to itself through a bound method, and to the RecordDict: until
            # that young cycle is collected, the reply's arrays stay in memory. A young-
            # generation collection frees it (a full one would scan the whole heap).
            gc.collect(1)
        # as Flower's line, which flwr-hpc's loop shows at DEBUG (the grid's phase line
        # counts replies and errors at INFO)
        log.debug("aggregate_train: Received %s results and %s failures",
                 len(metric_only), failures)
        if not metric_only:
            return None, None
        arrays = ArrayRecord({k: Array((sums.pop(k) / total).astype(dtypes[k]))
                              for k in list(keys or sums)})
        return arrays, self.train_metrics_aggr_fn(_common_keys(metric_only),
                                                  self.weighted_by_key)


def _common_keys(records: list[RecordDict]) -> list[RecordDict]:
    """Only the metric keys every reply reported (Flower would refuse differing keys; a
    streaming round cannot wait to take a majority).
    """
    key_sets = [set(next(iter(r.metric_records.values())).keys()) for r in records]
    common = set.intersection(*key_sets)
    if any(k != common for k in key_sets):
        log.warning("aggregate_train: metric keys %s are not in every reply; left out",
                    sorted(set.union(*key_sets) - common))
        return [RecordDict({name: MetricRecord({k: v for k, v in mr.items() if k in common})
                            for name, mr in r.metric_records.items()}) for r in records]
    return records


class StreamingFedProx(FedProx, StreamingFedAvg):
    """``FedProx`` whose FedAvg aggregation consumes the replies one by one."""


class StreamingFedAdam(FedAdam, StreamingFedAvg):
    """``FedAdam`` whose FedAvg aggregation consumes the replies one by one."""


class StreamingFedYogi(FedYogi, StreamingFedAvg):
    """``FedYogi`` whose FedAvg aggregation consumes the replies one by one."""


class StreamingFedAdagrad(FedAdagrad, StreamingFedAvg):
    """``FedAdagrad`` whose FedAvg aggregation consumes the replies one by one."""


class StreamingFedAvgM(FedAvgM, StreamingFedAvg):
    """``FedAvgM`` whose FedAvg aggregation consumes the replies one by one."""


STREAMING = {FedAvg: StreamingFedAvg, FedProx: StreamingFedProx, FedAdam: StreamingFedAdam,
             FedYogi: StreamingFedYogi, FedAdagrad: StreamingFedAdagrad,
             FedAvgM: StreamingFedAvgM}
