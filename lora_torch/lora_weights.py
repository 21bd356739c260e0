"""The tutorial's adapter file: a flat ``parameter name -> tensor`` safetensors file.

Names are the model's own, e.g. ``transformer.h.0.attn.c_attn.lora.lora_A`` (A, shape (in, r)).
PEFT's directory format is a separate pair of functions in ``lora_torch.peft_adapter``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from lora_torch.tensor_files import read_tensors, write_safetensors
from lora_torch.trainable import lora_parameters


def check_tensors_fit(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raises a ValueError unless ``found`` has exactly the names of ``expected``, same shapes, float dtypes.

    Args:
        expected: the destination tensors, by name.
        found: the tensors read from ``source``, by the same names.
        source: where ``found`` came from, for the message.
    """
    missing = sorted(set(expected) - set(found))
    unknown = sorted(set(found) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unknown:
        problems.append(f"{len(unknown)} unknown tensors, e.g. {unknown[:3]}")
    for name in sorted(set(expected) & set(found)):
        want, got = expected[name], found[name]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{name} has shape {tuple(got.shape)}, the model needs {tuple(want.shape)}")
        elif not got.is_floating_point():
            problems.append(f"{name} has dtype {got.dtype}, a floating dtype is needed")
    if problems:
        raise ValueError(f"{source} does not fit this model, nothing was loaded: " + "; ".join(problems)
                         + ". Check that the file was saved from the same base model with the same target_modules "
                         "and rank.")


def copy_into(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copies each tensor into the parameter of the same name (cast to its dtype and device)."""
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(device=param.device, dtype=param.dtype))


def _lora_state(model: nn.Module) -> dict[str, nn.Parameter]:
    state = dict(lora_parameters(model))
    if not state:
        raise ValueError(f"{type(model).__name__} has no LoRA parameters; call inject_lora(model, ...) first.")
    return state


def save_lora_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Saves every LoRA parameter (A and B of each wrapper) to a safetensors file, atomically.

    All LoRA parameters are saved whether or not they currently require grad, so the file always
    holds a complete adapter that ``load_lora_weights`` accepts.

    Args:
        model: a model with LoRA injected.
        path: destination file (``.safetensors``).

    Returns:
        The saved tensors, by parameter name.
    """
    # load_lora_weights picks the reader by suffix, so any other name would save a file it refuses.
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"save_lora_weights writes safetensors; name the file *.safetensors, not {path}.")
    tensors = {name: param.detach() for name, param in _lora_state(model).items()}
    size = write_safetensors(tensors, path)
    count = sum(t.numel() for t in tensors.values())
    print(f"save_lora_weights: {len(tensors)} tensors, {count:,} parameters, {size / 1024:.1f} KiB -> {path}")
    return tensors


def load_lora_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Loads a file written by ``save_lora_weights`` into a model that already has LoRA injected.

    Every name and shape is checked before any parameter is written, so a bad file changes nothing.
    ``.pt``/``.pth``/``.bin`` files are read only with ``torch.load(weights_only=True)``.

    Args:
        model: the model, with the same LoRA injection as when the file was saved.
        path: a ``.safetensors`` (or ``.pt``/``.pth``/``.bin``) file.

    Returns:
        ``model``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: truncated or corrupt file, missing or unknown names, or wrong shapes.
    """
    state = _lora_state(model)
    tensors = read_tensors(path)
    check_tensors_fit(state, tensors, str(path))
    copy_into(state, tensors)
    print(f"load_lora_weights: loaded {len(tensors)} tensors from {path}")
    return model
