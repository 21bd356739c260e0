"""LoRA+ parameter groups: B learns ``ratio`` times faster than A (arXiv:2402.12354).

The grouping is PEFT 0.21's ``create_loraplus_optimizer`` (``peft/optimizers/loraplus.py``), applied to
lora_torch's parameter names (``<module>.lora.lora_A`` / ``<module>.lora.lora_B``):

- every trainable ``lora_B``, and every trainable 1-D parameter (DoRA's magnitude ``lora.magnitude``,
  or a bias or LayerNorm weight left trainable), steps at ``lr * ratio``; among them, names with ``bias`` and parameters of LayerNorm
  layers get weight decay 0 (PEFT's ``groupB_no_decay``);
- every other trainable parameter (the ``lora_A`` matrices) steps at ``lr`` with ``weight_decay``;
- the A and B of an embedding's branch (``EmbeddingWithLoRA``) step at ``lr_embedding`` (PEFT's
  ``loraplus_lr_embedding``, default 1e-6) with ``weight_decay``, whatever their names.

Empty groups are left out.

>>> import torch
>>> from torch import nn
>>> from lora_torch import freeze_base_model, inject_lora
>>> model = freeze_base_model(inject_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], rank=2, verbose=False))
>>> groups = create_loraplus_param_groups(model, lr=1e-3, ratio=16.0, weight_decay=0.01)
>>> [(g["names"], g["lr"], g["weight_decay"]) for g in groups]
[(['0.lora.lora_A'], 0.001, 0.01), (['0.lora.lora_B'], 0.016, 0.01)]
>>> optimizer = torch.optim.AdamW(groups)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from torch import nn

from lora_torch.embedding import EmbeddingLoRALayer

__all__ = ["create_loraplus_param_groups"]


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters PEFT never decays: those of LayerNorm layers and every name containing ``bias``."""
    names = set()
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                names.add(full)
    return names


def _embedding_names(model: nn.Module) -> set[str]:
    """Parameters of embedding LoRA branches: PEFT's ``embedding`` group."""
    return {f"{module_name}.{name}" for module_name, module in model.named_modules()
            if isinstance(module, EmbeddingLoRALayer) for name, _ in module.named_parameters(recurse=False)}


def create_loraplus_param_groups(
    model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0, lr_embedding: float = 1e-6
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim.AdamW(groups)`` (or any torch optimizer) with LoRA+ rates.

    Args:
        model: A model with lora_torch's LoRA injected; only parameters with ``requires_grad`` are grouped.
        lr: The learning rate of A (PEFT's ``lr``); > 0 and finite.
        ratio: ``lr_B / lr_A`` (PEFT's ``loraplus_lr_ratio``; the paper suggests 16); > 0 and finite.
        weight_decay: The decoupled weight decay of A and B (PEFT's ``loraplus_weight_decay``, which is
            what PEFT applies; a plain ``weight_decay=`` given to PEFT is overridden by each group's 0.0).
        lr_embedding: The learning rate of embedding LoRA parameters (PEFT's ``loraplus_lr_embedding``,
            whose default 1e-6 this keeps); > 0 and finite.

    Returns:
        Up to four dicts with ``params``, ``names``, ``lr`` and ``weight_decay``, in PEFT's order: A at
        ``lr``, embedding parameters at ``lr_embedding``, B at ``lr * ratio``, and B-rate parameters
        without decay. Empty groups are left out.

    Raises:
        ValueError: ``lr``, ``ratio`` or ``lr_embedding`` is not finite and > 0, ``weight_decay`` is not
            finite and >= 0, or the model has no trainable parameter.
    """
    for name, value, low in (("lr", lr, "> 0"), ("ratio", ratio, "> 0"), ("weight_decay", weight_decay, ">= 0"),
                             ("lr_embedding", lr_embedding, "> 0")):
        bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
        if bad or value < 0 or (low == "> 0" and value == 0):
            raise ValueError(f"create_loraplus_param_groups: {name} must be a finite number {low}, got {value!r}.")
    no_decay, embedding = _no_decay_names(model), _embedding_names(model)
    groups = {
        "A": {"params": [], "names": [], "lr": float(lr), "weight_decay": float(weight_decay)},
        "embedding": {"params": [], "names": [], "lr": float(lr_embedding), "weight_decay": float(weight_decay)},
        "B": {"params": [], "names": [], "lr": float(lr) * float(ratio), "weight_decay": float(weight_decay)},
        "B_no_decay": {"params": [], "names": [], "lr": float(lr) * float(ratio), "weight_decay": 0.0},
    }
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name in embedding:  # PEFT checks the module type first
            key = "embedding"
        elif name.endswith("lora_B") or param.ndim == 1:  # PEFT: `"lora_B" in name or param.ndim == 1`
            key = "B_no_decay" if name in no_decay else "B"
        else:
            key = "A"
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    if not any(group["params"] for group in groups.values()):
        raise ValueError(
            "create_loraplus_param_groups: the model has no trainable parameter; inject LoRA first "
            "(lora_torch.inject_lora) and keep its parameters trainable (lora_torch.freeze_base_model)."
        )
    return [group for group in groups.values() if group["params"]]
