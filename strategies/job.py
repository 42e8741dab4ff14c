"""The job config: Hydra composition of ``conf/`` from the Flower run config, validated.

The Flower run config carries the Hydra selections and overrides in one string key,
``overrides``, so any part of the job changes from the command line::

    flwr run . hpc -c 'overrides="model=minilm strategy.num_rounds=2 train.lr=1e-3"'

Validation is strict, like the federation's: an unknown key or a wrong type stops the run
with a :class:`~flwr_hpc.errors.ConfigError` naming the config file and the dotted key.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr_hpc.config import Field, check_section, compose
from flwr_hpc.errors import ConfigError

APP_CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
              "deadline", "fedbuff", "queue_aware")
# scheduler-aware: train tasks span rounds (strategies/scheduled.py)
SCHEDULED = ("deadline", "fedbuff", "queue_aware")
DP_TYPES = ("none", "opacus", "central-server", "central-client")

_LORA = {
    "r": Field("int", default=8, minimum=1),
    "alpha": Field("int", default=16, minimum=1),
    "dropout": Field("float", default=0.0, minimum=0.0),
    "target_modules": Field("str-list", required=True),
    "fan_in_fan_out": Field("bool", default=False),
}
MODEL = {
    "name": Field("str", required=True),
    "task": Field("str", required=True, choices=("causal_lm", "sequence_classification")),
    "source": Field("str", default="tiny", choices=("tiny", "pretrained")),
    "path": Field("str|null"),
    "dtype": Field("str", default="float32", choices=("float32", "bfloat16", "float16")),
    "device": Field("str", default="auto"),
    "seed": Field("int", default=0),
    "arch": Field("any-map", default={}),
    "tokenizer": Field("any-map", default={}),
    "num_labels": Field("int", default=2, minimum=2),
    "default_lr": Field("float", default=3e-3, minimum=0.0),  # used when train.lr is null
    "lora": Field("section", section=_LORA),
}
DATA = {
    "name": Field("str", default="custom"),
    "path": Field("str|null"),
    "partitioner": Field("str", default="iid", choices=("iid", "dirichlet")),
    "alpha": Field("float", default=0.3, minimum=1e-6),
    "seed": Field("int", default=42),
    "tasks": Field("str-list", default=[]),
    "max_length": Field("int", default=128, minimum=8),
    "label_task": Field("str", default="property_prediction-mw"),
    "threshold": Field("float", default=200.0),
}
TRAIN = {
    "local_steps": Field("int", default=20, minimum=1),
    "optimizer": Field("str", default="adamw", choices=("adamw", "sgd")),
    "batch_size": Field("int", default=16, minimum=1),
    "lr": Field("float", default=None, minimum=0.0),  # null: the model's default_lr
    "weight_decay": Field("float", default=0.0, minimum=0.0),
    "max_grad_norm": Field("float", default=1.0, minimum=0.0),
    "seed": Field("int", default=0),
}
EVALUATE = {
    "central": Field("bool", default=True),
    "federated": Field("bool", default=True),
    "batch_size": Field("int", default=32, minimum=1),
    "max_generate": Field("int", default=16, minimum=0),
    "max_new_tokens": Field("int", default=48, minimum=1),
    "exact_match_tasks": Field("str-list", default=["canonicalization", "name_conversion-s2f",
                                                       "name_conversion-i2s"]),
}
STRATEGY = {
    "name": Field("str", default="fedavg", choices=STRATEGIES),
    "num_rounds": Field("int", default=3, minimum=1),
    "fraction_train": Field("float", default=1.0, minimum=0.0),
    "fraction_evaluate": Field("float", default=1.0, minimum=0.0),
    "min_train_nodes": Field("int", default=2, minimum=1),
    "min_evaluate_nodes": Field("int", default=2, minimum=0),
    "min_available_nodes": Field("int", default=2, minimum=1),
    "round_timeout_s": Field("float", default=3600.0, minimum=1.0),
    # aggregate replies one by one as they arrive (flwr_hpc.strategy.streaming): O(model) memory
    "streaming": Field("bool", default=True),
    "proximal_mu": Field("float", default=0.0, minimum=0.0),
    # FedOpt family (fedadam, fedyogi, fedadagrad): server and client learning rates, betas
    "eta": Field("float", default=1e-2, minimum=0.0),
    "eta_l": Field("float", default=1e-1, minimum=0.0),
    "beta_1": Field("float", default=0.9, minimum=0.0),
    "beta_2": Field("float", default=0.99, minimum=0.0),
    "tau": Field("float", default=1e-3, minimum=0.0),
    # fedavgm; also fedbuff's server step size
    "server_learning_rate": Field("float", default=1.0, minimum=0.0),
    "server_momentum": Field("float", default=0.0, minimum=0.0),
    # stop after the round that ends past this many seconds on the grid's clock (virtual
    # under the simulator): an allocation's time budget. null = run num_rounds.
    "time_budget_s": Field("float", default=None, minimum=0.0),
    # scheduler-aware strategies (deadline, fedbuff, queue_aware)
    "quorum": Field("float", default=0.5, minimum=0.0),        # deadline: share of asked nodes
    "deadline_s": Field("float", default=None, minimum=0.0),    # round deadline, grid clock
    "staleness_exponent": Field("float", default=0.5, minimum=0.0),  # s = (1+tau)^-a
    "max_staleness": Field("int", default=8, minimum=0),        # older updates are dropped
    "buffer_size": Field("int", default=2, minimum=1),          # fedbuff: K
    "target_round_s": Field("float", default=None, minimum=0.0),  # queue_aware; null = auto
    "min_steps": Field("int", default=1, minimum=1),            # queue_aware step budget
    "max_steps": Field("int", default=None, minimum=1),         # null = 4 x train.local_steps
    "lr_exponent": Field("float", default=0.5, minimum=0.0),    # lr x (default/steps)^e
    "lr_scale_max": Field("float", default=4.0, minimum=1.0),
    "ewma_alpha": Field("float", default=0.3, minimum=0.0),     # queue-wait prediction
}
DP = {
    "type": Field("str", default="none", choices=DP_TYPES),
    "noise_multiplier": Field("float", default=None, minimum=0.0),
    "target_epsilon": Field("float", default=None, minimum=0.0),
    "delta": Field("float", default=1e-5, minimum=0.0),
    # opacus: per-sample gradient clipping; central-*: per-client update clipping
    "max_grad_norm": Field("float", default=1.0, minimum=0.0),
    "clipping_norm": Field("float", default=1.0, minimum=0.0),
    "poisson_sampling": Field("bool", default=True),
    "accountant": Field("str", default="rdp", choices=("rdp", "prv", "gdp")),
    # central-*: seed the server's noise. Reproducible noise is NOT private (anyone with the
    # seed can subtract it): for tests and debugging only. null = fresh OS entropy.
    "noise_seed": Field("int", default=None, minimum=0),
}
OUTPUT = {
    "dir": Field("str|null"),
    "save_client_updates": Field("bool", default=False),  # updates/round-<r>/<node>.safetensors
}
SECTIONS = {"model": MODEL, "data": DATA, "train": TRAIN, "evaluate": EVALUATE,
            "strategy": STRATEGY, "dp": DP, "output": OUTPUT}


def _source(group: str, choices: Mapping[str, str]) -> str:
    choice = choices.get(group)
    if choice:
        path = APP_CONF_DIR / group / f"{choice}.yaml"
        return f"conf/{group}/{choice}.yaml" if path.exists() else f"{group}/{choice}.yaml"
    return "conf/config.yaml"


def validate(raw: Mapping[str, Any], choices: Mapping[str, str] | None = None) -> dict:
    """Check every job section; returns plain dicts with defaults filled in."""
    choices = choices or {}
    job: dict[str, Any] = {}
    for name, schema in SECTIONS.items():
        job[name] = check_section(schema, raw.get(name), name, _source(name, choices))
    if job["train"]["lr"] is None:
        job["train"]["lr"] = job["model"]["default_lr"]
    if job["model"]["source"] == "pretrained" and not job["model"]["path"]:
        raise ConfigError(_source("model", choices), "model.path",
                          "source 'pretrained' needs a checkpoint directory")
    if job["strategy"]["name"] == "fedprox" and job["strategy"]["proximal_mu"] <= 0:
        raise ConfigError(_source("strategy", choices), "strategy.proximal_mu",
                          "FedProx needs proximal_mu > 0")
    _check_dp(job["dp"], _source("dp", choices))
    _check_scheduled(job, choices)
    return job


def _check_scheduled(job: dict, choices: Mapping[str, str]) -> None:
    s = job["strategy"]
    source = _source("strategy", choices)
    if s["name"] not in SCHEDULED:
        return
    if job["dp"]["type"].startswith("central"):
        raise ConfigError(_source("dp", choices), "dp.type",
                          f"strategy {s['name']!r} collects its own replies across rounds, "
                          "which Flower's central-DP wrappers never see; use dp=opacus "
                          "(sample-level DP at the clients) or a synchronous strategy")
    if not 0 < s["quorum"] <= 1:
        raise ConfigError(source, "strategy.quorum", f"must be in (0, 1], got {s['quorum']}")
    if s["deadline_s"] is not None and s["deadline_s"] <= 0:
        raise ConfigError(source, "strategy.deadline_s", "must be > 0 (or null: no deadline)")
    if not 0 < s["ewma_alpha"] <= 1:
        raise ConfigError(source, "strategy.ewma_alpha",
                          f"must be in (0, 1], got {s['ewma_alpha']}")
    if s["server_learning_rate"] <= 0:
        raise ConfigError(source, "strategy.server_learning_rate", "must be > 0")
    if s["max_steps"] is not None and s["max_steps"] < s["min_steps"]:
        raise ConfigError(source, "strategy.max_steps",
                          f"must be >= strategy.min_steps ({s['min_steps']})")


def _check_dp(dp: dict, source: str) -> None:
    kind, noise, target = dp["type"], dp["noise_multiplier"], dp["target_epsilon"]
    if kind == "none":
        return
    if noise is not None and target is not None:
        raise ConfigError(source, "dp.target_epsilon", "set either dp.noise_multiplier or "
                          "dp.target_epsilon, not both")
    if kind == "opacus" and noise is None and target is None:
        raise ConfigError(source, "dp.noise_multiplier", "DP-SGD needs dp.noise_multiplier "
                          "or dp.target_epsilon")
    if kind.startswith("central") and noise is None:
        raise ConfigError(source, "dp.noise_multiplier", f"{kind} DP needs "
                          "dp.noise_multiplier (target_epsilon is for dp=opacus)")
    if kind.startswith("central") and dp["clipping_norm"] <= 0:
        raise ConfigError(source, "dp.clipping_norm", "must be > 0")
    if not 0 < dp["delta"] < 1:
        raise ConfigError(source, "dp.delta", f"must be in (0, 1), got {dp['delta']}")


def check_federation_size(job: dict, num_nodes: int) -> None:
    """Fail fast when the strategy's minimums exceed the nodes (Flower would wait forever)."""
    s = job["strategy"]
    wanted = [("min_available_nodes", s["min_available_nodes"]),
              ("min_train_nodes", s["min_train_nodes"])]
    if job["evaluate"]["federated"] and s["fraction_evaluate"] > 0:
        wanted.append(("min_evaluate_nodes", s["min_evaluate_nodes"]))
    for key, value in wanted:
        if value > num_nodes:
            raise ConfigError("conf/strategy", f"strategy.{key}",
                              f"{value} nodes required but the federation has {num_nodes}; "
                              f"lower strategy.{key} or add clients")


def parse_overrides(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as err:
        raise ConfigError("run config", "overrides", f"cannot split {text!r}: {err}") from None


def compose_job(overrides: Sequence[str] = ()) -> dict:
    """Compose ``conf/config.yaml`` with ``overrides`` and validate the job sections."""
    dirs = [APP_CONF_DIR] if APP_CONF_DIR.exists() else []
    data = compose(list(overrides), config_dirs=dirs)
    return validate(data, data.get("_choices"))
