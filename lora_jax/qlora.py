"""A QLoRA base: the frozen params tree with its dense kernels stored as NF4, dequantized where used.

``quantize_params`` replaces every ``nn.Dense`` kernel (in, out) with ``quantize_nf4(kernel.T)``: the
(out, in) layout in which transformers hands GPT-2's ``Conv1D`` weights to bitsandbytes'
``Linear4bit`` when it loads a checkpoint in 4 bits, so the codes and statistics of a whole
checkpoint equal the torch model's byte for byte. Embeddings (GPT-2's tied head included),
LayerNorms and biases stay as they are, as transformers keeps them.

``lora_apply`` (and so ``lm_loss`` and ``make_train_step``) accepts such a tree as ``params``: each
``Dense`` with an NF4 kernel runs ``nf4_dense``, which dequantizes the kernel inside the caller's ``jit``
where the layer uses it, and again in the backward pass (a ``custom_vjp`` whose residual is the codes).
The step's inputs are the uint8 codes and statistics; a full-precision kernel exists only as one layer's
temporary (docs/qlora.md measures it). Gradients flow only to the adapter, as always. ``merge``
dequantizes, and ``init_lora`` and the parameter counts accept such a tree directly.

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

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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

    A tree without NF4 leaves is returned as it is. For a float copy of the model (merging, sampling,
    export); training does not need it, ``lora_apply`` dequantizes each kernel where it is used.
    """
    leaves = jax.tree_util.tree_leaves(params, is_leaf=_is_nf4)
    if not any(_is_nf4(leaf) for leaf in leaves):
        return params
    return jax.tree_util.tree_map(lambda leaf: leaf.dequantize(dtype).T if _is_nf4(leaf) else leaf, params,
                                  is_leaf=_is_nf4)


def requantize_like(params: Any, quantized: Any) -> Any:
    """``params`` (float) with each kernel that is an ``NF4Tensor`` in ``quantized`` quantized again the same way.

    The same path, block size, double quantization and dtype; other leaves are kept from ``params``. It is
    how ``merge(..., requantize=True)`` returns a 4-bit merged model.

    >>> import numpy as np
    >>> params = {"up": {"kernel": np.linspace(-1, 1, 64 * 2, dtype=np.float32).reshape(64, 2)}}
    >>> q = quantize_params(params, block_size=128, double_quant=False)
    >>> again = requantize_like(dequantize_params(q), q)["up"]["kernel"]
    >>> again.block_size, again.double_quant, bool(np.array_equal(again.codes, q["up"]["kernel"].codes))
    (128, False, True)
    """
    def again(old: Any, new: Any) -> Any:
        if not _is_nf4(old):
            return new
        return quantize_nf4(jnp.asarray(new, old.dtype).T, block_size=old.block_size, double_quant=old.double_quant)

    return jax.tree_util.tree_map(again, quantized, params, is_leaf=_is_nf4)


def has_nf4(params: Any) -> bool:
    """True when ``params`` holds at least one ``NF4Tensor``."""
    return any(_is_nf4(leaf) for leaf in jax.tree_util.tree_leaves(params, is_leaf=_is_nf4))


def float_shapes(params: Any) -> Any:
    """``params`` with each ``NF4Tensor`` replaced by a ``jax.ShapeDtypeStruct`` of the (in, out) kernel it stands for.

    What shape-only readers (``init_lora``, ``lora_param_count``, ``load_adapter``) see of a QLoRA base.

    >>> import numpy as np
    >>> float_shapes({"up": {"kernel": quantize_nf4(np.zeros((4, 64), np.float32))}})["up"]["kernel"].shape
    (64, 4)
    """
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape[::-1], leaf.dtype) if _is_nf4(leaf) else leaf, params,
        is_leaf=_is_nf4)


def _zero_cotangent(leaf: Any) -> Any:
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
        return jnp.zeros_like(leaf)
    return np.zeros(leaf.shape, jax.dtypes.float0)  # integer leaves (the codes) take float0 cotangents


def _contract_last(x: jax.Array, w: jax.Array, w_axis: int, precision: Any) -> jax.Array:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (w_axis,)), ((), ())), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _nf4_matmul(x: jax.Array, kernel: NF4Tensor, dtype: Any, precision: Any) -> jax.Array:
    # after=x: dequantized when this layer runs, not hoisted to the start of the step (docs/qlora.md)
    w = kernel.dequantize(dtype, after=x)  # (out, in), a temporary of this layer
    return _contract_last(x, w, 1, precision)  # x (..., in) . W (out, in) -> (..., out)


def _nf4_matmul_fwd(x, kernel, dtype, precision):
    return _nf4_matmul(x, kernel, dtype, precision), kernel  # the residual is the NF4 kernel, never W


def _nf4_matmul_bwd(dtype, precision, kernel, dy):
    # Dequantize again for dx = dy W, after dy: a new temporary in the backward pass, not the forward's W kept.
    w = kernel.dequantize(dtype, after=dy)
    dx = _contract_last(dy, w, 0, precision)  # (..., out) . W (out, in) -> (..., in)
    return dx, jax.tree_util.tree_map(_zero_cotangent, kernel)


_nf4_matmul.defvjp(_nf4_matmul_fwd, _nf4_matmul_bwd)


def nf4_dense(x: jax.Array, kernel: NF4Tensor, bias: Any = None, *, dtype: Any = None, precision: Any = None
              ) -> jax.Array:
    """``x W + b`` for an NF4 kernel, as ``flax.linen.Dense`` computes it with the dequantized (in, out) kernel.

    ``W`` is dequantized where it is used, in ``dtype``, and again in the backward pass (a ``custom_vjp``
    whose residual is the NF4 kernel), so the full-precision kernel is only ever a temporary. The
    kernel gets no gradient: QLoRA trains the adapter only.

    Args:
        x: (..., in) inputs.
        kernel: the ``NF4Tensor`` of the (out, in) weight (``quantize_params``' layout).
        bias: (out,) or None.
        dtype: compute dtype (a Dense's ``dtype``); None promotes ``x``, the kernel's dtype and ``bias``.
        precision: the matmul precision.

    >>> import numpy as np
    >>> w = np.linspace(-1, 1, 64 * 3, dtype=np.float32).reshape(64, 3)   # (in, out)
    >>> q = quantize_nf4(w.T)
    >>> y = nf4_dense(np.ones((2, 64), np.float32), q)
    >>> y.shape, bool(np.allclose(y, np.ones((2, 64)) @ np.asarray(q.dequantize()).T, atol=1e-6))
    ((2, 3), True)
    """
    if x.shape[-1] != kernel.shape[1]:
        raise ValueError(f"nf4_dense: inputs have {x.shape[-1]} features but the NF4 kernel {kernel.shape} is "
                         f"(out, in) = {kernel.shape}; quantize the transposed Dense kernel (quantize_params does).")
    if dtype is None:
        dtype = jnp.result_type(x.dtype, kernel.dtype, *(() if bias is None else (jnp.asarray(bias).dtype,)))
    y = _nf4_matmul(jnp.asarray(x, dtype), kernel, np.dtype(dtype), precision)
    if bias is not None:
        y = y + jnp.reshape(jnp.asarray(bias, dtype), (1,) * (y.ndim - 1) + (-1,))
    return y
