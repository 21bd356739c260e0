"""One GPT-2 checkpoint loaded into both halves, and how to run each half on a batch.

``load_pair`` reads the same directory with transformers (torch) and with
``lora_jax.gpt2.loading`` (JAX). The base models are never changed afterwards: every
check works on copies (torch) or new trees (JAX), so checks are independent of each
other's order.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from parity.checkpoint import read_gpt2_config, resolve_checkpoint
from parity.implementations import Implementations
from parity.numerics import Placement, check_dtype, resolve_device


@dataclass(frozen=True)
class ModelPair:
    """The torch and JAX halves of one checkpoint.

    Attributes:
        model_dir: The checkpoint directory both halves were loaded from.
        hf_config: Its ``config.json``.
        torch_model: ``GPT2LMHeadModel`` in eval mode, float32 weights; treat as read-only.
        jax_config: ``lora_jax`` ``GPT2Config``.
        jax_params: Float32 params tree on the JAX device; read-only.
        placement: Device of both halves.
        dtype: Compute dtype, ``"fp32"`` or ``"bf16"`` (weights stay float32 either way).
        impl: The functions the checks call (replace one to plant a bug).
    """

    model_dir: Path
    hf_config: dict
    torch_model: Any
    jax_config: Any
    jax_params: Any
    placement: Placement
    dtype: str
    impl: Implementations
    quantize: str | None = None
    reference_model: Any = None
    # Compiled JAX functions by a key naming everything they close over (see ``compiled``).
    compile_cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def compiled(self, key: tuple, build: Any) -> Any:
        """``build()`` once per ``key`` on this pair; ``key`` must include every function and setting
        the built object closes over (``with_impl`` pairs share the cache, so the impl functions
        belong in the key)."""
        if key not in self.compile_cache:
            self.compile_cache[key] = build()
        return self.compile_cache[key]

    def with_impl(self, **changes: Any) -> ModelPair:
        """The same pair with some implementation functions replaced (for planted-bug tests)."""
        return dataclasses.replace(self, impl=dataclasses.replace(self.impl, **changes))

    def torch_copy(self):
        """A deep copy of the torch base model, free to inject into or merge."""
        return copy.deepcopy(self.torch_model)

    def reference_copy(self):
        """A deep copy of the base PEFT's reference rows run on: transformers' 4-bit model, else :meth:`torch_copy`."""
        return self.torch_copy() if self.reference_model is None else copy.deepcopy(self.reference_model)

    def jax_float_params(self) -> Any:
        """The JAX params with every NF4 kernel dequantized (in, out), bit for bit bitsandbytes'; else ``jax_params``.

        What shape readers and host-side maths use (LoRA init, adapter loading, DoRA norms, merges); the
        forwards, gradients and training steps run on ``jax_params`` itself, dequantized inside ``jit``.
        """
        if self.quantize is None:
            return self.jax_params
        from parity.quantized import float_params

        return self.compiled(("float_params",), lambda: float_params(self.jax_params))

    def jax_module(self):
        """The Flax ``GPT2`` module at this pair's compute dtype."""
        import jax.numpy as jnp
        from lora_jax.gpt2.model import GPT2

        return GPT2(self.jax_config, dtype=jnp.bfloat16 if self.dtype == "bf16" else jnp.float32)

    def torch_autocast(self):
        """Autocast to bf16 in bf16 mode; a no-op context in fp32 mode."""
        import torch

        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.placement.torch_device, dtype=torch.bfloat16)

    def torch_ids(self, input_ids: np.ndarray):
        """``input_ids`` as a torch long tensor on this pair's device."""
        import torch

        return torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=self.placement.torch_device)

    def torch_logits(self, model, input_ids: np.ndarray) -> np.ndarray:
        """Float32 numpy logits (B, T, V) of a torch GPT-2 (base, LoRA or merged)."""
        import torch

        with torch.no_grad(), self.torch_autocast():
            logits = model(self.torch_ids(input_ids)).logits
        return logits.float().cpu().numpy()

    def jax_logits(self, input_ids: np.ndarray, params: Any = None, adapter: Any = None) -> np.ndarray:
        """Float32 numpy logits (B, T, V) of the Flax GPT-2; with ``adapter`` through ``jax_lora_apply``.

        Args:
            input_ids: (B, T) token ids.
            params: A params tree (default: the base ``jax_params``; pass merged params here).
            adapter: A ``lora_jax.Adapter`` (its config gives the scale), or None for no LoRA branch.

        A 4-bit pair runs every forward through ``jax_lora_apply``, which dequantizes NF4 kernels inside ``jit``.
        """
        import jax
        import jax.numpy as jnp

        params = self.jax_params if params is None else params
        ids = jax.device_put(jnp.asarray(input_ids, dtype=jnp.int32), self.placement.jax_device)
        if adapter is None and self.quantize is None:
            key = ("logits", self.dtype)
            forward = self.compiled(key, lambda: jax.jit(lambda p, _, x: self.jax_module().apply({"params": p}, x)))
        else:
            # The adapter's config is static pytree data: jit traces once per config by itself.
            key = ("lora_logits", self.dtype, self.impl.jax_lora_apply)
            forward = self.compiled(key, lambda: jax.jit(self.impl.jax_lora_apply(self.jax_module().apply)))
        return np.asarray(jax.device_get(forward(params, adapter, ids)), dtype=np.float32)


def load_pair(model: str | os.PathLike | None = None, *, device: str = "cpu", dtype: str = "fp32",
              impl: Implementations | None = None, quantize: str | None = None) -> ModelPair:
    """Loads one GPT-2 checkpoint into transformers (torch) and into ``lora_jax`` (JAX).

    Args:
        model: A checkpoint directory, a hub id (needs network), or None for the project's
            embedded base (``lora_jax.embedded.ensure_base()``, built once and cached).
        device: ``"cpu"`` or ``"gpu"``.
        dtype: ``"fp32"`` or ``"bf16"`` compute.
        impl: The functions to check; default the real ``lora_torch`` / ``lora_jax``.
        quantize: ``"nf4"`` for a QLoRA base in both halves (``impl.quantize_torch``, ``impl.load_jax``)
            and transformers' 4-bit model as the reference (``impl.load_reference_4bit``); None for float.

    Raises:
        FileNotFoundError: The directory (or its config/weights) is missing.
        ValueError: Not a GPT-2 checkpoint, an unknown device/dtype, or a ``quantize`` other than ``"nf4"``.
        RuntimeError: ``device="gpu"`` without a GPU visible to both frameworks.
    """
    check_dtype(dtype)
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r} is not supported; use None or 'nf4'.")
    placement = resolve_device(device)
    model_dir = resolve_checkpoint(model)
    hf_config = read_gpt2_config(model_dir)
    impl = impl or Implementations()
    import jax

    torch_model = impl.load_torch(model_dir).to(placement.torch_device)
    # QLoRA: each half quantizes the checkpoint its user's way (lora_jax.load_gpt2(dir, quantize="nf4"),
    # lora_torch.quantize_base); the PEFT rows' base is transformers' 4-bit loading.
    jax_config, params = impl.load_jax(model_dir) if quantize is None else impl.load_jax(model_dir, quantize=quantize)
    reference = None
    if quantize is not None:
        torch_model = impl.quantize_torch(torch_model)
        reference = impl.load_reference_4bit(model_dir)
    params = jax.device_put(params, placement.jax_device)
    return ModelPair(model_dir=model_dir, hf_config=hf_config, torch_model=torch_model, jax_config=jax_config,
                     jax_params=params, placement=placement, dtype=dtype, impl=impl, quantize=quantize,
                     reference_model=reference)


def make_batches(pair: ModelPair, *, count: int, batch_size: int, seq_len: int, seed: int) -> list[np.ndarray]:
    """``count`` deterministic (batch_size, seq_len) int64 token batches within the vocabulary.

    Raises:
        ValueError: ``seq_len`` does not fit the model's positions, or a size is < 1 / < 2.
    """
    n_positions = pair.hf_config["n_positions"]
    if not 2 <= seq_len <= n_positions:
        raise ValueError(f"seq_len must be in [2, {n_positions}] (n_positions of {pair.model_dir}), got {seq_len}.")
    if batch_size < 1 or count < 1:
        raise ValueError(f"batch_size and count must be >= 1, got {batch_size} and {count}.")
    rng = np.random.default_rng(seed)
    vocab = pair.hf_config["vocab_size"]
    return [rng.integers(0, vocab, size=(batch_size, seq_len), dtype=np.int64) for _ in range(count)]
