"""A QLoRA base: the frozen params tree with its dense kernels stored as NF4, dequantized where used.

``quantize_params`` replaces every ``nn.Dense`` kernel (in, out) with ``quantize_nf4(kernel.T)``: the
(out, in) layout in which transformers hands GPT-2's ``Conv1D`` weights to bitsandbytes'
``Linear4bit`` when it loads a checkpoint in 4 bits, so the codes and statistics of a whole
checkpoint equal the torch model's byte for byte. Embeddings (GPT-2's tied head included),
LayerNorms and biases stay as they are, as transformers keeps them.

``lora_apply`` (and so ``lm_loss`` and ``make_train_step``) accepts such a tree as ``params``: it
dequantizes the NF4 kernels at trace time, inside the caller's ``jit``, so the step's inputs are the
uint8 codes and statistics and the full-precision kernels exist only as temporaries of the
compiled program. Gradients flow only to the adapter, as always.

Example:
    >>> import jax, jax.numpy as jnp
    >>> params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (64, 32)) * 0.02, "bias": jnp.zeros(32)}}
    >>> quantized = quantize_params(params)
    >>> type(quantized["up"]["kernel"]).__name__, quantized["up"]["kernel"].shape, quantized["up"]["bias"].shape
    ('NF4Tensor', (32, 64), (32,))
    >>> dequantize_params(quantized)["up"]["kernel"].shape
    (64, 32)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

from lora_jax.nf4 import NF4Tensor, quantize_nf4


def _is_nf4(leaf: Any) -> bool:
    return isinstance(leaf, NF4Tensor)


def quantize_params(params: Mapping[str, Any], *, block_size: int = 64, double_quant: bool = True) -> dict[str, Any]:
    """A copy of ``params`` whose dense kernels are ``NF4Tensor`` values of the transposed (out, in) kernel.

    Args:
        params: A Flax params tree; every module holding a 2-D ``kernel`` is quantized.
        block_size: NF4 block size (bitsandbytes' and transformers' default 64).
        double_quant: quantize the block statistics again (``bnb_4bit_use_double_quant``).

    Raises:
        ValueError: No dense kernel to quantize, a block size bitsandbytes refuses, or the params are
            already quantized. Nothing is returned half-converted.
    """
    if any(_is_nf4(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=_is_nf4)):
        raise ValueError("params are already quantized (they hold NF4Tensor kernels); quantize the float params once.")

    def convert(tree: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        out, count = {}, 0
        for key, value in tree.items():
            if key == "kernel" and getattr(value, "ndim", 0) == 2:
                out[key] = quantize_nf4(jax.numpy.asarray(value).T, block_size=block_size, double_quant=double_quant)
                count += 1
            elif isinstance(value, Mapping):
                out[key], inner = convert(value)
                count += inner
            else:
                out[key] = value
        return out, count

    quantized, count = convert(params)
    if count == 0:
        raise ValueError("params hold no 2-D 'kernel' (no flax.linen.Dense layer); there is nothing to quantize.")
    return quantized


def dequantize_params(params: Any, dtype: Any = None) -> Any:
    """``params`` with each ``NF4Tensor`` kernel dequantized (bit for bit as bitsandbytes) and transposed back to (in, out).

    A tree without NF4 leaves is returned as it is. Call it inside ``jit`` (``lora_apply`` does) so the
    full-precision kernels stay temporaries of the compiled program.
    """
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_nf4)
    if not any(_is_nf4(leaf) for leaf in leaves):
        return params
    return jax.tree_util.tree_map(lambda leaf: leaf.dequantize(dtype).T if _is_nf4(leaf) else leaf, params,
                                  is_leaf=_is_nf4)
