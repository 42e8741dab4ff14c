"""A filled-in model card (``README.md``) for every saved global adapter.

peft's ``save_pretrained`` writes a blank Hugging Face template; a round's adapter is
replaced by a card that says what it is: the base model, the LoRA setup, the data and its
split over the federation, the round, strategy and local training, differential privacy
(epsilon, delta) and the round's metrics, and how to load it. The front matter keeps the
Hub's keys (``library_name``, ``base_model``, ``tags``) so ``huggingface_hub`` reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.4g}"
    return str(value)


def model_card(job: Mapping[str, Any], row: Mapping[str, Any], *, run_id: int | str,
               job_digest: str, num_nodes: int, score_key: str) -> str:
    """The card of the adapter saved after ``row["round"]`` (a ``metrics.jsonl`` row)."""
    m, d, t, s, dp = job["model"], job["data"], job["train"], job["strategy"], job["dp"]
    base = m["path"] if m["source"] == "pretrained" and m["path"] else f"{m['name']} (tiny, " \
        f"built from its config with seed {m['seed']})"
    lora = m["lora"]
    tags = ["flwr-hpc", "flower", "federated-learning", "lora"]
    if dp["type"] != "none":
        tags.append("differential-privacy")
    front = ["---", "library_name: peft", f"base_model: {base}"
             if m["source"] == "pretrained" else f"base_model: {m['name']}",
             "tags:", *[f"- {tag}" for tag in tags], "---", ""]
    rnd = row["round"]
    if dp["type"] == "none":
        privacy = "none (no differential privacy)"
    else:
        privacy = (f"{dp['type']}: epsilon {_fmt(row.get('epsilon'))}, delta {_fmt(dp['delta'])}"
                   f", noise multiplier {_fmt(row.get('noise_multiplier'))}, clipping norm "
                   f"{_fmt(row.get('clipping_norm'))}")
    metrics = [("eval_loss (server, held-out split)", row.get("eval_loss")),
               (f"{score_key} (server)", row.get(score_key)),
               ("eval_loss (clients, federated)", row.get("federated_eval_loss")),
               ("train_loss (clients, weighted mean)", row.get("train_loss"))]
    body = [
        f"# LoRA adapter of {m['name']}, round {rnd} of {s['num_rounds']} (flwr-hpc run "
        f"{run_id})",
        "",
        f"Federated fine-tuning with [Flower](https://flower.ai) on an HPC federation "
        f"(flwr-hpc): {num_nodes} clients trained LoRA adapters on their own shards of the "
        "data; only the adapters travelled, the base model never left a site.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base} ({m['task']}, {m['dtype']}) |",
        f"| LoRA | r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
        f"targets {', '.join(lora['target_modules'])} |",
        f"| data | {d['name']}"
        + (f" ({', '.join(d['tasks'])})" if d["tasks"] else "")
        + f", {d['partitioner']} split over {num_nodes} clients |",
        f"| rounds | {rnd} of {s['num_rounds']} |",
        f"| strategy | {s['name']} |",
        f"| local training | {t['local_steps']} steps of {t['optimizer']}, lr {_fmt(t['lr'])}, "
        f"batch {t['batch_size']} per rank |",
        f"| privacy | {privacy} |",
        f"| job | digest {job_digest} (the run directory's job.json) |",
        "",
        "## Metrics after this round",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {name} | {_fmt(value)} |" for name, value in metrics],
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "model = PeftModel.from_pretrained(base_model, \"<this directory>\")",
        "```",
        "",
    ]
    return "\n".join(front + body)


def write_model_card(adapter_dir: Path, job: Mapping[str, Any], row: Mapping[str, Any],
                     **kwargs: Any) -> Path:
    """Replace peft's blank ``README.md`` in ``adapter_dir`` with :func:`model_card`."""
    path = Path(adapter_dir) / "README.md"
    path.write_text(model_card(job, row, **kwargs))
    return path
