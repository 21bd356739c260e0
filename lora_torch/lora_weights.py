"""The tutorial's adapter file: a flat ``parameter name -> tensor`` safetensors file.

Names are the model's own, e.g. ``transformer.h.0.attn.c_attn.lora.lora_A`` (A, shape (in, r)).
PEFT's directory format is a separate pair of functions in ``lora_torch.peft_adapter``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from lora_torch.tensor_files import read_tensors, write_safetensors
from lora_torch.trainable import lora_parameters

logger = logging.getLogger(__name__)


def check_tensors_fit(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str, *,
                      allow_nonfinite: bool = False) -> None:
    """Raises a ValueError unless ``found`` has exactly the names of ``expected``, same shapes, float dtypes.

    NaN and inf values are refused too, unless ``allow_nonfinite`` is True. Every problem is listed.

    Args:
        expected: the destination tensors, by name.
        found: the tensors read from ``source``, by the same names.
        source: where ``found`` came from, for the message.
        allow_nonfinite: accept NaN and inf values (e.g. to inspect a diverged adapter).

    >>> check_tensors_fit({"a": torch.zeros(2)}, {"a": torch.tensor([1.0, float("nan")])}, "w.safetensors")
    Traceback (most recent call last):
    ...
    ValueError: w.safetensors was not loaded, nothing changed: a holds 1 NaN or inf values (of 2). The adapter diverged or is corrupt; use an earlier checkpoint, or pass allow_nonfinite=True to load it anyway.
    """
    missing = sorted(set(expected) - set(found))
    unknown = sorted(set(found) - set(expected))
    fit, dtypes, nonfinite = [], [], []
    if missing:
        fit.append(f"missing {len(missing)} tensors, e.g. {missing[:3]}")
    if unknown:
        fit.append(f"{len(unknown)} unknown tensors, e.g. {unknown[:3]}")
    for name in sorted(set(expected) & set(found)):
        want, got = expected[name], found[name]
        if tuple(got.shape) != tuple(want.shape):
            fit.append(f"{name} has shape {tuple(got.shape)}, the model needs {tuple(want.shape)}")
        if not got.is_floating_point():
            dtypes.append(f"{name} has dtype {got.dtype}")
        elif not allow_nonfinite and (count := int((~torch.isfinite(got)).sum())):
            nonfinite.append(f"{name} holds {count} NaN or inf values (of {got.numel()})")
    reasons = []
    if fit:
        reasons.append("it does not fit this model: " + "; ".join(fit) + ". Check that the file was saved from "
                       "the same base model with the same target_modules and rank.")
    if dtypes:
        reasons.append("; ".join(dtypes) + ". LoRA weights are floating point (PEFT saves float32); save the "
                       "adapter again from the model.")
    if nonfinite:
        reasons.append("; ".join(nonfinite) + ". The adapter diverged or is corrupt; use an earlier checkpoint, "
                       "or pass allow_nonfinite=True to load it anyway.")
    if reasons:
        raise ValueError(f"{source} was not loaded, nothing changed: " + " ".join(reasons))


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

    The file is written under a temporary name and renamed over ``path``, so a crash leaves the old
    file or the new one; it gets the usual mode (``0o666`` less the umask).

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
    logger.info("save_lora_weights: %d tensors, %s parameters, %.1f KiB -> %s", len(tensors), f"{count:,}",
                size / 1024, path)
    return tensors


def load_lora_weights(model: nn.Module, path: str | os.PathLike, *, allow_nonfinite: bool = False) -> nn.Module:
    """Loads a file written by ``save_lora_weights`` into a model that already has LoRA injected.

    Every name and shape is checked before any parameter is written, so a bad file changes nothing.
    ``.pt``/``.pth``/``.bin`` files are read only with ``torch.load(weights_only=True)``.

    Args:
        model: the model, with the same LoRA injection as when the file was saved.
        path: a ``.safetensors`` (or ``.pt``/``.pth``/``.bin``) file.
        allow_nonfinite: accept NaN and inf values instead of refusing the file.

    Returns:
        ``model``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: truncated or corrupt file, missing or unknown names, wrong shapes, a dtype that is not
            floating point, or NaN/inf values (unless ``allow_nonfinite``).
    """
    state = _lora_state(model)
    tensors = read_tensors(path)
    check_tensors_fit(state, tensors, str(path), allow_nonfinite=allow_nonfinite)
    copy_into(state, tensors)
    logger.info("load_lora_weights: loaded %d tensors from %s", len(tensors), path)
    return model
