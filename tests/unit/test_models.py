"""Model factory, LoRA adapters, the causal-LM / encoder recipes and the training loop."""

from __future__ import annotations

import hashlib

import pytest
import torch
from helpers import job_config

from client_apps import causal_lm, lora, models
from client_apps.recipe import load_recipe
from client_apps.training import batches, train_steps
from flwr_hpc.dist import DistInfo
from flwr_hpc.errors import ConfigError

CPU = torch.device("cpu")


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_build_is_deterministic(tmp_path):
    cfg = job_config()["model"]
    a, b = tmp_path / "a", tmp_path / "b"
    models.build_tiny(cfg, a)
    models.build_tiny(cfg, b)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(a / name) == _sha(b / name), name
    # and it is what the cached path serves
    cached = models.tiny_model_dir(cfg)
    assert _sha(cached / "model.safetensors") == _sha(a / "model.safetensors")


def test_only_adapter_tensors_travel_and_are_small():
    recipe = load_recipe(job_config())
    state = lora.adapter_state(recipe.model)
    assert state and all("lora_A" in k or "lora_B" in k for k in state)
    base_bytes = sum(p.numel() * p.element_size() for p in recipe.model.base_model.parameters()
                     if not p.requires_grad)
    assert lora.adapter_nbytes(state) < 0.05 * base_bytes
    # LoRA B starts at zero: the initial adapter leaves the base model's output unchanged
    assert all(float(v.abs().max()) == 0.0 for k, v in state.items() if "lora_B" in k)


def test_adapter_state_is_a_copy_and_mismatches_are_refused():
    recipe = load_recipe(job_config())
    state = lora.adapter_state(recipe.model)
    key = next(k for k in state if "lora_A" in k)
    before = state[key].clone()
    with torch.no_grad():
        for p in recipe.model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    assert torch.equal(state[key], before)  # peft returns views; we must not
    lora.load_adapter_state(recipe.model, state)
    assert torch.equal(lora.adapter_state(recipe.model)[key], before)
    bad = dict(state)
    bad.pop(key)
    with pytest.raises(ValueError, match="missing"):
        lora.load_adapter_state(recipe.model, bad)


def test_loss_is_on_answer_tokens_only():
    recipe = load_recipe(job_config())
    row = {"input": "What is the molecular formula of <SMILES> CCO </SMILES>?",
           "output": "<MOLFORMULA> C2H6O </MOLFORMULA>", "task": "name_conversion-s2f"}
    (sample,) = causal_lm.encode(recipe.tokenizer, [row], 128)
    answer = [t for t in sample["labels"] if t != causal_lm.IGNORE]
    assert sample["labels"][: sample["prompt_len"]] == [causal_lm.IGNORE] * sample["prompt_len"]
    assert answer[-1] == recipe.tokenizer.eos_token_id
    assert recipe.tokenizer.decode(answer[:-1]) == row["output"]
    assert causal_lm.answer_core(row["output"]) == "C2H6O"


def _train(recipe, steps, mu=0.0, seed=0, partitions=4, optimizer="adamw", lr=None):
    shard = recipe.shard("train", 0, partitions)
    return train_steps(recipe.model, batches(shard, recipe.collate, batch_size=16, seed=seed,
                                             dist=DistInfo()),
                       recipe.loss_fn, steps=steps, lr=lr or recipe.job["train"]["lr"],
                       optimizer=optimizer, proximal_mu=mu, device=CPU, dist=DistInfo())


def test_local_training_lowers_eval_loss_and_moves_lora_b():
    recipe = load_recipe(job_config())
    initial = lora.adapter_state(recipe.model)
    test = recipe.test_set()[:64]
    before = recipe.evaluate_adapter(initial, test)["eval_loss"]
    stats = _train(recipe, steps=25)
    after = recipe.evaluate(test)["eval_loss"]
    assert after < before - 0.5
    assert stats.steps == 25 and stats.examples_seen == 25 * 16 and stats.tokens > 0
    moved = lora.adapter_state(recipe.model)
    assert max(float(v.abs().max()) for k, v in moved.items() if "lora_B" in k) > 0


def test_proximal_term_keeps_the_adapter_near_the_global_one():
    recipe = load_recipe(job_config())
    start = lora.adapter_state(recipe.model)

    def drift(mu):
        lora.load_adapter_state(recipe.model, start)
        # plain SGD: Adam's per-coordinate normalisation would blur the proximal pull
        _train(recipe, steps=15, mu=mu, optimizer="sgd", lr=0.05)
        end = lora.adapter_state(recipe.model)
        return sum(float(((end[k] - start[k]) ** 2).sum()) for k in start) ** 0.5

    drifts = [drift(mu) for mu in (0.0, 0.3, 3.0, 15.0)]
    assert drifts[1] != drifts[0]  # the proximal term changes the update ...
    assert drifts[0] > drifts[1] > drifts[2] > drifts[3]  # ... and pulls harder as mu grows
    assert drifts[3] < 0.5 * drifts[0]


@pytest.mark.slow(20)
@pytest.mark.parametrize("name", ["tiny_bert", "tiny_albert", "tiny_deberta", "minilm"])
def test_encoders_train_with_lora_and_ship_their_head(name):
    recipe = load_recipe(job_config(f"model={name}"))
    state = lora.adapter_state(recipe.model)
    assert any("classifier" in k for k in state)  # the new head travels with the adapter
    assert all("lora_" in k or "classifier" in k or "score" in k for k in state)
    shard = recipe.shard("train", 0, 1)
    assert {s["label"] for s in shard} == {0, 1}
    test = recipe.test_set()
    before = recipe.evaluate(test)
    first = _train(recipe, steps=10, partitions=1)
    _train(recipe, steps=30, seed=1, partitions=1)
    last = _train(recipe, steps=10, seed=2, partitions=1)
    after = recipe.evaluate(test)
    assert last.train_loss < first.train_loss - 0.05
    assert after["eval_loss"] < before["eval_loss"]
    assert after["num-examples"] == len(test) == 40
    majority = max(sum(x["label"] for x in shard), sum(1 - x["label"] for x in shard))
    assert recipe.evaluate(shard)["accuracy"] > majority / len(shard)  # beats the baseline


def test_minilm_weights_are_the_pretrained_ones():
    recipe = load_recipe(job_config("model=minilm"))
    emb = recipe.model.base_model.model.bert.embeddings.word_embeddings.weight
    assert emb.shape == (30522, 384)
    # a random init would have std ~0.02 per entry; trained MiniLM embeddings do not
    assert abs(float(emb.std()) - 0.02) > 0.005


def test_model_and_job_config_errors_name_the_key(tmp_path):
    with pytest.raises(models.ModelConfigError, match="model.path"):
        models.model_dir({"name": "x", "task": "causal_lm", "source": "pretrained",
                          "path": str(tmp_path)})
    with pytest.raises(models.ModelConfigError, match="not installed"):
        models.resolve_path("pkg://no_such_pkg_xyz/model")
    with pytest.raises(ConfigError, match="train.batch_size"):
        job_config("train.batch_size=zero")
    with pytest.raises(ConfigError, match="model.path"):
        job_config("model=local_path", "model.path=null")
    with pytest.raises(ConfigError, match="proximal_mu"):
        job_config("strategy=fedprox", "strategy.proximal_mu=0")
