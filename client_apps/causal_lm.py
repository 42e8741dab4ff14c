"""Instruction tuning of a causal LM: tokenization, answer-only loss, eval loss, exact match.

A sample is ``<s> input \\n output </s>`` (or, for a chat model, the chat template's
user turn and assistant header, then the answer and ``<|im_end|>``); prompt tokens are
masked with -100 so the loss is on the answer (and the end-of-sequence token) only. The
loss is a per-sequence mean, then a mean over sequences -- the form DP-SGD needs (one
sequence = one privacy unit) and the one used everywhere here, with or without privacy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

IGNORE = -100


PROMPTS = ("plain", "chat")


def prompt_ids(tokenizer, text: str, prompt: str = "plain") -> list[int]:
    """The token ids of a sample's prompt: ``<s> input \\n`` (``plain``), or the user turn
    of the tokenizer's chat template followed by the assistant's header (``chat``, for
    instruction-tuned models; the same in training and evaluation)."""
    if prompt == "chat":
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    bos = tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + tokenizer(
        text + "\n", add_special_tokens=False)["input_ids"]


def encode(tokenizer, rows: Iterable[Mapping[str, Any]], max_length: int,
           prompt: str = "plain") -> list[dict]:
    """Token ids and answer-only labels; over-long samples are cut from the prompt's left.
    The answer ends with the tokenizer's end-of-sequence token (``<|im_end|>`` for a chat
    model: the end of the assistant's turn)."""
    out = []
    eos = tokenizer.eos_token_id
    for row in rows:
        answer = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
        prompt_part = prompt_ids(tokenizer, row["input"], prompt)
        answer = answer + ([eos] if eos is not None else [])
        answer = answer[: max_length - 1]
        prompt_part = prompt_part[-(max_length - len(answer)):]
        out.append({
            "input_ids": prompt_part + answer,
            "labels": [IGNORE] * len(prompt_part) + answer,
            "prompt_len": len(prompt_part),
            "task": row.get("task", ""),
            "output": row["output"],
        })
    return out


def collate(samples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch for training and loss evaluation."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sequence_losses(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Per-sequence mean answer-token loss, shape [B], and the number of answer tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    tok = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                          ignore_index=IGNORE, reduction="none").view(labels.shape)
    counts = (labels != IGNORE).sum(1)
    return tok.sum(1) / counts.clamp(min=1), int(counts.sum())


def batch_loss(model, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    losses, n_tokens = sequence_losses(model, batch)
    return losses.mean(), n_tokens


def answer_core(text: str) -> str:
    """``<SMILES> CCO </SMILES>`` -> ``CCO`` (SMolInstruct core tags stripped)."""
    text = text.strip()
    if text.startswith("<") and ">" in text:
        text = text.split(">", 1)[1]
    if "</" in text:
        text = text.rsplit("</", 1)[0]
    return text.strip()


@torch.no_grad()
def evaluate(model, tokenizer, samples: Sequence[dict], *, batch_size: int, device,
             exact_match_tasks: Sequence[str] = (), max_generate: int = 0,
             max_new_tokens: int = 48) -> dict[str, float]:
    """Eval loss over ``samples``; exact match by greedy decoding on up to ``max_generate``
    samples of ``exact_match_tasks`` (compared on the answer's core, tags stripped)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(samples), batch_size):
        batch = {k: v.to(device) for k, v in
                 collate(samples[i:i + batch_size], tokenizer.pad_token_id).items()}
        losses, _ = sequence_losses(model, batch)
        total += float(losses.sum())
        n += len(losses)
    metrics = {"eval_loss": total / max(n, 1), "num-examples": n}
    gen = [s for s in samples if s["task"] in set(exact_match_tasks)][:max_generate]
    if gen:
        hits = 0
        for i in range(0, len(gen), batch_size):
            chunk = gen[i:i + batch_size]
            predictions = greedy_answers(model, tokenizer, chunk, device, max_new_tokens)
            hits += sum(answer_core(p) == answer_core(s["output"])
                        for p, s in zip(predictions, chunk, strict=True))
        metrics["exact_match"] = hits / len(gen)
        metrics["exact_match_n"] = len(gen)
    model.train(was_training)
    return metrics


def greedy_answers(model, tokenizer, samples: Sequence[dict], device,
                   max_new_tokens: int) -> list[str]:
    """Greedy continuation of each sample's prompt (left-padded batch)."""
    prompts = [s["input_ids"][: s["prompt_len"]] for s in samples]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                         max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
