"""Sequence classification with an encoder (BERT / ALBERT / DeBERTa / MiniLM) + LoRA.

The chemistry label is derived from the same instruction data: a molecule (its SMILES,
``raw_input``) is class 1 when the numeric answer of ``label_task`` (by default the
molecular weight) is at least ``threshold``. The default threshold (200 Da) splits the
bundled molecules roughly in half.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def row_label(row: Mapping[str, Any], threshold: float) -> int:
    """A row's class: 1 when its numeric answer is at least ``threshold``."""
    return int(float(row.get("raw_output") or row["output"]) >= threshold)


def label_rows(rows: Iterable[Mapping[str, Any]], *, label_task: str,
               threshold: float) -> list[tuple[str, int]]:
    """(text, label) pairs from the rows of ``label_task``; other rows are ignored."""
    return [(row.get("raw_input") or row["input"], row_label(row, threshold))
            for row in rows if row["task"] == label_task]


def encode(tokenizer, pairs: Iterable[tuple[str, int]], max_length: int) -> list[dict]:
    out = []
    for text, label in pairs:
        ids = tokenizer(text, add_special_tokens=True, truncation=True,
                        max_length=max_length)["input_ids"]
        if tokenizer.cls_token_id is None and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids[: max_length - 1]  # first token is pooled
        out.append({"input_ids": ids, "label": label})
    return out


def collate(samples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = torch.tensor(s["input_ids"])
        mask[i, : len(s["input_ids"])] = 1
    labels = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _logits(model, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def batch_loss(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    loss = F.cross_entropy(_logits(model, batch).float(), batch["labels"])
    return loss, int(batch["attention_mask"].sum())


@torch.no_grad()
def evaluate(model, tokenizer, samples: Sequence[dict], *, batch_size: int,
             device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    total, hits, n = 0.0, 0, 0
    for i in range(0, len(samples), batch_size):
        batch = {k: v.to(device) for k, v in
                 collate(samples[i:i + batch_size], tokenizer.pad_token_id).items()}
        logits = _logits(model, batch).float()
        total += float(F.cross_entropy(logits, batch["labels"], reduction="sum"))
        hits += int((logits.argmax(-1) == batch["labels"]).sum())
        n += len(batch["labels"])
    model.train(was_training)
    return {"eval_loss": total / max(n, 1), "accuracy": hits / max(n, 1), "num-examples": n}
