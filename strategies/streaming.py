"""Streaming aggregation: Flower's FedAvg family, aggregating replies one at a time.

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
import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
)
from flwr.serverapp.strategy.strategy_utils import InconsistentMessageReplies

log = logging.getLogger("flwr")


class StreamingFedAvg(FedAvg):
    """FedAvg whose ``aggregate_train`` consumes the replies one by one."""

    streaming = True  # flwr_hpc.rounds passes replies through without a list

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
            for key, arr in record.items():
                values = arr.numpy()
                if key not in sums:
                    dtypes[key] = values.dtype
                    sums[key] = values * weight
                else:
                    sums[key] += values * weight
            total += float(weight)
            metric_only.append(RecordDict(dict(content.metric_records)))
            del content, record, msg, values  # nothing of this reply outlives the loop
            # Flower's inflated messages hold reference cycles: without a collection their
            # arrays would wait for the next full GC and several replies would pile up.
            gc.collect()
        log.info("aggregate_train: Received %s results and %s failures",
                 len(metric_only), failures)
        if not metric_only:
            return None, None
        arrays = ArrayRecord({k: Array((sums.pop(k) / total).astype(dtypes[k]))
                              for k in list(keys or sums)})
        return arrays, self.train_metrics_aggr_fn(_common_keys(metric_only),
                                                  self.weighted_by_key)


def _common_keys(records: list[RecordDict]) -> list[RecordDict]:
    """Only the metric keys every reply reported (Flower would refuse differing keys; a
    streaming round cannot wait to take a majority)."""
    key_sets = [set(next(iter(r.metric_records.values())).keys()) for r in records]
    common = set.intersection(*key_sets)
    if any(k != common for k in key_sets):
        log.warning("aggregate_train: metric keys %s are not in every reply; left out",
                    sorted(set.union(*key_sets) - common))
        return [RecordDict({name: MetricRecord({k: v for k, v in mr.items() if k in common})
                            for name, mr in r.metric_records.items()}) for r in records]
    return records


class StreamingFedProx(FedProx, StreamingFedAvg):
    pass


class StreamingFedAdam(FedAdam, StreamingFedAvg):
    pass


class StreamingFedYogi(FedYogi, StreamingFedAvg):
    pass


class StreamingFedAdagrad(FedAdagrad, StreamingFedAvg):
    pass


class StreamingFedAvgM(FedAvgM, StreamingFedAvg):
    pass


STREAMING = {FedAvg: StreamingFedAvg, FedProx: StreamingFedProx, FedAdam: StreamingFedAdam,
             FedYogi: StreamingFedYogi, FedAdagrad: StreamingFedAdagrad,
             FedAvgM: StreamingFedAvgM}
