"""Several named adapters on one frozen base model: choose, disable, mix per example, delete.

PEFT 0.21's model-level calls, as functions of the model (the tutorial's style). Each LoRA wrapper
holds its adapters by name (``LoRAWrapper``); these functions act on every wrapper at once, so all
wrappers agree on which adapters are active. ``inject_lora`` creates the adapter ``"default"``;
``add_adapter`` (``lora_torch.inject``) adds more, ``add_weighted_adapter`` (``lora_torch.weighted``)
combines them.

- ``set_adapter(model, "b")`` or ``set_adapter(model, ["a", "b"])``: the active adapters; several are
  summed, as PEFT sums them. Their parameters require grad, every other adapter's do not (PEFT's rule).
- ``with disable_adapters(model):`` the base model alone (PEFT's ``disable_adapter()``).
- ``with adapter_names(model, ["a", "__base__", "b"]):`` example ``i`` of the batch uses adapter
  ``names[i]`` or none, in training too; each adapter runs on its own examples only
  (``lora_torch.mixed_batch``). transformers' models take no ``adapter_names=`` argument, so this is a
  context manager around the call; with gradient checkpointing, run the backward inside it too.
- ``delete_adapter(model, "b")``: a module left without adapters gets its base layer back.

>>> import torch
>>> from torch import nn
>>> from lora_torch.inject import add_adapter, inject_lora
>>> model = inject_lora(nn.Sequential(nn.Linear(3, 3)), ["0"], rank=1, init_lora_weights=False, verbose=False)
>>> model = add_adapter(model, "b", ["0"], rank=2, init_lora_weights=False, verbose=False)
>>> set_adapter(model, ["default", "b"])
>>> active_adapters(model), list_adapters(model)
(['default', 'b'], ['default', 'b'])
>>> x = torch.ones(2, 3)
>>> with disable_adapters(model):
...     torch.equal(model(x), model[0].base_layer(x))
True
>>> with adapter_names(model, ["b", "__base__"]):
...     torch.equal(model(x)[1], model[0].base_layer(x)[1])
True
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence

from torch import nn

from lora_torch.dora import DoRAWrapper
from lora_torch.inject import list_adapters, lora_wrappers, model_active_adapters
from lora_torch.layers import LoRAWrapper
from lora_torch.mixed_batch import BASE_ADAPTER, BatchRouting, check_batch_names

logger = logging.getLogger(__name__)

__all__ = ["active_adapters", "adapter_names", "delete_adapter", "disable_adapters", "set_adapter"]


def _wrappers(model: nn.Module) -> dict[str, LoRAWrapper]:
    wrappers = lora_wrappers(model)
    if not wrappers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters; call inject_lora(model, ...) or "
                         "add_adapter(model, name, ...) first.")
    return wrappers


def check_known(model: nn.Module, names: Sequence[str], what: str) -> None:
    """Raises a ValueError naming every entry of ``names`` that is not an adapter of ``model``."""
    available = list_adapters(model)
    unknown = [name for name in dict.fromkeys(names) if name not in available]
    if unknown:
        raise ValueError(f"{what}: no adapter named {', '.join(map(repr, unknown))} in the model; its adapters are "
                         f"{available}. Check the spelling, or add it with add_adapter / load_adapter first.")


def active_adapters(model: nn.Module) -> list[str]:
    """The names of the active adapters, in the order the forward sums them (PEFT's ``active_adapters``)."""
    return model_active_adapters(model)


def set_adapter(model: nn.Module, adapter_names: str | Sequence[str], *, inference_mode: bool = False) -> None:
    """Makes ``adapter_names`` the active adapters of every wrapper; PEFT's ``set_adapter``.

    Several active adapters are summed (each module adds the branches it holds). As in PEFT, the
    active adapters' parameters get ``requires_grad=True`` (``False`` with ``inference_mode``) and the
    other adapters' ``False``. Nothing changes if a check fails.

    Args:
        model: a model with adapters.
        adapter_names: one name or a list of names, each an adapter of the model.
        inference_mode: freeze the active adapters too.

    Raises:
        ValueError: an unknown or repeated name, an empty list (use ``disable_adapters`` to run the base
            model), or several DoRA adapters in one module.
    """
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    wrappers = _wrappers(model)
    if not names:
        raise ValueError("set_adapter needs at least one adapter name; to run the base model alone, use "
                         "`with disable_adapters(model): ...`.")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"set_adapter: {repeated} named more than once; name each adapter once.")
    check_known(model, names, "set_adapter")
    for wrapper in wrappers.values():
        wrapper.check_active(names)
    for wrapper in wrappers.values():
        wrapper.set_adapter(names, inference_mode=inference_mode)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Removes adapter ``adapter_name`` from every module; PEFT's ``delete_adapter``.

    No other adapter and no base weight changes. A module left without adapters gets its original
    base layer back (the same module object, so ties such as GPT-2's ``wte``/``lm_head`` hold). If the
    adapter was active, the remaining active ones stay active; if none remain, the first remaining
    adapter by name is activated with a warning, as in PEFT (through ``set_adapter``, which also sets
    ``requires_grad``).

    Raises:
        ValueError: no adapter of that name.
    """
    wrappers = _wrappers(model)
    check_known(model, [adapter_name], "delete_adapter")
    was_active = adapter_name in model_active_adapters(model)
    for name, wrapper in wrappers.items():
        if adapter_name not in wrapper.adapters:
            continue
        wrapper.delete_adapter(adapter_name)
        if not wrapper.adapters:
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, wrapper.base_layer)
    remaining = list_adapters(model)
    if not was_active or not remaining:
        for wrapper in lora_wrappers(model).values():
            wrapper.active_adapters = [name for name in wrapper.active_adapters if name != adapter_name]
        return
    active = [name for name in model_active_adapters(model) if name != adapter_name]
    if not active:
        active = [sorted(remaining)[0]]
        logger.warning("delete_adapter: %r was the active adapter; %r is active now.", adapter_name, active[0])
    set_adapter(model, active)


@contextlib.contextmanager
def _set_on_wrappers(wrappers: list, attribute: str, value: object) -> Iterator[None]:
    """Sets ``attribute`` to ``value`` on every wrapper for the ``with`` block, then restores each one's own value."""
    before = [getattr(wrapper, attribute) for wrapper in wrappers]
    for wrapper in wrappers:
        setattr(wrapper, attribute, value)
    try:
        yield
    finally:
        for wrapper, previous in zip(wrappers, before):
            setattr(wrapper, attribute, previous)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Runs the base model alone inside the ``with`` block; PEFT's ``disable_adapter()``.

    Every wrapper returns its base layer's output; the adapters and the active choice are kept.

    Raises:
        ValueError: the model has no adapters.
    """
    with _set_on_wrappers(list(_wrappers(model).values()), "adapters_disabled", True):
        yield model


@contextlib.contextmanager
def adapter_names(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Inside the ``with`` block, example ``i`` of each batch uses adapter ``names[i]``; PEFT's ``adapter_names=``.

    ``"__base__"`` runs an example without adapter. Each adapter runs on its own examples only, in
    training too, so each gets gradients from its own examples; the active adapters play no part.
    A module that does not hold ``names[i]`` adds nothing for example ``i``. Inside
    ``disable_adapters`` the base model runs, as in PEFT.

    Args:
        model: a model with adapters.
        names: one adapter name per example of every batch run inside the block, in batch order.

    Raises:
        ValueError: an unknown name, or a DoRA adapter (PEFT refuses those in mixed batches too). A batch
            whose size differs from ``len(names)`` raises in the forward pass.
        TypeError: ``names`` is not a list of str.

    Example (GPT-2)::

        with adapter_names(model, ["task_a", "__base__", "task_b"]):
            logits = model(input_ids).logits   # input_ids: (3, T)
    """
    names = check_batch_names(names)
    wrappers = list(_wrappers(model).values())
    check_known(model, [name for name in names if name != BASE_ADAPTER], "adapter_names")
    dora = sorted({name for wrapper in wrappers if isinstance(wrapper, DoRAWrapper)
                   for name in names if name in wrapper.adapters})
    if dora:
        raise ValueError(f"adapter_names cannot use DoRA adapters ({dora}) in a mixed batch, as PEFT cannot; run them "
                         "on their own batches with set_adapter.")
    with _set_on_wrappers(wrappers, "batch_routing", BatchRouting(names)):
        yield model
