"""The reference the variants are held to: ``peft`` itself, on the torch base, with the adapter's values.

JAX against torch cannot catch a rule that both halves share (``lora_format``'s pattern, all-linear
and key rules) or that was copied into both (DoRA's norm, LoRA+'s grouping): both halves are then
wrong the same way and agree. So the stages also compare JAX with a ``peft.PeftModel`` built by
PEFT alone (shared/DESIGN.md):

- its config is a ``peft.LoraConfig`` filled field by field from the ``lora_jax.LoraConfig``, never
  through ``lora_format`` (:func:`peft_config`);
- ``peft.get_peft_model`` picks the modules, and each module's rank, scaling and DoRA layer, by PEFT's
  own code (its ``get_pattern_key``, its all-linear expansion);
- the adapter's A, B and DoRA magnitudes are set into PEFT's own parameters by PEFT's module names
  (``lora_A.default.weight`` is ``A.T``, ``lora_B.default.weight`` is ``B.T``,
  ``lora_magnitude_vector.default.weight`` is ``m``), and a rank PEFT builds differently is an error
  naming the module (:func:`set_peft_weights`);
- gradients, training (with ``peft.optimizers.create_loraplus_optimizer`` for LoRA+), merging
  (``merge_and_unload``) and saving (``save_pretrained``) are PEFT's.

Every function imports ``peft`` lazily; :func:`peft_available` says whether the rows can be made.

Example (needs ``peft``)::

    model = peft_adapted(pair.torch_copy(), adapter)          # PEFT's modules, the adapter's values
    logits = pair.torch_logits(model, input_ids)
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np

from parity.results import CheckResult, Tolerance, failed
from parity.transfer import MAGNITUDE, adapter_magnitudes, adapter_to_named

# Every name in a PeftModel starts with this, before the base model's own dotted name.
PEFT_PREFIX = "base_model.model."
# The one adapter name get_peft_model creates.
ADAPTER_NAME = "default"


def peft_available() -> bool:
    """Whether ``peft`` is installed (without importing it)."""
    return importlib.util.find_spec("peft") is not None


def peft_config(config: Any) -> Any:
    """A ``peft.LoraConfig`` with the ``lora_jax.LoraConfig``'s fields, for GPT-2's ``Conv1D`` (``fan_in_fan_out``).

    Dropout is 0 (parity compares the deterministic function). Patterns go in as dicts in their order.

    >>> from lora_jax import LoraConfig
    >>> cfg = peft_config(LoraConfig(rank=4, alpha=8.0, target_modules=["c_attn"], use_dora=True,
    ...                               rank_pattern={"h.0.attn.c_attn": 2}))
    >>> cfg.r, cfg.lora_alpha, sorted(cfg.target_modules), cfg.use_dora, cfg.rank_pattern, cfg.fan_in_fan_out
    (4, 8.0, ['c_attn'], True, {'h.0.attn.c_attn': 2}, True)
    """
    import peft

    targets = config.target_modules
    layers_pattern = config.layers_pattern
    return peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, use_rslora=config.use_rslora,
        use_dora=config.use_dora, target_modules=targets if isinstance(targets, str) else list(targets),
        layers_to_transform=None if config.layers_to_transform is None else list(config.layers_to_transform),
        layers_pattern=layers_pattern if layers_pattern is None or isinstance(layers_pattern, str)
        else list(layers_pattern),
        rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern),
        fan_in_fan_out=True, bias="none", init_lora_weights=True)


def peft_layers(model: Any) -> dict[str, Any]:
    """``{base model's dotted name: peft LoraLayer}`` of a ``PeftModel``, in module order."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix(PEFT_PREFIX): module for name, module in model.named_modules()
            if isinstance(module, LoraLayer)}


def peft_model(base: Any, config: Any) -> Any:
    """``peft.get_peft_model(base, peft_config(config))`` in eval mode (PEFT's fresh init: B = 0).

    ``base`` is consumed (PEFT wraps it in place); pass a copy.
    """
    import peft

    return peft.get_peft_model(base, peft_config(config)).eval()


def peft_module_settings(model: Any) -> dict[str, tuple[int, float, bool]]:
    """``{name: (rank, scaling, use_dora)}`` of every layer PEFT adapted, read from PEFT's layers."""
    return {name: (int(layer.r[ADAPTER_NAME]), float(layer.scaling[ADAPTER_NAME]), bool(layer.use_dora[ADAPTER_NAME]))
            for name, layer in peft_layers(model).items()}


def _peft_parameters(model: Any) -> dict[str, tuple[Any, bool]]:
    """``{"<name>.lora_A": (param, transposed), ...}``: PEFT's live parameters under parity's flat keys."""
    params = {}
    for name, layer in peft_layers(model).items():
        if ADAPTER_NAME in layer.lora_embedding_A:  # an embedding: bare Parameters, A.T (r, vocab), B.T (dim, r)
            params[f"{name}.lora_A"] = (layer.lora_embedding_A[ADAPTER_NAME], True)
            params[f"{name}.lora_B"] = (layer.lora_embedding_B[ADAPTER_NAME], True)
            continue
        params[f"{name}.lora_A"] = (layer.lora_A[ADAPTER_NAME].weight, True)  # (r, in) = A.T
        params[f"{name}.lora_B"] = (layer.lora_B[ADAPTER_NAME].weight, True)  # (out, r) = B.T
        if layer.use_dora[ADAPTER_NAME]:
            params[f"{name}.{MAGNITUDE}"] = (layer.lora_magnitude_vector[ADAPTER_NAME].weight, False)
    return params


def set_peft_weights(model: Any, adapter: Any) -> Any:
    """Sets a ``lora_jax.Adapter``'s A, B (and m) into PEFT's parameters, all or nothing; returns ``model``.

    Raises:
        ValueError: PEFT adapted other modules, built another rank for a module (e.g. its rank_pattern
            rule gives another rank), or has DoRA where the adapter has none, or the reverse.
    """
    import torch

    named, magnitudes = adapter_to_named(adapter), adapter_magnitudes(adapter)
    layers = peft_layers(model)
    only_peft, only_adapter = sorted(set(layers) - set(named)), sorted(set(named) - set(layers))
    if only_peft or only_adapter:
        raise ValueError(f"peft.get_peft_model adapts other modules than the adapter: only PEFT {only_peft[:4]}, "
                         f"only the adapter {only_adapter[:4]}")
    values = {}
    for name, (a, b) in named.items():
        values[f"{name}.lora_A"], values[f"{name}.lora_B"] = a.T, b.T
    values.update({f"{name}.{MAGNITUDE}": m for name, m in magnitudes.items()})
    params = _peft_parameters(model)
    if set(params) != set(values):
        dora = sorted(key.rsplit(".", 1)[0] for key in set(params) ^ set(values) if key.endswith(MAGNITUDE))
        raise ValueError(f"PEFT and the adapter differ on DoRA for {dora[:4]} (a magnitude on one side only)")
    for key, (param, _) in params.items():
        if tuple(param.shape) != tuple(values[key].shape):
            module, leaf = key.rsplit(".", 1)
            raise ValueError(f"{module}: PEFT builds {leaf} with shape {tuple(param.shape)}, the adapter's is "
                             f"{tuple(values[key].shape)} (PEFT's layout: A.T (r, in), B.T (out, r)); PEFT gives this "
                             f"module rank {peft_module_settings(model)[module][0]}")
    with torch.no_grad():
        for key, (param, _) in params.items():
            param.copy_(torch.from_numpy(np.array(values[key], dtype=np.float32)).to(param.device))
    return model


def peft_adapted(base: Any, adapter: Any) -> Any:
    """A ``PeftModel`` on ``base`` (consumed: pass a copy) holding the adapter's values, in eval mode."""
    return set_peft_weights(peft_model(base, adapter.config), adapter)


def peft_leaves(model: Any) -> dict[str, np.ndarray]:
    """PEFT's A (in, r), B (r, out) and m as parity's flat float32 leaves (``parity.transfer.flat_leaves``)."""
    return {key: _numpy(param.T if transposed else param)
            for key, (param, transposed) in _peft_parameters(model).items()}


def peft_grads(model: Any) -> dict[str, np.ndarray]:
    """The gradients of :func:`peft_leaves`' leaves after a backward pass (zeros when unset)."""
    grads = {}
    for key, (param, transposed) in _peft_parameters(model).items():
        grad = np.zeros(tuple(param.shape), np.float32) if param.grad is None else _numpy(param.grad)
        grads[key] = grad.T if transposed else grad
    return grads


def peft_trainable(model: Any) -> list[Any]:
    """The parameters PEFT left trainable (``requires_grad``), in order."""
    return [param for param in model.parameters() if param.requires_grad]


def peft_merged_kernels(model: Any, names: list[str]) -> dict[str, np.ndarray]:
    """``merge_and_unload()`` on ``model`` (consumed), then each module's (in, out) kernel as float32 numpy.

    GPT-2's ``Conv1D`` keeps its (in, out) weight through PEFT's merge (``fan_in_fan_out``); an embedding's
    table is (num_embeddings, dim), the (in, out) of its update.
    """
    return merged_kernels(model.merge_and_unload(), names)


def merged_kernels(merged: Any, names: list[str]) -> dict[str, np.ndarray]:
    """Each module's (in, out) weight of a merged torch GPT-2 (Conv1D or embedding layout), float32 numpy."""
    return {name: _numpy(merged.get_submodule(name).weight) for name in names}


def _numpy(tensor: Any) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def reference_rows(stage: str, expected: list[tuple[str, Tolerance]],
                   compare: Callable[[], list[CheckResult]]) -> list[CheckResult]:
    """``compare()``'s rows; if building or running the PEFT reference raises, one failed row per expected row.

    A reference that cannot even be built for the adapter (PEFT gives a module another rank, adapts other
    modules) is a disagreement with PEFT, reported beside the half-vs-half rows instead of ending the stage.

    Args:
        stage: The stage the rows belong to.
        expected: ``(row name, tolerance)`` of each row ``compare`` returns, for the failed rows.
        compare: Builds the rows.

    >>> from parity.results import EXACT
    >>> def broken():
    ...     raise ValueError("PEFT gives h.0.attn.c_attn rank 4")
    >>> [row.detail for row in reference_rows("gradients", [("dL/dA peft vs JAX", EXACT)], broken)]
    ['PEFT reference: ValueError: PEFT gives h.0.attn.c_attn rank 4']
    """
    try:
        return compare()
    except Exception as error:  # any failure of the reference is a failed comparison with it
        reason = f"PEFT reference: {type(error).__name__}: {error}"
        return [failed(stage, name, tolerance, reason) for name, tolerance in expected]
