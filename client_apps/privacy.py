"""Sample-level DP-SGD with Opacus, for the LoRA adapter (``dp=opacus``).

The privacy unit is one training sequence. Per round, :func:`make_private` wraps the
model (hooks only on the trainable LoRA / head modules), the optimizer (per-sample
clipping + Gaussian noise) and the data loader (Poisson sampling); the accountant's history
comes from, and goes back to, the node's ``Context.state`` so epsilon composes across
rounds. The pitfalls of Opacus 1.6 with peft are handled here:

* the model is on its device *before* LoRA is applied (``client_apps.models``, opacus#820),
  and :func:`check_adapter_moved` asserts the LoRA weights really changed;
* ``model.train()`` before ``make_private`` (else ``UnsupportedModuleError``);
* ``rand_on_empty=True``: an empty Poisson batch becomes one data-independent row instead
  of crashing the HF forward pass;
* ``hooks.cleanup()`` after each round, so the next round does not "add hooks twice".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

STATE_KEY = "dp-opacus"


@dataclass
class PrivateTraining:
    engine: Any  # opacus.PrivacyEngine
    hooks: Any
    optimizer: Any
    loader: Any
    noise_multiplier: float
    sample_rate: float

    def epsilon(self, delta: float) -> float:
        return float(self.engine.get_epsilon(delta))

    def accountant_state(self) -> str:
        return json.dumps(self.engine.accountant.state_dict())

    def close(self) -> None:
        self.hooks.cleanup()


def noise_for(dp: Mapping[str, Any], *, sample_rate: float, total_steps: int) -> float:
    """``dp.noise_multiplier``, or the noise that meets ``dp.target_epsilon`` over the run."""
    if dp.get("noise_multiplier") is not None:
        return float(dp["noise_multiplier"])
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=float(dp["target_epsilon"]),
                                      target_delta=float(dp["delta"]),
                                      sample_rate=sample_rate, steps=total_steps,
                                      accountant=dp["accountant"]))


def make_private(model, optimizer, loader, dp: Mapping[str, Any], *, total_steps: int,
                 accountant_state: str | None, distributed: bool = False) -> PrivateTraining:
    from opacus import PrivacyEngine

    sample_rate = 1.0 / max(len(loader), 1)
    sigma = noise_for(dp, sample_rate=sample_rate, total_steps=total_steps)
    engine = PrivacyEngine(accountant=dp["accountant"])
    if accountant_state:
        engine.accountant.load_state_dict(_history_as_tuples(json.loads(accountant_state)))
    model.train()
    hooks, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=float(dp["max_grad_norm"]), poisson_sampling=bool(dp["poisson_sampling"]),
        wrap_model=False, rand_on_empty=True, grad_sample_mode="hooks")
    if not dp["poisson_sampling"] and loader.batch_size:
        # Opacus derives int(N * 1/len(loader)) -- e.g. 7 for 450 samples in batches of 8;
        # without Poisson sampling the batch size is known exactly
        optimizer.expected_batch_size = loader.batch_size
    if distributed:
        # averaged noisy gradients across the rank group (Opacus' distributed optimizer)
        from opacus.optimizers import DistributedDPOptimizer

        if not isinstance(optimizer, DistributedDPOptimizer):
            raise RuntimeError("expected Opacus' distributed DP optimizer in a rank group")
    return PrivateTraining(engine, hooks, optimizer, loader, sigma, sample_rate)


def _history_as_tuples(state: dict) -> dict:
    if "history" in state:
        state = {**state, "history": [tuple(h) for h in state["history"]]}
    return state


def check_adapter_moved(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor],
                        lr: float) -> None:
    """Opacus + peft can silently freeze LoRA (opacus#820); refuse to report such a round."""
    if lr <= 0:
        return
    moved = max(float((after[k] - before[k]).abs().max()) for k in before if "lora_B" in k)
    if moved == 0.0:
        raise RuntimeError("LoRA B weights did not change under DP-SGD (opacus#820: the model "
                           "must be moved to its device before LoRA is applied)")
