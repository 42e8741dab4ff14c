"""A server that never loads the base model (#20, item 2): with ``server.site`` the
initial adapter and the central evaluation come from a site, adapters are saved without
the base, and the numbers are the ones a server holding the model gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from client_apps import models
from strategies.job import compose_job

JOB = ("strategy.num_rounds=2 train.local_steps=2 evaluate.federated=false "
       "evaluate.max_samples=24 evaluate.max_generate=2")


def test_a_server_without_the_base_gets_the_same_numbers(run_lora_job):
    status, held_dir, held = run_lora_job(JOB)
    assert status == "finished:completed", (held_dir / "log.txt").read_text()[-3000:]
    status, lean_dir, lean = run_lora_job(JOB + " server.site=beta")
    assert status == "finished:completed", (lean_dir / "log.txt").read_text()[-3000:]
    assert "base model at site 'beta'" in (lean_dir / "log.txt").read_text()

    # central evaluation at the site = central evaluation at the server, every round
    assert [r["round"] for r in lean] == [r["round"] for r in held] == [0, 1, 2]
    for a, b in zip(held, lean, strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5), (a, b)
        assert b["exact_match"] == a["exact_match"]
    assert lean[-1]["eval_loss"] < lean[0]["eval_loss"]  # and it trained

    # adapters saved without the base: the same tensors, loadable by peft on the base
    for r in (1, 2):
        a = load_file(str(held_dir / "global" / f"round-{r}" / "adapter_model.safetensors"))
        b = load_file(str(lean_dir / "global" / f"round-{r}" / "adapter_model.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=0)
    from peft import PeftModel

    job = compose_job([])
    base = models.load_base_model(job["model"], torch.device("cpu"))
    model = PeftModel.from_pretrained(base, str(lean_dir / "global" / "round-2"))
    saved = load_file(str(lean_dir / "global" / "round-2" / "adapter_model.safetensors"))
    live = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(live) == len(saved)
    for key, value in saved.items():
        torch.testing.assert_close(live[key.replace(".weight", ".default.weight")], value)


def test_a_site_that_does_not_exist_is_named(run_lora_job):
    status, run_dir, _ = run_lora_job(JOB + " server.site=nowhere")
    assert status == "finished:failed"
    log = (run_dir / "log.txt").read_text()
    assert "server.site" in log and "no client at site 'nowhere'" in log
    assert "alpha, beta, gamma" in log


def _big_checkpoint(root: Path) -> Path:
    """A 1.4 GB causal-LM checkpoint (355M parameters, fp32, random init from a config),
    built once."""
    out = root / "llama-355m"
    if (out / "config.json").exists():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = models.tiny_model_dir(compose_job([])["model"])  # its tokenizer
    cfg = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=4096,
                      num_hidden_layers=21, num_attention_heads=16, num_key_value_heads=16,
                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")
    LlamaForCausalLM(cfg).save_pretrained(tmp, safe_serialization=True)
    for name in os.listdir(tiny):
        if name.startswith(("tokenizer", "special_tokens")):
            (tmp / name).write_bytes((tiny / name).read_bytes())
    tmp.rename(out)
    return out


@pytest.mark.slow(150)
def test_the_runner_stays_small_next_to_a_1gb_model(flwr_home, lora_fab, _model_cache):
    from flwr_hpc.config import load_federation
    from flwr_hpc.server.runs import prepare_run, read_status

    ckpt = _big_checkpoint(_model_cache)
    weights = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    assert weights >= 1e9
    # (with server.site=null -- the server loading the base -- this peak was 2076 MiB)
    overrides = (f"model=local_path model.path={ckpt} model.dtype=float32 server.site=alpha "
                 "strategy.num_rounds=1 train.local_steps=1 train.batch_size=2 "
                 "data.max_length=48 evaluate.federated=false evaluate.max_samples=4 "
                 "evaluate.max_generate=0 strategy.min_train_nodes=1 "
                 "strategy.min_available_nodes=1")
    fed = load_federation(["federation.sites.alpha.clients=1", "~federation.sites.beta",
                           "~federation.sites.gamma"])
    run_dir = prepare_run(lora_fab, {"overrides": overrides}, fed)
    proc = subprocess.Popen([sys.executable, "-m", "flwr_hpc.server.runner", str(run_dir)],
                            env={**os.environ, "FLWR_HOME": str(flwr_home)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = [0]

    def watch() -> None:
        me = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], me.memory_info().rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    proc.wait(timeout=900)
    watcher.join()
    status = read_status(run_dir)
    assert status.get("sub_status") == "completed", (run_dir / "log.txt").read_text()[-3000:]
    assert peak[0] <= 400 * 2**20, f"runner peak RSS {peak[0] / 2**20:.0f} MiB"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["eval_loss"] > 0
    adapter = run_dir / "global" / "round-1"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(ckpt) and config["r"] == 16
    assert (adapter / "adapter_model.safetensors").stat().st_size < 20e6  # no base inside
    print(f"runner peak RSS {peak[0] / 2**20:.0f} MiB next to a {weights / 1e9:.2f} GB model")
