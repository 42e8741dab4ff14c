"""Strategy construction from the job config's ``strategy`` and ``dp`` sections.

Flower's own strategies and DP wrappers are used as they are; this module only maps config
keys onto their constructor arguments, so ``strategy=fedadam strategy.eta=0.01`` or
``dp=central-server dp.noise_multiplier=0.5`` is all a user writes.

========================  ==================================================================
``strategy.name``         Flower class
========================  ==================================================================
``fedavg``                ``FedAvg``
``fedprox``               ``FedProx`` (the ClientApp adds the proximal term, ``proximal-mu``)
``fedadam`` / ``fedyogi`` ``FedAdam`` / ``FedYogi`` (``eta``, ``eta_l``, ``beta_1``,
                          ``beta_2``, ``tau``)
``fedadagrad``            ``FedAdagrad`` (``eta``, ``eta_l``, ``tau``)
``fedavgm``               ``FedAvgM`` (``server_learning_rate``, ``server_momentum``)
``deadline``              ``strategies.deadline.DeadlineFedAvg`` (``quorum``, ``deadline_s``,
                          ``staleness_exponent``, ``max_staleness``)
``fedbuff``               ``strategies.buffered_async.BufferedAsyncFedAvg`` (``buffer_size``,
                          ``server_learning_rate``, ``staleness_exponent``, ...)
``queue_aware``           ``strategies.queue_aware.QueueAwareFedAvg`` (``target_round_s``,
                          ``min_steps``, ``max_steps``, ``lr_exponent``, ``ewma_alpha``, ...)
``fedasync``              ``strategies.fedasync.FedAsync`` (``alpha``, ``staleness_exponent``)
``fedqueue``              ``strategies.fedqueue.FedQueue`` (``t_sync``, ``theta``,
                          ``alpha_admission``, ``admission_tolerance``, ``warm_up_steps``, ...)
``fedcompass``            ``strategies.fedcompass.FedCompass`` (``min_steps``, ``max_steps``,
                          ``latest_time_factor``, ``speed_momentum``, ``alpha``)
``budget_async``          ``strategies.budget_async.BudgetAsync`` (``min_steps``, ``max_steps``,
                          ``server_learning_rate``, ``staleness_exponent``, ``ewma_alpha``)
========================  ==================================================================

``dp.type: central-server`` / ``central-client`` wraps the strategy in Flower's
``DifferentialPrivacyServerSideFixedClipping`` / ``...ClientSideFixedClipping``. Flower's RDP
accountant (``flwr[dp]``) reports epsilon when the wrapped strategy aggregates with
``FedAvg.aggregate_train`` (fedavg, fedprox), which is what Flower's accounting supports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedProx,
    FedYogi,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

log = logging.getLogger("flwr")

# Client metrics that must not be averaged: the worst case is what matters.
MAX_METRICS = ("epsilon", "replica-max-abs-diff")


def aggregate_train_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """Weighted mean of the clients' metrics, except ``MAX_METRICS`` (maximum)."""
    out = aggregate_metricrecords(records, weighting_key)
    for key in MAX_METRICS:
        values = [float(m[key]) for rd in records for m in rd.metric_records.values()
                  if key in m]
        if values:
            out[key] = max(values)
    return out


def _base_strategy(job: Mapping[str, Any]) -> Strategy:
    s = job["strategy"]
    federated_eval = bool(job["evaluate"]["federated"])
    common = dict(
        fraction_train=s["fraction_train"],
        fraction_evaluate=s["fraction_evaluate"] if federated_eval else 0.0,
        min_train_nodes=s["min_train_nodes"],
        min_evaluate_nodes=s["min_evaluate_nodes"] if federated_eval else 0,
        min_available_nodes=s["min_available_nodes"],
        train_metrics_aggr_fn=aggregate_train_metrics,
    )
    name = s["name"]

    # Flower's central-DP wrappers clip every reply in a list first (no memory to save) and
    # account privacy only for FedAvg.aggregate_train itself: keep Flower's classes there.
    streaming = s["streaming"] and not job["dp"]["type"].startswith("central")

    def cls(flower_class):
        if not streaming:
            return flower_class
        from flwr_hpc.strategy.streaming import STREAMING

        return STREAMING[flower_class]

    from strategies.job import SCHEDULED

    if name in SCHEDULED:
        return _scheduled(job, common)
    if name == "fedavg":
        return cls(FedAvg)(**common)
    if name == "fedprox":
        return cls(FedProx)(**common, proximal_mu=s["proximal_mu"])
    if name in ("fedadam", "fedyogi"):
        return cls(FedAdam if name == "fedadam" else FedYogi)(
            **common, eta=s["eta"], eta_l=s["eta_l"], beta_1=s["beta_1"],
            beta_2=s["beta_2"], tau=s["tau"])
    if name == "fedadagrad":
        return cls(FedAdagrad)(**common, eta=s["eta"], eta_l=s["eta_l"], tau=s["tau"])
    if name == "fedavgm":
        return cls(FedAvgM)(**common, server_learning_rate=s["server_learning_rate"],
                            server_momentum=s["server_momentum"])
    raise ValueError(f"strategy.name {name!r} is not supported")  # validated earlier


def _scheduled(job: Mapping[str, Any], common: dict[str, Any]) -> Strategy:
    """The scheduler-aware strategies (``strategies/scheduled.py``)."""
    s = job["strategy"]
    kwargs = dict(common, staleness_exponent=s["staleness_exponent"],
                  max_staleness=s["max_staleness"], deadline_s=s["deadline_s"],
                  round_timeout_s=s["round_timeout_s"])
    if s["name"] == "deadline":
        from strategies.deadline import DeadlineFedAvg

        return DeadlineFedAvg(quorum=s["quorum"], **kwargs)
    if s["name"] == "fedbuff":
        from strategies.buffered_async import BufferedAsyncFedAvg

        return BufferedAsyncFedAvg(buffer_size=s["buffer_size"],
                                   server_lr=s["server_learning_rate"], **kwargs)
    if s["name"] == "fedasync":
        from strategies.fedasync import FedAsync

        return FedAsync(alpha=s["alpha"], **kwargs)
    if s["name"] == "fedqueue":
        from strategies.fedqueue import FedQueue

        return FedQueue(t_sync=s["t_sync"], theta=s["theta"],
                        alpha_admission=s["alpha_admission"],
                        admission_tolerance=s["admission_tolerance"],
                        beta_queue=s["beta_queue"], alpha_compute=s["alpha_compute"],
                        q_init=s["q_init"],
                        warm_up_steps=s["warm_up_steps"] or job["train"]["local_steps"],
                        max_steps=s["max_steps"], **kwargs)
    if s["name"] == "budget_async":
        from strategies.budget_async import BudgetAsync

        steps = job["train"]["local_steps"]
        return BudgetAsync(default_steps=steps,
                           min_steps=s["min_steps"] if s["min_steps"] > 1 else None,
                           max_steps=s["max_steps"], ewma_alpha=s["ewma_alpha"],
                           server_lr=s["server_learning_rate"], **kwargs)
    if s["name"] == "fedcompass":
        from strategies.fedcompass import FedCompass

        return FedCompass(min_steps=s["min_steps"],
                          max_steps=s["max_steps"] or 4 * job["train"]["local_steps"],
                          latest_time_factor=s["latest_time_factor"],
                          speed_momentum=s["speed_momentum"], alpha=s["alpha"], **kwargs)
    from strategies.queue_aware import QueueAwareFedAvg

    return QueueAwareFedAvg(default_steps=job["train"]["local_steps"], min_steps=s["min_steps"],
                            max_steps=s["max_steps"], target_round_s=s["target_round_s"],
                            lr_exponent=s["lr_exponent"], lr_scale_max=s["lr_scale_max"],
                            ewma_alpha=s["ewma_alpha"], quorum=s["quorum"], **kwargs)


def sampled_clients(job: Mapping[str, Any], num_nodes: int) -> int:
    """How many clients Flower's sampler picks per round (what the DP wrappers need)."""
    s = job["strategy"]
    return max(int(num_nodes * s["fraction_train"]), s["min_train_nodes"])


def build_strategy(job: Mapping[str, Any], num_nodes: int) -> Strategy:
    """The configured strategy (streaming by default), wrapped for central DP when
    ``dp.type`` asks for it."""
    strategy = _base_strategy(job)
    dp = job["dp"]
    if not dp["type"].startswith("central"):
        return strategy
    wrapper = (DifferentialPrivacyServerSideFixedClipping if dp["type"] == "central-server"
               else DifferentialPrivacyClientSideFixedClipping)
    n_sampled = sampled_clients(job, num_nodes)
    return wrapper(strategy, noise_multiplier=dp["noise_multiplier"],
                   clipping_norm=dp["clipping_norm"], num_sampled_clients=n_sampled,
                   accountant=_accountant(strategy, dp, num_nodes))


def _accountant(strategy: Strategy, dp: Mapping[str, Any], num_nodes: int):
    from flwr.supercore.privacy_accounting import (
        NeighboringRelation,
        PrivacyConfig,
        SamplingMethod,
    )
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    if dp["noise_multiplier"] <= 0:
        log.warning("dp.noise_multiplier is 0: updates are clipped but not noised; "
                    "no privacy is accounted")
        return None
    from flwr_hpc.strategy.streaming import StreamingFedAvg

    if type(strategy).aggregate_train not in (FedAvg.aggregate_train,
                                              StreamingFedAvg.aggregate_train):
        log.warning("Flower's DP accounting supports FedAvg-style aggregation only; "
                    "epsilon is not reported for strategy %s", type(strategy).__name__)
        return None
    config = PrivacyConfig(target_delta=dp["delta"], population_size=num_nodes,
                           neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                           sampling_method=SamplingMethod.NO_AMPLIFICATION)
    return RdpAccountant(config)
