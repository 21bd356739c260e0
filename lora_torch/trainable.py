"""Which parameters train: the LoRA ones and nothing else, plus the tutorial's parameter report."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from lora_torch.layers import LoRALayer


def lora_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Yields ``(name, parameter)`` for every parameter that belongs to a ``LoRALayer``.

    Membership is decided by module type, not by a ``"lora_"`` substring in the name, so a base
    parameter that happens to contain ``lora_`` is never mistaken for an adapter weight.
    """
    for module_name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            for param_name, param in module.named_parameters(recurse=False):
                yield f"{module_name}.{param_name}" if module_name else param_name, param


def freeze_base_model(model: nn.Module) -> nn.Module:
    """Sets ``requires_grad = False`` on every parameter that is not a LoRA parameter; returns ``model``.

    >>> from lora_torch.inject import inject_lora
    >>> model = freeze_base_model(inject_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], rank=2, verbose=False))
    >>> [name for name, p in model.named_parameters() if p.requires_grad]
    ['0.lora.lora_A', '0.lora.lora_B']
    """
    lora_ids = {id(param) for _, param in lora_parameters(model)}
    for param in model.parameters():
        if id(param) not in lora_ids:
            param.requires_grad_(False)
    return model


def unfreeze_lora_parameters(model: nn.Module) -> nn.Module:
    """Sets ``requires_grad = True`` on every LoRA parameter; returns ``model``."""
    for _, param in lora_parameters(model):
        param.requires_grad_(True)
    return model


def print_trainable_parameters(model: nn.Module) -> dict[str, int | float]:
    """Prints and returns the trainable and total parameter counts.

    Tied parameters (GPT-2's ``wte`` and ``lm_head``) are counted once.

    Returns:
        ``{"trainable": int, "total": int, "ratio": trainable / total}`` (a fraction, not a percent).

    >>> stats = print_trainable_parameters(nn.Linear(3, 2).requires_grad_(False))
    trainable params: 0 || all params: 8 || trainable%: 0.0000
    >>> stats
    {'trainable': 0, 'total': 8, 'ratio': 0.0}
    """
    params = list(model.parameters())  # deduplicated by identity, so tied weights count once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    ratio = trainable / total if total else 0.0
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * ratio:.4f}")
    return {"trainable": trainable, "total": total, "ratio": ratio}
