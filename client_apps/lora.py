"""LoRA with peft: apply adapters, and move *only* adapter tensors in and out of messages.

The frozen base model never travels. What travels is exactly what
``get_peft_model_state_dict`` returns -- the LoRA A/B matrices, plus the classifier head
for sequence classification (``modules_to_save``) -- under peft's saved key names, so a
global adapter written with :func:`save_adapter` loads with ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS"}


def lora_config(model_cfg: Mapping[str, Any]):
    from peft import LoraConfig

    lora = dict(model_cfg.get("lora") or {})
    targets = lora.get("target_modules")
    if not targets:
        raise ValueError(f"model.lora.target_modules is required for model "
                         f"{model_cfg.get('name', '?')!r}")
    return LoraConfig(
        task_type=PEFT_TASK_TYPES[model_cfg["task"]],
        r=int(lora.get("r", 8)),
        lora_alpha=int(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(targets),
        fan_in_fan_out=bool(lora.get("fan_in_fan_out", False)),
    )


def apply_lora(base_model, model_cfg: Mapping[str, Any], seed: int = 0):
    """Wrap ``base_model`` (already on its device) with fresh LoRA adapters."""
    from peft import get_peft_model

    torch.manual_seed(seed)  # lora_A init (and a new classifier head) are random
    return get_peft_model(base_model, lora_config(model_cfg))


def adapter_state(model) -> OrderedDict[str, torch.Tensor]:
    """A *copy* of the adapter tensors (peft returns views of the live parameters)."""
    from peft import get_peft_model_state_dict

    return OrderedDict((k, v.detach().to("cpu", copy=True).contiguous())
                       for k, v in get_peft_model_state_dict(_unwrap(model)).items())


def load_adapter_state(model, state: Mapping[str, torch.Tensor]) -> None:
    """Set the adapter tensors in place; refuses missing or unexpected keys."""
    from peft import set_peft_model_state_dict

    peft_model = _unwrap(model)
    expected = set(adapter_state(peft_model))
    got = set(state)
    if got != expected:
        missing, extra = sorted(expected - got)[:3], sorted(got - expected)[:3]
        raise ValueError(f"adapter does not match the model: missing {missing}, "
                         f"unexpected {extra} (are server and site using the same model "
                         "and LoRA config?)")
    result = set_peft_model_state_dict(peft_model, dict(state))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"adapter keys not used by the model: {unexpected[:3]}")


def adapter_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def save_adapter(model, state: Mapping[str, torch.Tensor], out_dir: Path) -> Path:
    """Write ``state`` as a peft adapter directory (adapter_config.json + safetensors)."""
    load_adapter_state(model, state)
    _unwrap(model).save_pretrained(str(out_dir))
    return out_dir


def _unwrap(model):
    return getattr(model, "module", model)  # DistributedDataParallel
