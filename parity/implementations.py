"""The functions the checks call on each half, gathered in one replaceable record.

The checks never import ``lora_torch`` or ``lora_jax`` functions directly; they call
the fields of :class:`Implementations`. Swapping one field for a broken variant is how
tests plant a bug and prove the matching check fails, e.g.::

    pair = pair.with_impl(torch_merge=merge_without_linear_transpose)

Defaults are the real packages, imported on first use so that ``import parity`` stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parity.optimizers import optax_adamw, torch_adamw


def load_torch_gpt2(model_dir: Path):
    """``GPT2LMHeadModel.from_pretrained`` in float32, eval mode (no dropout), tied head."""
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(model_dir, dtype="float32").eval()


def load_jax_gpt2(model_dir: Path, quantize: str | None = None):
    """``lora_jax.gpt2.loading.load_gpt2`` -> ``(GPT2Config, params)``; ``quantize="nf4"``: the user's QLoRA load."""
    from lora_jax.gpt2.loading import load_gpt2

    return load_gpt2(model_dir) if quantize is None else load_gpt2(model_dir, quantize=quantize)


def inject_torch(model, config):
    """``lora_torch.inject_lora`` with a ``LoraConfig``'s settings, then ``freeze_base_model``.

    Every field that selects modules (``target_modules``, ``layers_to_transform``,
    ``layers_pattern``) is passed on, so both halves pick their layer index by the same rule, and
    so are ``rank_pattern`` / ``alpha_pattern``, which give modules their own rank and alpha, and
    ``use_dora``. ``init_lora_weights`` is not: the checks copy JAX's A, B (and m) into torch.
    """
    from lora_torch import freeze_base_model, inject_lora

    # LoraConfig stores lists as tuples and patterns as (key, value) pairs; inject_lora takes both as they are.
    inject_lora(model, config.target_modules, config.rank, config.alpha, dropout=config.dropout,
                use_rslora=config.use_rslora, layers_to_transform=config.layers_to_transform,
                layers_pattern=config.layers_pattern, rank_pattern=config.rank_pattern,
                alpha_pattern=config.alpha_pattern, use_dora=config.use_dora, verbose=False)
    return freeze_base_model(model)


def _deferred(package: str, name: str) -> Callable:
    """``package.name``, imported on the first call (keeps ``import parity`` free of torch and JAX)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(package), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = f"{package}.{name}"
    return call


@dataclass(frozen=True, kw_only=True)
class Implementations:
    """Every function of the two halves that the checks exercise.

    Attributes:
        load_torch: ``model_dir -> GPT2LMHeadModel`` (eval mode).
        load_jax: ``(model_dir, quantize=None) -> (GPT2Config, params)``; ``quantize="nf4"`` gives NF4 kernels.
        torch_inject: ``(model, LoraConfig) -> model`` with LoRA injected and the base frozen.
        jax_init_lora: ``(params, LoraConfig, key) -> lora_jax.Adapter`` (A drawn, B = 0).
        jax_lora_apply: ``apply_fn -> fn(params, adapter, ids)``; the scale comes from the adapter's config.
        torch_merge: ``model -> model`` with wrappers merged (reversibly).
        torch_unmerge: ``merged model -> model`` with the wrappers back.
        jax_merge: ``(params, adapter) -> merged params``.
        jax_unmerge: ``(merged params, adapter, *, weight_norms=None) -> params``; DoRA passes ``weight_norms``.
        jax_dora_weight_norms: ``(params, adapter) -> {path: ||W0 + s A B||}``, taken before a DoRA merge.
        torch_optimizer: ``(LoRA-injected model, TrainSettings) -> torch.optim.Optimizer``; each group's
            initial lr is ``settings.lr`` times its factor (LoRA+: ``ratio`` for B), which the loop keeps.
        jax_optimizer: ``TrainSettings -> optax.GradientTransformation`` (LoRA+ included).
        jax_save_adapter: ``(out_dir, adapter) -> None`` writing a PEFT directory (config from the adapter).
        jax_load_adapter: ``(adapter_dir, params) -> lora_jax.Adapter``.
        torch_save_adapter: ``(model, out_dir) -> None`` writing a PEFT directory.
        torch_load_adapter: ``(base model, adapter_dir) -> model`` with the adapter injected.
        quantize_torch: ``float GPT2LMHeadModel -> the same model with bitsandbytes Linear4bit (NF4)`` (``--quantize``).
        quantize_jax: ``float params -> params with NF4Tensor kernels`` (the quantization stage's edge probe).
        load_reference_4bit: ``model_dir -> transformers' 4-bit GPT2LMHeadModel``, the PEFT rows' base (``--quantize``).
    """

    load_torch: Callable = load_torch_gpt2
    load_jax: Callable = load_jax_gpt2
    torch_inject: Callable = inject_torch
    jax_init_lora: Callable = _deferred("lora_jax", "init_lora")
    jax_lora_apply: Callable = _deferred("lora_jax", "lora_apply")
    torch_merge: Callable = _deferred("lora_torch", "merge_lora_weights")
    torch_unmerge: Callable = _deferred("lora_torch", "unmerge_lora_weights")
    jax_merge: Callable = _deferred("lora_jax", "merge")
    jax_unmerge: Callable = _deferred("lora_jax", "unmerge")
    jax_dora_weight_norms: Callable = _deferred("lora_jax", "dora_weight_norms")
    torch_optimizer: Callable = torch_adamw
    jax_optimizer: Callable = optax_adamw
    jax_save_adapter: Callable = _deferred("lora_jax", "save_adapter")
    jax_load_adapter: Callable = _deferred("lora_jax", "load_adapter")
    torch_save_adapter: Callable = _deferred("lora_torch", "save_adapter")
    torch_load_adapter: Callable = _deferred("lora_torch", "load_adapter")
    quantize_torch: Callable = _deferred("parity.quantized", "quantize_torch")
    quantize_jax: Callable = _deferred("parity.quantized", "quantize_jax")
    load_reference_4bit: Callable = _deferred("parity.quantized", "load_transformers_4bit")
