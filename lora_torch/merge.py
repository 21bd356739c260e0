"""Merge: fold each LoRA update into its base weight, and the way back.

``merge_lora_weights`` replaces every wrapper with a copy of its base layer (a plain ``nn.Linear``,
``Conv1D`` or ``nn.Embedding``) whose weight is ``W0 + s * (A @ B).T`` (Linear, (out, in)) or
``W0 + s * A @ B`` (Conv1D (in, out), Embedding (num_embeddings, dim)); a DoRA wrapper writes
``(m / ||W0 + s A B||) * (W0 + s A B)`` instead (``lora_torch.dora``). Subtracting the update again
would not give ``W0`` back bit for bit (float rounding), so by default the merged layer keeps a
reference to its wrapper, whose ``base_layer`` still holds the untouched ``W0``;
``unmerge_lora_weights`` puts the wrapper back, exactly.

A base weight that is tied to another module (GPT-2's ``wte`` and ``lm_head`` share one Parameter)
is merged in place instead, as PEFT's ``merge_and_unload`` does: a copy would untie it. The merged
layer is the base layer itself, the tie holds, and the other module sees the merged weight too, so
merged logits differ from unmerged ones (which adapt only the wrapped module); a warning says so.
A copy of ``W0`` is kept for the unmerge, which writes it back into the shared Parameter.

A QLoRA wrapper (``lora_torch.quantize``, a bitsandbytes ``Linear4bit`` base) merges by dequantizing:
its plain layer holds ``dequantize_4bit(W) + s (A @ B).T`` in full precision (a ``Conv1D`` again when
the 4-bit layer came from one), so the model is full precision at those modules. With
``requantize=True`` that weight is quantized back into a ``Linear4bit`` (lossy). Either way the
wrapper, with its 4-bit base untouched, is kept for ``unmerge_lora_weights``.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from lora_torch.inject import list_adapters, lora_wrappers
from lora_torch.layers import LoRAWrapper
from lora_torch.quantize import Linear4bitWithLoRA, merged_module

logger = logging.getLogger(__name__)

# Set with object.__setattr__ so the wrapper is not registered as a submodule: the merged model's
# state_dict, parameters() and save_pretrained see only the plain layer.
_UNMERGE_ATTR = "lora_unmerge_wrapper"
_UNMERGE_WEIGHT_ATTR = "lora_unmerge_weight"  # W0 of a layer merged in place (a tied weight)


def _tied_to(model: nn.Module, name: str, wrapper: LoRAWrapper) -> list[str]:
    """The other parameter names that hold the wrapper's base weight (``["lm_head.weight"]`` for GPT-2's wte)."""
    own = f"{name}.base_layer.weight"
    weight = wrapper.base_layer.weight
    return [other for other, param in model.named_parameters(remove_duplicate=False)
            if param is weight and other != own]


def _merged_layer(wrapper: LoRAWrapper, keep_for_unmerge: bool, tied: bool,
                  adapter_names: list[str] | None, requantize: bool = False) -> nn.Module:
    if isinstance(wrapper, Linear4bitWithLoRA):  # a new dense (or re-quantized) layer; the 4-bit base is kept
        merged = merged_module(wrapper, adapter_names, requantize)
        if keep_for_unmerge:
            object.__setattr__(merged, _UNMERGE_ATTR, wrapper)
        return merged
    base = wrapper.base_layer
    in_place = tied or not keep_for_unmerge
    merged = base if in_place else copy.deepcopy(base)
    with torch.no_grad():
        # Computed from the wrapper's own base_layer before anything is written.
        weight = (wrapper.merged_weight() if adapter_names is None else wrapper.merged_weight(adapter_names)).to(
            merged.weight.dtype)
        if keep_for_unmerge and in_place:
            object.__setattr__(merged, _UNMERGE_WEIGHT_ATTR, merged.weight.detach().clone())
        merged.weight.copy_(weight)
    if keep_for_unmerge:
        object.__setattr__(merged, _UNMERGE_ATTR, wrapper)
    return merged


def _warn_tied(name: str, tied: list[str]) -> None:
    logger.warning(
        "merge_lora_weights: %s's weight is tied to %s, so the merge writes the merged weight into that shared "
        "Parameter and %s changes too. The merged model's logits will differ from the unmerged one's, which adapts "
        "only %s (PEFT's merge_and_unload does the same). unmerge_lora_weights restores both.",
        name, ", ".join(tied), ", ".join(t.removesuffix(".weight") for t in tied), name)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def merge_lora_weights(model: nn.Module, *, keep_for_unmerge: bool = True,
                       adapter_names: list[str] | None = None, requantize: bool = False) -> nn.Module:
    """Replaces every LoRA wrapper with a plain layer holding the merged weight; returns ``model``.

    A base weight tied to another module is merged in place, keeping the tie (module docstring), and
    a WARNING is logged: the other module changes too, so merged logits differ from unmerged ones.

    Args:
        model: a model with LoRA injected (modified in place).
        keep_for_unmerge: keep each wrapper (and so the exact base weight) for
            ``unmerge_lora_weights``. Costs one extra copy of each targeted weight; pass False to
            merge in place when memory matters and no way back is needed.
        adapter_names: the adapters to fold in (their updates are summed); default the active ones,
            as PEFT's ``merge_and_unload``. A module holding none of them gets its base weight.
            Unmerging puts every adapter back, whichever were merged.
        requantize: QLoRA only: quantize each merged 4-bit layer back to NF4 (a ``Linear4bit`` with the base's
            settings) instead of leaving it in full precision. Lossy: the merged weight moves by up to half a
            quantization step (measured in docs/lora_torch.md, "QLoRA").

    Raises:
        ValueError: the model has no LoRA wrappers, an unknown adapter name, two DoRA adapters in one module,
            or ``requantize`` on a model without 4-bit layers.

    >>> from lora_torch.inject import inject_lora
    >>> model = inject_lora(nn.Sequential(nn.Linear(4, 3)), ["0"], rank=2, verbose=False)
    >>> type(merge_lora_weights(model)[0]).__name__
    'Linear'
    """
    wrappers = lora_wrappers(model)
    if not wrappers:
        raise ValueError(f"{type(model).__name__} has no LoRA wrappers to merge; call inject_lora(model, ...) first.")
    if adapter_names is not None:
        adapter_names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        available = list_adapters(model)
        unknown = [name for name in adapter_names if name not in available]
        if unknown:
            raise ValueError(f"merge_lora_weights: no adapter named {unknown} in the model; its adapters are "
                             f"{available}.")
    if requantize and not any(isinstance(wrapper, Linear4bitWithLoRA) for wrapper in wrappers.values()):
        raise ValueError("requantize=True re-quantizes merged 4-bit (QLoRA) layers, and this model has none; "
                         "merge without it.")
    for wrapper in wrappers.values():  # before anything is written: DoRA merges one adapter at most
        wrapper.check_active(wrapper.merge_names(adapter_names))
    for name, wrapper in wrappers.items():
        tied = _tied_to(model, name, wrapper)
        if tied:
            _warn_tied(name, tied)
        _replace(model, name, _merged_layer(wrapper, keep_for_unmerge, bool(tied), adapter_names, requantize))
    return model


def unmerge_lora_weights(model: nn.Module) -> nn.Module:
    """Puts back the LoRA wrappers that ``merge_lora_weights`` replaced; returns ``model``.

    The base weights come back bit-identical to before the merge. Changes made to the merged
    weights after merging (e.g. further training) are discarded.

    Raises:
        ValueError: no merged layer kept its wrapper (nothing merged, already unmerged, or
            ``keep_for_unmerge=False``), or the model carries live LoRA wrappers (injected after the merge).
    """
    live = list(lora_wrappers(model))
    restorable = {name: module.__dict__[_UNMERGE_ATTR] for name, module in model.named_modules()
                  if _UNMERGE_ATTR in module.__dict__}
    if live and not restorable:
        raise ValueError(f"the model is not merged: its LoRA layers are live ({live[:3]}...), so there is nothing "
                         "to unmerge (was it unmerged already?). Call merge_lora_weights(model) first.")
    if live:
        # A kept layer may now sit inside a new wrapper; restoring it there would nest adapters.
        raise ValueError(f"the model carries LoRA injected after the merge ({live[:3]}...); "
                         "merge_lora_weights(model) those first, then unmerge.")
    if not restorable:
        raise ValueError("nothing to unmerge: no layer was merged by merge_lora_weights(model, keep_for_unmerge=True).")
    # Reverse order: two wrappers merged in turn into one tied weight are unwound last-merged first.
    for name, wrapper in reversed(restorable.items()):
        merged = model.get_submodule(name)
        if _UNMERGE_WEIGHT_ATTR in merged.__dict__:  # merged in place: write W0 back into the shared Parameter
            with torch.no_grad():
                merged.weight.copy_(merged.__dict__.pop(_UNMERGE_WEIGHT_ATTR))
        del merged.__dict__[_UNMERGE_ATTR]  # merged may be wrapper.base_layer itself; it must not look merged
        # Follow any .to(device/dtype) the model had after the merge; the kept wrapper was not moved with it.
        if isinstance(wrapper, Linear4bitWithLoRA):  # its codes are uint8 and its LoRA float32: the device only
            wrapper.to(device=merged.weight.device)
        else:
            wrapper.to(device=merged.weight.device, dtype=merged.weight.dtype)
        _replace(model, name, wrapper)
    return model
