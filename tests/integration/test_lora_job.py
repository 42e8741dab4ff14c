"""The main job end to end: ServerApp + ClientApp over HPCGrid on the local federation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import read_tasks

from client_apps import causal_lm, classification, models
from client_apps.recipe import load_recipe

# the rounds as a Flower-template run-config key (-c num-server-rounds=2), the rest as
# Hydra overrides
SMALL = {"num-server-rounds": 2, "overrides": "train.local_steps=15 evaluate.max_generate=4"}


def _reload_and_evaluate(job: dict, adapter_dir) -> dict:
    """What a user does with a saved adapter: base model + PeftModel.from_pretrained."""
    from peft import PeftModel

    recipe = load_recipe(job)  # tokenizer and test set, same as the server's
    base = models.load_base_model(job["model"], torch.device("cpu"))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    ev = job["evaluate"]
    if job["model"]["task"] == "causal_lm":
        return causal_lm.evaluate(model, recipe.tokenizer, recipe.test_set(),
                                  batch_size=ev["batch_size"], device=torch.device("cpu"),
                                  exact_match_tasks=ev["exact_match_tasks"],
                                  max_generate=ev["max_generate"],
                                  max_new_tokens=ev["max_new_tokens"])
    return classification.evaluate(model, recipe.tokenizer, recipe.test_set(),
                                   batch_size=ev["batch_size"], device=torch.device("cpu"))


@pytest.mark.slow(40)
def test_main_job_learns_and_saves_reloadable_adapters(run_lora_job):
    status, run_dir, rows = run_lora_job(SMALL)
    assert status == "finished:completed", (run_dir / "log.txt").read_text()[-3000:]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.3
    assert all(r["train_replies"] == 4 for r in rows[1:])
    assert all(math.isfinite(r["train_loss"]) and r["round_time_s"] > 0 for r in rows[1:])
    assert all(r["federated_eval_loss"] is not None for r in rows[1:])

    job = json.loads((run_dir / "job.json").read_text())
    recipe = load_recipe(job)
    base_bytes = sum(p.numel() * p.element_size()
                     for p in recipe.model.base_model.parameters() if not p.requires_grad)
    adapter_bytes = sum(p.numel() * p.element_size()
                        for p in recipe.model.parameters() if p.requires_grad)
    # what a train message carries is the adapter, and nothing like the base model
    for r in rows[1:]:
        assert adapter_bytes <= r["train_message_bytes"] <= 1.05 * adapter_bytes  # + npy headers
        assert r["train_message_bytes"] < 0.05 * base_bytes
    # ... and the same on the wire: each reply written at a site is adapter-sized
    train = [t for t in read_tasks(run_dir) if t["phase"] == "train"]
    assert len(train) == 8
    for t in train:
        assert adapter_bytes < t["bytes_from_site"] < 0.05 * base_bytes

    # every round's global adapter is saved and reloads with peft, reproducing its metrics
    for r in rows:
        assert (run_dir / "global" / f"round-{r['round']}" / "adapter_config.json").exists()
    again = _reload_and_evaluate(job, run_dir / "global" / "round-2")
    assert again["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], abs=1e-5)
    assert again["exact_match"] == rows[-1]["exact_match"]
    log = (run_dir / "log.txt").read_text()
    assert "train_loss" in log and "global/round-2" in log
    assert job["strategy"]["num_rounds"] == 2  # from -c num-server-rounds


@pytest.mark.slow(80)
@pytest.mark.parametrize("model", ["tiny_bert", "minilm"])
def test_encoder_job_two_rounds(run_lora_job, model, monkeypatch):
    steps = 25 if model == "minilm" else 40
    if model == "tiny_bert":  # `flwr-hpc up -v` / `run -v`: the detail is back in log.txt
        monkeypatch.setenv("FLWR_HPC_VERBOSE", "1")
    status, run_dir, rows = run_lora_job(
        f"model={model} strategy.num_rounds=2 train.local_steps={steps}")
    log = (run_dir / "log.txt").read_text()
    assert status == "finished:completed", log[-3000:]
    # Flower's round loop and each task's end: in debug.txt always, in log.txt when verbose
    detail = ("[ROUND 2/2]", "aggregate_evaluate: Received 4 results", "tasks done (site")
    debug = (run_dir / "debug.txt").read_text()
    assert all(d in debug for d in detail)
    assert all((d in log) == (model == "tiny_bert") for d in detail), log
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["train_loss"] < rows[1]["train_loss"], rows
    if model == "minilm":  # pretrained features: the held-out loss moves within 2 rounds
        assert rows[-1]["eval_loss"] < rows[0]["eval_loss"], rows
    for r in rows[1:]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["train_replies"] == 4
        assert r["federated_accuracy"] is not None
    job = json.loads((run_dir / "job.json").read_text())
    again = _reload_and_evaluate(job, run_dir / "global" / "round-2")
    assert again["eval_loss"] == pytest.approx(rows[-1]["eval_loss"], abs=1e-5)
    assert again["accuracy"] == rows[-1]["accuracy"]
