"""The job config: Hydra composition of ``conf/`` from the Flower run config, validated.

The Flower run config carries the Hydra selections and overrides in one string key,
``overrides``, so any part of the job changes from the command line::

    flwr run . hpc -c 'overrides="model=minilm strategy.num_rounds=2 train.lr=1e-3"'

and the run-config keys Flower's own app templates use work as first-class ``-c`` keys,
mapped onto the job (:data:`FLOWER_KEYS`)::

    flwr run . hpc -c num-server-rounds=2 -c local-steps=5 -c lr=1e-3

Both sides compose the job from the same run config (:func:`job_from_run_config`): the
ServerApp, and each ClientApp from its ``Context.run_config``; only a digest of the job
travels in the messages, and a site whose composition differs refuses the task.

Validation is strict, like the federation's: an unknown key (in any section, at the top
level, or a parameter the chosen strategy does not have) or a wrong type stops the run with
a :class:`~flwr_hpc.errors.ConfigError` naming where the key came from (the config file,
the ``overrides`` run-config key or the ``-c`` key) and the dotted key. The federation is
not part of a job: it is chosen when the service starts (``flwr-hpc up federation=...``).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr_hpc.config import Field, check_section, compose
from flwr_hpc.errors import ConfigError
from flwr_hpc.strategy.tracking import TRACKERS

APP_CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm",
              "deadline", "fedbuff", "queue_aware", "fedasync", "fedqueue", "fedcompass",
              "budget_async")
# scheduler-aware: train tasks span rounds (strategies/scheduled.py)
SCHEDULED = ("deadline", "fedbuff", "queue_aware", "fedasync", "fedqueue", "fedcompass",
             "budget_async")
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
    "source": Field("str", default="tiny", choices=("tiny", "pretrained", "gguf")),
    # plain: "<s> input \n"; chat: the tokenizer's chat template (instruction-tuned models)
    "prompt": Field("str", default="plain", choices=("plain", "chat")),
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
    # held-out samples evaluated (a seeded subset; null = all): a 135M model on 2 CPU cores
    # evaluates ~3 samples/s
    "max_samples": Field("int", default=None, minimum=1),
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
    # scheduler-aware strategies (deadline, fedbuff, queue_aware, fedasync, fedqueue,
    # fedcompass)
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
    # fedasync / fedcompass: mixing weight of an update (fedcompass divides it by N)
    "alpha": Field("float", default=0.9, minimum=0.0, maximum=1.0),
    # fedqueue (APPFL's defaults): target seconds between aggregations, safety margin,
    # admission slack (share of t_sync), timer tolerance, EWMA weights, initial queue estimate
    "t_sync": Field("float", default=3600.0, minimum=1.0),
    "theta": Field("float", default=60.0, minimum=0.0),
    "alpha_admission": Field("float", default=0.2, minimum=0.0),
    "admission_tolerance": Field("float", default=0.15, minimum=0.0),
    "beta_queue": Field("float", default=0.5, minimum=0.0, maximum=1.0),
    "alpha_compute": Field("float", default=0.5, minimum=0.0, maximum=1.0),
    "q_init": Field("float", default=2.0, minimum=0.0),
    "warm_up_steps": Field("int", default=None, minimum=1),    # null = train.local_steps
    # fedcompass: a group's latest arrival / expected one; weight of the newest speed
    "latest_time_factor": Field("float", default=1.5, minimum=1.0),
    "speed_momentum": Field("float", default=0.9, minimum=0.0, maximum=1.0),
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
    # each round's metrics and per-site timings (flwr_hpc.strategy.tracking)
    # none | tensorboard | mlflow | wandb, or a list of them ([tensorboard, mlflow])
    "tracker": Field("str-list", default=[]),
    "tracking_uri": Field("str|null"),  # mlflow: null = a file store in the run directory
}
# Each strategy's own parameters, beyond the ones every strategy has (STRATEGY_COMMON):
# a parameter of another strategy is refused (FedAvg has no eta), not silently ignored.
STRATEGY_COMMON = ("name", "num_rounds", "fraction_train", "fraction_evaluate",
                   "min_train_nodes", "min_evaluate_nodes", "min_available_nodes",
                   "round_timeout_s", "streaming", "time_budget_s")
_FEDOPT = ("eta", "eta_l", "beta_1", "beta_2", "tau")
_SCHEDULED = ("deadline_s", "staleness_exponent", "max_staleness")
STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedprox": ("proximal_mu",),
    "fedadam": _FEDOPT,
    "fedyogi": _FEDOPT,
    "fedadagrad": ("eta", "eta_l", "tau"),
    "fedavgm": ("server_learning_rate", "server_momentum"),
    "deadline": ("quorum", *_SCHEDULED),
    "fedbuff": ("buffer_size", "server_learning_rate", *_SCHEDULED),
    "queue_aware": ("quorum", "target_round_s", "min_steps", "max_steps", "lr_exponent",
                    "lr_scale_max", "ewma_alpha", *_SCHEDULED),
    "fedasync": ("alpha", *_SCHEDULED),
    "fedqueue": ("t_sync", "theta", "alpha_admission", "admission_tolerance", "beta_queue",
                 "alpha_compute", "q_init", "warm_up_steps", "max_steps", *_SCHEDULED),
    "fedcompass": ("min_steps", "max_steps", "latest_time_factor", "speed_momentum", "alpha",
                   *_SCHEDULED),
    "budget_async": ("min_steps", "max_steps", "ewma_alpha", "server_learning_rate",
                     *_SCHEDULED),
}
# Where the model lives for the server (strategies/site_model.py): null = the ServerApp
# loads the base model (initial adapter, central evaluation, saved adapters); a site name =
# it never does -- that site's first client creates the initial adapter and runs the
# central evaluation, and adapters are saved without the base.
SERVER = {
    "site": Field("str|null"),
}
SECTIONS = {"model": MODEL, "data": DATA, "train": TRAIN, "evaluate": EVALUATE,
            "strategy": STRATEGY, "dp": DP, "output": OUTPUT, "server": SERVER}


def _source(group: str, choices: Mapping[str, str]) -> str:
    choice = choices.get(group)
    if choice:
        path = APP_CONF_DIR / group / f"{choice}.yaml"
        return f"conf/{group}/{choice}.yaml" if path.exists() else f"{group}/{choice}.yaml"
    return "conf/config.yaml"


def _origin(key: str, choices: Mapping[str, str], given: Mapping[str, str]) -> str:
    """Where ``key`` (dotted) was set: the run-config key whose override named it (the
    values of ``given``, by override), else the config file of its section."""
    names = {item.lstrip("+~").partition("=")[0].strip(): origin
             for item, origin in given.items()}
    if key in names:
        return names[key]
    for name, origin in names.items():
        if key.startswith(name + ".") and "." in name:  # a whole sub-section, e.g. model.lora
            return origin
    return _source(key.partition(".")[0], choices)


def validate(raw: Mapping[str, Any], choices: Mapping[str, str] | None = None,
             given: Mapping[str, str] | None = None) -> dict:
    """Check every job section; returns plain dicts with defaults filled in. ``given``
    maps each override the job was composed with to where it came from (to say where a
    bad key was set)."""
    given = given or {}
    choices = choices or {}
    unknown = sorted(k for k in raw if k not in SECTIONS and k not in ("federation", "_choices"))
    if unknown:
        raise ConfigError(_origin(unknown[0], choices, given), unknown[0],
                          f"unknown section; a job has {', '.join(SECTIONS)}")
    raw = _trackers_as_list(raw)
    job: dict[str, Any] = {}
    for name, schema in SECTIONS.items():
        try:
            job[name] = check_section(schema, raw.get(name), name, _source(name, choices))
        except ConfigError as err:
            raise ConfigError(_origin(err.key, choices, given), err.key, err.problem) from None
    for kind in job["output"]["tracker"]:
        if kind not in TRACKERS[1:]:
            raise ConfigError(_origin("output.tracker", choices, given), "output.tracker",
                              f"{kind!r} is not a tracker; choose from "
                              f"{', '.join(TRACKERS)} (or a list of them)")
    job["strategy"] = _own_strategy_keys(job["strategy"], raw.get("strategy") or {},
                                         choices, given)
    if job["train"]["lr"] is None:
        job["train"]["lr"] = job["model"]["default_lr"]
    if job["model"]["source"] in ("pretrained", "gguf") and not job["model"]["path"]:
        raise ConfigError(_source("model", choices), "model.path",
                          f"source {job['model']['source']!r} needs model.path")
    if job["strategy"]["name"] == "fedprox" and job["strategy"]["proximal_mu"] <= 0:
        raise ConfigError(_source("strategy", choices), "strategy.proximal_mu",
                          "FedProx needs proximal_mu > 0")
    _check_dp(job["dp"], _source("dp", choices))
    _check_scheduled(job, choices)
    return job


def _trackers_as_list(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """``output.tracker: mlflow`` is ``[mlflow]``; ``none`` (or null) is ``[]``."""
    output = raw.get("output")
    if not isinstance(output, Mapping) or not isinstance(output.get("tracker"), str | None):
        return raw
    tracker = output.get("tracker")
    return {**raw, "output": {**output, "tracker": [] if tracker in (None, "none")
                              else [tracker]}}


def _own_strategy_keys(strategy: dict, raw: Mapping[str, Any], choices: Mapping[str, str],
                       given: Mapping[str, str]) -> dict:
    """The strategy section with only the chosen strategy's parameters; a parameter of
    another strategy, set in a file or an override, is refused."""
    own = (*STRATEGY_COMMON, *STRATEGY_KEYS[strategy["name"]])
    foreign = sorted(k for k in raw if k not in own)
    if foreign:
        key = f"strategy.{foreign[0]}"
        mine = ", ".join(STRATEGY_KEYS[strategy["name"]]) or "only the common ones"
        users = [n for n, keys in STRATEGY_KEYS.items() if foreign[0] in keys]
        raise ConfigError(_origin(key, choices, given), key,
                          f"strategy {strategy['name']!r} has no parameter {foreign[0]!r} "
                          f"(it is one of {', '.join(users)}); {strategy['name']}'s own "
                          f"parameters: {mine}")
    return {k: v for k, v in strategy.items() if k in own}


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
    if "quorum" in s and not 0 < s["quorum"] <= 1:
        raise ConfigError(source, "strategy.quorum", f"must be in (0, 1], got {s['quorum']}")
    if s["deadline_s"] is not None and s["deadline_s"] <= 0:
        raise ConfigError(source, "strategy.deadline_s", "must be > 0 (or null: no deadline)")
    if "ewma_alpha" in s and not 0 < s["ewma_alpha"] <= 1:
        raise ConfigError(source, "strategy.ewma_alpha",
                          f"must be in (0, 1], got {s['ewma_alpha']}")
    if s.get("server_learning_rate", 1.0) <= 0:
        raise ConfigError(source, "strategy.server_learning_rate", "must be > 0")
    if s.get("max_steps") is not None and s["max_steps"] < s.get("min_steps", 1):
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


# Flower-template run-config keys -> (job key, type). "" (the app's default) = the job's own
# value; set with -c, the key overrides it, and an `overrides` entry for the same job key
# must agree.
FLOWER_KEYS: dict[str, tuple[str, type]] = {
    "num-server-rounds": ("strategy.num_rounds", int),
    "local-steps": ("train.local_steps", int),
    "lr": ("train.lr", float),
    "fraction-train": ("strategy.fraction_train", float),
    "fraction-evaluate": ("strategy.fraction_evaluate", float),
}


def job_overrides(run_config: Mapping[str, Any]) -> dict[str, str]:
    """The Hydra overrides a Flower run config asks for, in order, each mapped to the
    run-config key it came from: the ``overrides`` string's, then one per Flower-style key
    that is set. The federation is refused here (it is the service's, chosen by
    ``flwr-hpc up``)."""
    given = parse_overrides(str(run_config.get("overrides", "") or ""))
    out = {item: f"run config overrides {item!r}" for item in given}
    for flower_key, (dotted, kind) in FLOWER_KEYS.items():
        value = run_config.get(flower_key, "")
        if value == "" or value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                kind is int and not isinstance(value, int)):
            wanted = "an integer" if kind is int else "a number"
            raise ConfigError("run config -c", flower_key,
                              f"expected {wanted}, got {value!r}")
        for item in given:
            name, _, text = item.lstrip("+~").partition("=")
            if name.strip() == dotted and _number(text) != kind(value):
                raise ConfigError("run config -c", flower_key,
                                  f"{value!r} contradicts overrides {item!r}; set "
                                  f"{dotted} in one place")
        out[f"{dotted}={kind(value)!r}"] = f"run config -c {flower_key}"
    return out


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def compose_job(overrides: Sequence[str] | Mapping[str, str] = ()) -> dict:
    """Compose ``conf/config.yaml`` with ``overrides`` and validate the job sections
    (``overrides`` may map each to where it came from, as :func:`job_overrides` does)."""
    dirs = [APP_CONF_DIR] if APP_CONF_DIR.exists() else []
    given = (dict(overrides) if isinstance(overrides, Mapping)
             else {o: f"override {o!r}" for o in overrides})
    for item in given:
        key = item.lstrip("+~").partition("=")[0].strip()
        if key == "federation" or key.startswith("federation."):
            raise ConfigError(given[item], key,
                              "the federation is not part of a job: it is chosen when the "
                              "service starts (flwr-hpc up federation=<name>), or with "
                              "flwr-hpc run APP federation=<name>")
    try:  # a key the YAML leaves to the schema's default is set without '+' (compose)
        data = compose(list(given), config_dirs=dirs)
    except ConfigError as err:
        raise ConfigError(given.get(err.key, err.file), err.key, err.problem) from None
    return validate(data, data.get("_choices"), given)


def job_from_run_config(run_config: Mapping[str, Any]) -> dict:
    """The job a Flower run config describes (what both the ServerApp and the ClientApp
    compose: :func:`job_digest` of it is the same on both sides)."""
    return compose_job(job_overrides(run_config))


JOB_DIGEST_KEY = "job-digest"  # the ConfigRecord key that carries job_digest(job)


def job_digest(job: Mapping[str, Any]) -> str:
    """A short sha256 of the job (canonical JSON): it travels in every message so a site
    can check that it composed the same job as the server."""
    text = json.dumps(job, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
