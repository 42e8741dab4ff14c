"""The ClientApp: federated LoRA fine-tuning (causal LM or encoder classifier) at a site.

``train`` reads like the algorithm: load the global adapter -> train K local steps on this
node's shard -> return the adapter and metrics. ``evaluate`` reports eval loss and exact
match (causal LM) or accuracy (classifier) on this node's share of the held-out split.

Contract with the ServerApp (``strategies.server_app``): the job is composed here from
``context.run_config`` exactly as the server composes it (``strategies.job``), as Flower
apps read their run config; every message's ``config`` ConfigRecord carries ``job-digest``
(a sha256 of the server's job; a different composition here fails the task, naming both),
``local-steps`` and may carry
``proximal-mu`` (FedProx), ``local-steps`` / ``lr-scale`` (a per-node budget from a
scheduler-aware strategy, overriding ``train.local_steps`` / scaling the lr) or a
clipping norm (central DP with client-side clipping, applied by Flower's
``fixedclipping_mod``). Only adapter tensors travel, in the ``arrays``
ArrayRecord. Under ``dp=opacus`` the update is DP-SGD and the metrics carry ``epsilon``
(accumulated over rounds; the accountant lives in the node's ``Context.state``).

When the site launches the ClientApp on several ranks (``flwr_hpc.dist``), every rank
runs this code on the same message; DDP keeps the replicas identical, and the reply of
rank 0 is the node's reply. ``replica-max-abs-diff`` reports how far the ranks' adapters
ended apart (0.0 when they are identical).
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import tempfile
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client_apps import lora
from client_apps.privacy import STATE_KEY, check_adapter_moved
from client_apps.recipe import initial_adapter, load_recipe, with_node_overrides
from client_apps.training import make_loader, train_steps
from flwr_hpc import dist
from strategies.job import JOB_DIGEST_KEY, job_digest, job_from_run_config
from strategies.site_model import (
    ADAPTER_CONFIG_KEY,
    BASE_BYTES_KEY,
    CENTRAL_EVAL_KEY,
    INITIAL_ADAPTER,
    REQUEST_KEY,
)

log = logging.getLogger(__name__)

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _composed(run_config: str) -> tuple[dict, str]:
    job = job_from_run_config(json.loads(run_config))
    return job, job_digest(job)


def _job(msg: Message, context: Context) -> dict:
    """The job of this run, composed from the run config (cached per run config) and
    checked against the digest the server sent; the site's node-config overrides applied."""
    job, digest = _composed(json.dumps(dict(context.run_config), sort_keys=True))
    sent = msg.content["config"].get(JOB_DIGEST_KEY) if "config" in msg.content else None
    if sent is not None and str(sent) != digest:
        raise ValueError(f"this site composed job {digest} from the run config, the server "
                         f"sent job {sent}: the app's conf/ differs between server and site "
                         "(reinstall the same FAB at both)")
    return with_node_overrides(copy.deepcopy(job), context.node_config)


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(
            context.node_config["num-partitions"])
    except KeyError as err:
        raise ValueError(f"node_config lacks {err.args[0]!r}; the federation sets it") from None


def _replica_divergence(state: dict[str, torch.Tensor], me: dist.DistInfo) -> float:
    """max |w - w_rank0| over the adapter, computed across the data-parallel group."""
    if not me.enabled:
        return 0.0
    import torch.distributed as tdist

    flat = torch.cat([t.reshape(-1).float() for t in state.values()])
    reference = flat.clone()
    tdist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max().reshape(1)
    tdist.all_reduce(diff, op=tdist.ReduceOp.MAX)
    return float(diff)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    if KEY_CLIPPING_NORM in config:  # central DP with client-side clipping: Flower's own mod
        return fixedclipping_mod(msg, context, _train)
    return _train(msg, context)


def _train(msg: Message, context: Context) -> Message:
    me = dist.init()
    job = _job(msg, context)
    recipe = load_recipe(job)
    received = msg.content["arrays"].to_torch_state_dict()
    lora.load_adapter_state(recipe.model, received)

    partition_id, num_partitions = _partition(context)
    shard = recipe.shard("train", partition_id, num_partitions)
    config = msg.content["config"]
    server_round = int(config.get("server-round", 0))
    t, dp = job["train"], job["dp"]
    private = dp["type"] == "opacus"
    seed = int(t["seed"]) + 1000 * server_round + partition_id
    loader = make_loader(shard, recipe.collate, batch_size=int(t["batch_size"]), seed=seed,
                         dist=me)
    # a scheduler-aware strategy may give this node its own budget (strategies/queue_aware.py)
    steps = int(config.get("local-steps", t["local_steps"]))
    lr = float(t["lr"]) * float(config.get("lr-scale", 1.0))
    stats = train_steps(
        recipe.model, loader, recipe.loss_fn, steps=steps, lr=lr,
        optimizer=t["optimizer"], weight_decay=float(t["weight_decay"]),
        max_grad_norm=float(t["max_grad_norm"]),
        proximal_mu=float(config.get("proximal-mu", 0.0)), device=recipe.device, dist=me,
        dp=dp if private else None,
        dp_total_steps=steps * int(job["strategy"]["num_rounds"]),
        dp_state=_dp_state(context))

    state = lora.adapter_state(recipe.model)
    metrics = {
        "train_loss": stats.train_loss,
        "num-examples": len(shard),
        "examples-seen": stats.examples_seen * me.world_size,
        "tokens_per_s": stats.tokens_per_s * me.world_size,
        "step_time_s": stats.step_time_s,
        "world-size": me.world_size,
        "local-steps": steps,
        "replica-max-abs-diff": _replica_divergence(state, me),
    }
    if private:
        check_adapter_moved(received, state, lr)
        metrics.update(epsilon=stats.epsilon, delta=float(dp["delta"]),
                       **{"noise-multiplier": stats.noise_multiplier})
        context.state[STATE_KEY] = ConfigRecord({"accountant": stats.dp_state})
    content = RecordDict({"arrays": ArrayRecord(torch_state_dict=state),
                          "metrics": MetricRecord(metrics)})
    if me.enabled:
        content["dist"] = ConfigRecord({"rank": me.rank, "launcher": me.launcher})
    return Message(content=content, reply_to=msg)


def _dp_state(context: Context) -> str | None:
    record = context.state.get(STATE_KEY)
    return str(record["accountant"]) if record is not None else None


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    job = _job(msg, context)
    recipe = load_recipe(job)
    if msg.content["config"].get(CENTRAL_EVAL_KEY):  # for a server without the base model
        samples = recipe.test_set()
    else:
        partition_id, num_partitions = _partition(context)
        samples = recipe.shard("test", partition_id, num_partitions)
    metrics = recipe.evaluate_adapter(msg.content["arrays"].to_torch_state_dict(), samples)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """``request: initial-adapter``: the adapter every client starts from, and the
    ``adapter_config.json`` peft writes for it (for a server without the base model)."""
    config = msg.content["config"]
    if config.get(REQUEST_KEY) != INITIAL_ADAPTER:
        raise ValueError(f"unknown query {config.get(REQUEST_KEY)!r}; this ClientApp answers "
                         f"{REQUEST_KEY}={INITIAL_ADAPTER!r}")
    job = _job(msg, context)
    recipe = load_recipe(job)
    state = initial_adapter(job)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_config = (lora.save_adapter(recipe.model, state, Path(tmp))
                          / "adapter_config.json").read_text()
    base_bytes = sum(p.numel() * p.element_size()
                     for p in recipe.model.base_model.parameters() if not p.requires_grad)
    meta = ConfigRecord({ADAPTER_CONFIG_KEY: adapter_config, BASE_BYTES_KEY: base_bytes})
    return Message(content=RecordDict({"arrays": ArrayRecord(torch_state_dict=state),
                                       "config": meta}), reply_to=msg)
