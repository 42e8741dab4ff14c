"""DP-SGD with Opacus on the LoRA adapter: exactness, accounting, and the run end to end."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import in_process_federation, job_config
from torch.utils.data import DataLoader

from client_apps import lora
from client_apps.privacy import check_adapter_moved, noise_for
from client_apps.recipe import load_recipe
from client_apps.training import make_loader, train_steps
from flwr_hpc.dist import DistInfo
from flwr_hpc.errors import ConfigError

CPU = torch.device("cpu")


def _run(recipe, start, *, steps=3, dp=None, dp_state=None, seed=0, optimizer="adamw",
         ordered=False):
    lora.load_adapter_state(recipe.model, start)
    shard = recipe.shard("train", 0, 4)
    if ordered:  # identical batches for both runs (Opacus swaps the shuffling generator)
        loader = DataLoader(shard, batch_size=8, shuffle=False, collate_fn=recipe.collate)
    else:
        loader = make_loader(shard, recipe.collate, batch_size=8, seed=seed, dist=DistInfo())
    stats = train_steps(recipe.model, loader, recipe.loss_fn, steps=steps, lr=3e-3,
                        optimizer=optimizer, device=CPU, dist=DistInfo(), dp=dp, dp_total_steps=30,
                        dp_state=dp_state)
    return stats, lora.adapter_state(recipe.model)


def test_dp_sgd_without_noise_or_clipping_equals_plain_sgd():
    job = job_config("dp=opacus", "dp.noise_multiplier=0", "dp.max_grad_norm=1e6",
                     "dp.poisson_sampling=false")
    recipe = load_recipe(job)
    start = lora.adapter_state(recipe.model)
    # SGD: the update is linear in the gradient (Adam's normalisation would amplify
    # float rounding of near-zero gradients)
    _, plain = _run(recipe, start, optimizer="sgd", steps=5, ordered=True)
    stats, private = _run(recipe, start, dp=job["dp"], optimizer="sgd", steps=5, ordered=True)
    for k in plain:
        torch.testing.assert_close(private[k], plain[k], atol=1e-5, rtol=0)
    assert max(float((plain[k] - start[k]).abs().max()) for k in start) > 1e-5
    assert stats.noise_multiplier == 0.0


def test_epsilon_grows_across_rounds_and_restores_exactly():
    job = job_config("dp=opacus", "dp.noise_multiplier=1.0")
    recipe = load_recipe(job)
    adapter = lora.adapter_state(recipe.model)
    state, eps = None, []
    for r in range(3):
        before = adapter
        stats, adapter = _run(recipe, adapter, dp=job["dp"], dp_state=state, seed=r)
        check_adapter_moved(before, adapter, lr=3e-3)  # LoRA really trains under Opacus
        state = stats.dp_state
        eps.append(stats.epsilon)
    assert all(0 < e < float("inf") for e in eps)
    assert eps[0] < eps[1] < eps[2]
    # the accountant round-trips through JSON (Context.state) to the same epsilon
    from opacus import PrivacyEngine

    from client_apps.privacy import _history_as_tuples

    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.load_state_dict(_history_as_tuples(json.loads(state)))
    assert engine.get_epsilon(1e-5) == eps[-1]
    assert sum(h[2] for h in json.loads(state)["history"]) == 9  # 3 rounds x 3 steps


def test_target_epsilon_picks_noise_that_meets_it():
    from opacus.accountants import RDPAccountant

    dp = job_config("dp=opacus", "dp.noise_multiplier=null", "dp.target_epsilon=4")["dp"]
    sigma = noise_for(dp, sample_rate=0.05, total_steps=200)
    acc = RDPAccountant()
    acc.history = [(sigma, 0.05, 200)]
    assert 3.5 < acc.get_epsilon(1e-5) <= 4.0


def test_frozen_lora_is_detected():
    state = {"a.lora_B.weight": torch.zeros(2, 2)}
    with pytest.raises(RuntimeError, match="opacus#820"):
        check_adapter_moved(state, {"a.lora_B.weight": torch.zeros(2, 2)}, lr=1e-3)


def test_dp_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="dp.target_epsilon"):
        job_config("dp=opacus", "dp.target_epsilon=8")
    with pytest.raises(ConfigError, match="dp.noise_multiplier"):
        job_config("dp=opacus", "dp.noise_multiplier=null")
    with pytest.raises(ConfigError, match="dp.delta"):
        job_config("dp=central-server", "dp.delta=2")


def test_dp_sgd_run_reports_epsilon_every_round(run_lora_job):
    status, run_dir, rows = run_lora_job(
        "dp=opacus dp.noise_multiplier=1.0 strategy.num_rounds=2 train.local_steps=3 "
        "evaluate.federated=false evaluate.central=false", federation=in_process_federation())
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    eps = [r["epsilon"] for r in rows[1:]]
    assert 0 < eps[0] < eps[1] < float("inf")  # composed through each node's Context.state
    assert rows[1]["noise_multiplier"] == 1.0 and rows[1]["clipping_norm"] == 1.0
    assert rows[1]["train_metrics"]["epsilon"] == eps[0]
