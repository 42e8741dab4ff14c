"""Strategy construction from the job config's ``strategy`` section.

Flower's own strategies are used as they are; this module only maps config keys onto
their constructor arguments, so ``strategy=fedprox strategy.proximal_mu=0.01`` is all a
user writes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.serverapp.strategy import FedAvg, FedProx, Strategy


def build_strategy(job: Mapping[str, Any]) -> Strategy:
    s = job["strategy"]
    federated_eval = bool(job["evaluate"]["federated"])
    common = dict(
        fraction_train=s["fraction_train"],
        fraction_evaluate=s["fraction_evaluate"] if federated_eval else 0.0,
        min_train_nodes=s["min_train_nodes"],
        min_evaluate_nodes=s["min_evaluate_nodes"] if federated_eval else 0,
        min_available_nodes=s["min_available_nodes"],
    )
    if s["name"] == "fedavg":
        return FedAvg(**common)
    if s["name"] == "fedprox":
        return FedProx(**common, proximal_mu=s["proximal_mu"])
    raise ValueError(f"strategy.name {s['name']!r} is not supported")  # validated earlier
