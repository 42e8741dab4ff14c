"""The ServerApp: federated LoRA fine-tuning driven by the Hydra job config.

1. compose the job config (``conf/``) from the run config (``overrides`` and the
   Flower-style keys, ``strategies.job``) and validate it; only its digest travels (each
   ClientApp composes the same job from its ``Context.run_config``);
2. build the strategy (``strategies.builder``) and the initial adapter (LoRA B = 0);
3. run the strategy over the grid -- ``HPCGrid`` under flwr-hpc, but any Flower grid works;
   under flwr-hpc a checkpoint is written after every round and an interrupted run resumes
   from the last one, and unusable replies become node errors (``flwr_hpc.strategy.rounds``);
4. after every round: save the global adapter as ``global/round-<r>/`` (loadable with
   ``peft.PeftModel.from_pretrained``), evaluate it centrally on the held-out split when
   ``evaluate.central`` is set, and append a line to ``metrics.jsonl``.

With ``server.site`` set, this process never loads the base model: the initial adapter and
the central evaluation come from that site, and adapters are saved without the base
(``strategies.site_model``).

Outputs go to the run directory (``$FLWR_HPC_RUN_DIR``, set by the flwr-hpc runner), else
to ``output.dir``, else to ``./outputs/run-<run_id>``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from flwr_hpc.protocol import LOCAL_STEPS_KEY
from flwr_hpc.server.timing import clock_of
from flwr_hpc.strategy.rounds import start
from flwr_hpc.strategy.tracking import flat_numbers, open_tracker
from strategies.builder import build_strategy
from strategies.job import (
    JOB_DIGEST_KEY,
    check_federation_size,
    job_digest,
    job_from_run_config,
)
from strategies.metered_grid import MeteredGrid
from strategies.model_card import write_model_card
from strategies.recorder import RoundRecorder
from strategies.site_model import SiteModel

log = logging.getLogger("flwr")

app = ServerApp()


def output_dir(job: dict, context: Context) -> Path:
    if os.environ.get("FLWR_HPC_RUN_DIR"):
        return Path(os.environ["FLWR_HPC_RUN_DIR"])
    if job["output"]["dir"]:
        return Path(job["output"]["dir"]) / f"run-{context.run_id}"
    return Path("outputs") / f"run-{context.run_id}"


def round_facts(job: dict, strategy, train_metrics: dict) -> dict:
    """Strategy and privacy facts for a ``metrics.jsonl`` row."""
    dp = job["dp"]
    facts: dict = {"strategy": job["strategy"]["name"], "dp": dp["type"]}
    if dp["type"] == "opacus":
        facts.update(epsilon=train_metrics.get("epsilon"), delta=dp["delta"],
                     noise_multiplier=train_metrics.get("noise-multiplier"),
                     clipping_norm=dp["max_grad_norm"])
    elif dp["type"].startswith("central"):
        spent = strategy.privacy_spent()
        facts.update(epsilon=spent.epsilon if spent else None, delta=dp["delta"],
                     noise_multiplier=dp["noise_multiplier"], clipping_norm=dp["clipping_norm"])
    return facts


def flat_params(job: dict, prefix: str = "") -> dict:
    """The job as ``{"model.name": "tiny_llama", ...}`` (a tracker's params)."""
    out: dict = {}
    for key, value in job.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def tracked_values(row: dict, score_key: str) -> dict[str, float]:
    """A ``metrics.jsonl`` row as a tracker's numbers for the round."""
    named = {
        "train/loss": row.get("train_loss"),
        "eval/loss": row.get("eval_loss"),
        f"eval/{score_key}": row.get(score_key),
        "federated/eval_loss": row.get("federated_eval_loss"),
        f"federated/{score_key}": row.get(f"federated_{score_key}"),
        "round/time_s": row.get("round_time_s"),
        "round/clock_s": row.get("clock_s"),
        "bytes/sent": row.get("bytes_sent"),
        "bytes/received": row.get("bytes_received"),
        "train/tokens_per_s": row.get("tokens_per_s"),
        "privacy/epsilon": row.get("epsilon"),
    }
    values = flat_numbers({k: v for k, v in named.items() if v is not None})
    values.update(flat_numbers(row.get("sites") or {}, "site/"))
    return values


@app.main()
def main(grid: Grid, context: Context) -> None:
    began = time.monotonic()
    job = job_from_run_config(context.run_config)
    out_dir = output_dir(job, context)
    log.info("job: model=%s data=%s strategy=%s rounds=%d; outputs in %s",
             job["model"]["name"], job["data"]["name"], job["strategy"]["name"],
             job["strategy"]["num_rounds"], out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "job.json").write_text(json.dumps(job, indent=2, sort_keys=True))

    # what every message carries: the job's digest (the ClientApp composes the job itself
    # and checks it) and the local steps (a scheduler-aware strategy may change them)
    digest = job_digest(job)
    job_config = ConfigRecord({JOB_DIGEST_KEY: digest,
                               LOCAL_STEPS_KEY: int(job["train"]["local_steps"])})
    if job["server"]["site"] is None:  # the base model is loaded here
        from client_apps import lora
        from client_apps.recipe import initial_adapter, load_recipe

        recipe = load_recipe(job)
        initial = ArrayRecord(torch_state_dict=initial_adapter(job))
        base_bytes = sum(p.numel() * p.element_size()
                         for p in recipe.model.base_model.parameters() if not p.requires_grad)

        def save(arrays: ArrayRecord, where: Path) -> None:
            lora.save_adapter(recipe.model, arrays.to_torch_state_dict(), where)

        def central(arrays: ArrayRecord) -> dict[str, float]:
            return recipe.evaluate_adapter(arrays.to_torch_state_dict(), recipe.test_set())
    else:  # never here: the model lives at server.site (strategies/site_model.py)
        site_model = SiteModel(grid, job["server"]["site"], job_config,
                               timeout=job["strategy"]["round_timeout_s"])
        initial = site_model.initial_adapter()
        base_bytes = site_model.base_bytes
        save, central = site_model.save, site_model.central
        log.info("base model at site '%s' (node %d): initial adapter and central "
                 "evaluation there; this process never loads it", site_model.site,
                 site_model.node_id)
    log.info("adapter: %d tensors, %.1f KiB (frozen base %.1f MiB never leaves a site)",
             len(initial), sum(len(a.data) for a in initial.values()) / 1024,
             base_bytes / 2**20)

    # Node sampling is reproducible from train.seed; central DP noise only if asked for.
    random.seed(int(job["train"]["seed"]))
    if job["dp"].get("noise_seed") is not None:
        log.warning("dp.noise_seed is set: the server's DP noise is reproducible, which "
                    "voids its privacy guarantee (for tests and debugging only)")
        np.random.seed(int(job["dp"]["noise_seed"]))
    num_nodes = len(list(grid.get_node_ids()))
    check_federation_size(job, num_nodes)
    strategy = build_strategy(job, num_nodes)
    metered = MeteredGrid(grid)
    clock_fn = clock_of(grid).now  # virtual under the flwr-hpc site simulator
    score_key = "exact_match" if job["model"]["task"] == "causal_lm" else "accuracy"
    recorder = RoundRecorder(out_dir, metered, save_fn=save,
                             central_fn=central if job["evaluate"]["central"] else None,
                             extra_fn=lambda train_metrics: round_facts(job, strategy,
                                                                        train_metrics),
                             score_key=score_key,
                             save_client_updates=job["output"]["save_client_updates"],
                             clock_fn=clock_fn)
    tracker = open_tracker(job["output"]["tracker"], out_dir,
                           run_name=f"run-{context.run_id}", params=flat_params(job),
                           uri=job["output"]["tracking_uri"])

    def on_row(row: dict) -> None:
        tracker.log(int(row["round"]), tracked_values(row, score_key))
        if row.get("adapter_dir"):
            write_model_card(Path(row["adapter_dir"]), job, row, run_id=context.run_id,
                             job_digest=digest, num_nodes=num_nodes, score_key=score_key)

    recorder.on_row = on_row
    strategy = recorder.attach(strategy)
    # flwr-hpc's start = Flower's loop + a checkpoint after every round + resume from one
    # (on any grid; checkpoints where a run directory is known) + the time budget
    try:
        start(
            strategy,
            grid=metered,
            initial_arrays=initial,
            num_rounds=job["strategy"]["num_rounds"],
            timeout=job["strategy"]["round_timeout_s"],
            train_config=job_config,
            evaluate_config=job_config,
            evaluate_fn=recorder.evaluate_fn,
            time_budget_s=job["strategy"]["time_budget_s"],
        )
    finally:
        tracker.close()
    last_round = recorder.rows[-1]["round"] if recorder.rows else None
    final = out_dir / "global" / f"round-{last_round}" if last_round is not None else None
    for line in recorder.summary(run_id=context.run_id, wall_s=time.monotonic() - began,
                                 final_dir=final):
        log.info("%s", line)

