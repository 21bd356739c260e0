"""Helpers of the tests that compare a half with PEFT on one GPT-2 checkpoint: the same ids through
transformers' GPT-2 (plain or wrapped by PEFT) and through the Flax GPT-2, at full float32 precision."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import GPT2LMHeadModel

import lora_jax

# Two rows of token ids below the tiny GPT-2's vocabulary (101).
IDS = np.array([[5, 17, 99, 3, 42, 0, 7, 64], [1, 2, 3, 4, 5, 6, 7, 8]])


def hf_gpt2(model_dir: Path) -> GPT2LMHeadModel:
    """transformers' GPT-2 from ``model_dir`` in float32 and eval mode, loaded through ``from_pretrained``."""
    return GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()


def flax_gpt2(model_dir: Path) -> tuple[lora_jax.GPT2, dict]:
    """``(model, params)`` of the Flax GPT-2 loaded from ``model_dir``."""
    config, params = lora_jax.load_gpt2(model_dir)
    return lora_jax.GPT2(config), params


def torch_logits(model: torch.nn.Module, ids: np.ndarray = IDS, **kwargs) -> np.ndarray:
    """``model(ids).logits`` without gradients, as NumPy."""
    with torch.no_grad():
        return model(torch.as_tensor(ids), **kwargs).logits.numpy()


def jax_logits(gpt2: tuple, adapter, ids: np.ndarray = IDS, params=None, **kwargs) -> np.ndarray:
    """The Flax GPT-2's logits with ``adapter`` (an Adapter, AdapterSet or None) at the highest matmul precision."""
    model, base = gpt2
    with jax.default_matmul_precision("highest"):
        forward = lora_jax.lora_apply(model.apply)
        return np.asarray(forward(base if params is None else params, adapter, jnp.asarray(ids), **kwargs))


def max_error(a, b) -> float:
    """``max |a - b|`` in float64."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
