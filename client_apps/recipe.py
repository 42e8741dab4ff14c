"""The training recipe: builders selected by the job config, shared by ClientApp and ServerApp.

``job`` is the composed Hydra config (sections ``model``, ``data``, ``train``,
``evaluate``) that the ServerApp sends with every message. A site may override a few keys
through its node config, so the same app runs unchanged at real facilities:

==============  ============================================================
node_config     overrides
==============  ============================================================
``model-path``  ``model.path`` (and ``model.source: pretrained``): the site's checkpoint
``data-path``   ``data.path``: the site's own instruction data (JSONL/Parquet)
``device``      ``model.device`` (``cpu``, ``cuda``, ``cuda:1``, ``auto``)
==============  ============================================================

A loaded recipe (base model + LoRA, tokenizer, tokenized shards) is cached per process,
so a worker that serves many rounds pays for model loading once.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import random
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from client_apps import causal_lm, classification, data, lora, models

NODE_OVERRIDES = {"model-path": ("model", "path"), "data-path": ("data", "path"),
                  "device": ("model", "device")}

_CACHE: dict[str, Recipe] = {}


def with_node_overrides(job: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict:
    """``job`` with the site's node-config overrides applied (see module docstring)."""
    job = copy.deepcopy(dict(job))
    for key, (section, name) in NODE_OVERRIDES.items():
        if node_config.get(key) not in (None, ""):
            job[section] = {**job[section], name: str(node_config[key])}
            if key == "model-path":
                job["model"]["source"] = "pretrained"
    return job


@dataclass
class Recipe:
    job: dict
    model: Any  # peft.PeftModel
    tokenizer: Any
    device: torch.device
    _shards: dict = field(default_factory=dict)
    # the freshly initialised adapter: the cached model's own adapter changes as soon as a
    # global adapter is loaded into it (central evaluation, a client's training)
    initial: dict = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.job["model"]["task"]

    # -- data
    def encode(self, rows) -> list[dict]:
        max_length = int(self.job["data"]["max_length"])
        if self.task == "causal_lm":
            return causal_lm.encode(self.tokenizer, rows, max_length,
                                    prompt=self.job["model"]["prompt"])
        pairs = classification.label_rows(rows, label_task=self.job["data"]["label_task"],
                                          threshold=float(self.job["data"]["threshold"]))
        return classification.encode(self.tokenizer, pairs, max_length)

    def _tasks(self) -> list[str]:
        if self.task == "sequence_classification":
            return [self.job["data"]["label_task"]]
        return list(self.job["data"].get("tasks") or [])

    def shard(self, split: str, partition_id: int, num_partitions: int) -> list[dict]:
        """Tokenized ``split`` rows of this node (Dirichlet partitioning applies to train)."""
        key = (split, partition_id, num_partitions)
        if key not in self._shards:
            d = self.job["data"]
            kind = d["partitioner"] if split == "train" else "iid"
            label = None  # classifiers: Dirichlet skews the classes, not the (one) task
            if self.task == "sequence_classification" and kind == "dirichlet":
                label = functools.partial(classification.row_label,
                                          threshold=float(d["threshold"]))
            rows = data.load_partition(partition_id, num_partitions, path=d["path"], kind=kind,
                                       alpha=float(d["alpha"]), seed=int(d["seed"]),
                                       split=split, tasks=self._tasks(), label=label)
            cap = self.job["evaluate"]["max_samples"]
            if split == "test" and cap is not None:  # this node's share of the cap
                rows = _subsample(rows, max(1, -(-int(cap) // num_partitions)), int(d["seed"]))
            self._shards[key] = self.encode(rows)
        return self._shards[key]

    def test_set(self) -> list[dict]:
        """The whole held-out split (central evaluation)."""
        if "central" not in self._shards:
            d = self.job["data"]
            rows = data.load_instructions(d["path"], split="test", tasks=self._tasks())
            cap = self.job["evaluate"]["max_samples"]
            if cap is not None:
                rows = _subsample(rows, int(cap), int(d["seed"]))
            self._shards["central"] = self.encode(rows)
        return self._shards["central"]

    # -- training pieces
    def collate(self, samples):
        module = causal_lm if self.task == "causal_lm" else classification
        return module.collate(samples, self.tokenizer.pad_token_id)

    @property
    def loss_fn(self):
        return causal_lm.batch_loss if self.task == "causal_lm" else classification.batch_loss

    def evaluate(self, samples: list[dict]) -> dict[str, float]:
        ev = self.job["evaluate"]
        if self.task == "causal_lm":
            return causal_lm.evaluate(
                self.model, self.tokenizer, samples, batch_size=int(ev["batch_size"]),
                device=self.device, exact_match_tasks=ev["exact_match_tasks"],
                max_generate=int(ev["max_generate"]), max_new_tokens=int(ev["max_new_tokens"]))
        return classification.evaluate(self.model, self.tokenizer, samples,
                                       batch_size=int(ev["batch_size"]), device=self.device)

    def evaluate_adapter(self, state: Mapping[str, torch.Tensor],
                         samples: list[dict]) -> dict[str, float]:
        lora.load_adapter_state(self.model, state)
        return self.evaluate(samples)


def _subsample(rows: list, n: int, seed: int) -> list:
    """``n`` of ``rows`` (all if fewer), chosen by ``seed``, in their original order."""
    if len(rows) <= n:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def _fingerprint(job: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps({k: job[k] for k in ("model", "data", "evaluate")},
                                     sort_keys=True, default=str).encode()).hexdigest()


def load_recipe(job: Mapping[str, Any]) -> Recipe:
    """Base model + fresh LoRA + tokenizer for ``job`` (cached per process)."""
    key = _fingerprint(job)
    if key not in _CACHE:
        _quiet_hf()
        model_cfg = job["model"]
        device = models.resolve_device(model_cfg.get("device", "auto"))
        tokenizer = models.load_tokenizer(model_cfg)
        base = models.load_base_model(model_cfg, device)
        model = lora.apply_lora(base, model_cfg, seed=int(model_cfg.get("seed", 0)))
        _CACHE.clear()  # one model per process: a new job config replaces the old one
        _CACHE[key] = Recipe(job=copy.deepcopy(dict(job)), model=model, tokenizer=tokenizer,
                             device=device, initial=lora.adapter_state(model))
    return _CACHE[key]


def initial_adapter(job: Mapping[str, Any]):
    """The adapter every client starts from (LoRA B = 0: the base model's behaviour), as
    initialised -- not whatever adapter the process's cached model holds now."""
    return OrderedDict((k, v.clone()) for k, v in load_recipe(job).initial.items())


def _quiet_hf() -> None:
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

