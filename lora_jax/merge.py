"""Fold an adapter into the kernels (``W = W0 + s A B``; DoRA: ``lora_jax.dora``) and take it back out.

Merging is for inference and export only: training never builds ``W0 + s A B`` (see
``lora_jax.forward``). The product is computed in float32 at full matmul precision and the
result is cast back to the kernel's dtype, so merge then unmerge returns ``W0`` up to one
float rounding per element.

Example:
    >>> import numpy as np
    >>> from lora_jax.config import LoraConfig
    >>> from lora_jax.adapter import Adapter
    >>> config = LoraConfig(rank=1, alpha=2.0, target_modules=["dense"])
    >>> params = {"dense": {"kernel": np.zeros((2, 3), np.float32)}}
    >>> weights = {"dense": {"lora_A": np.ones((2, 1), np.float32), "lora_B": np.full((1, 3), 0.5, np.float32)}}
    >>> adapter = Adapter(weights, config)
    >>> merge(params, adapter)["dense"]["kernel"].tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    >>> unmerge(merge(params, adapter), adapter)["dense"]["kernel"].tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from lora_jax.adapter import Adapter, checked_modules
from lora_jax.delta import lora_delta
from lora_jax.dora import merged_kernel, unmerged_kernel, weight_norm
from lora_jax.lora_tree import ModulePath, get_module
from lora_jax.qlora import dequantize_params, has_nf4, requantize_like
from lora_jax.targets import dotted_name

_log = logging.getLogger(__name__)


def _checked_kernel(params: Mapping[str, Any], path: ModulePath, a: Any, b: Any, embedding: bool) -> Any:
    module = get_module(params, path)
    name = "embedding" if embedding else "kernel"
    if module is None or name not in module:
        raise ValueError(
            f"LoRA module {dotted_name(path)!r} has no {name} in params; merge needs the params "
            "the adapter was made for."
        )
    kernel = module[name]
    expected = (kernel.shape[0], a.shape[1]), (a.shape[1], kernel.shape[1])
    if (tuple(a.shape), tuple(b.shape)) != expected:
        raise ValueError(
            f"LoRA shapes for {dotted_name(path)!r} are A {tuple(a.shape)}, B {tuple(b.shape)} but its "
            f"kernel {tuple(kernel.shape)} needs A {expected[0]}, B {expected[1]}."
        )
    return kernel


def _with_kernels(params: Mapping[str, Any], new_kernels: Mapping[ModulePath, Any], path: ModulePath = ()) -> dict:
    """A copy of ``params`` whose kernels (or embedding tables) at ``new_kernels``' paths are replaced."""
    out = {}
    for key, value in params.items():
        here = (*path, key)
        if key in ("kernel", "embedding") and path in new_kernels:
            out[key] = new_kernels[path]
        elif isinstance(value, Mapping):
            out[key] = _with_kernels(value, new_kernels, here)
        else:
            out[key] = value
    return out


def _checked_kernels(params: Mapping[str, Any], adapter: Adapter) -> dict[ModulePath, Any]:
    # Validate every module before computing anything, so a bad adapter changes nothing.
    modules = checked_modules(adapter)
    embeddings = set(adapter.embeddings())
    return {path: _checked_kernel(params, path, a, b, path in embeddings) for path, (a, b) in modules.items()}


def _new_kernel(kernel: Any, adapter: Adapter, path: ModulePath, sign: float, norms: Mapping | None) -> Any:
    a, b = adapter.modules()[path]
    scaling = adapter.scaling(path)
    magnitude = adapter.magnitudes().get(path)
    if magnitude is None:
        new = jnp.asarray(kernel, jnp.float32) + sign * lora_delta(a, b, scaling)
    elif sign > 0:
        new = merged_kernel(kernel, a, b, magnitude, scaling)
    else:
        new = unmerged_kernel(kernel, a, b, magnitude, scaling, norms[path])
    return new.astype(kernel.dtype)


def merge(params: Mapping[str, Any], adapter: Adapter, *, requantize: bool = False) -> dict[str, Any]:
    """Returns params whose adapted kernels are ``W0 + s A B``; the result has no LoRA branch.

    A DoRA module's kernel becomes ``(m / ||V||_c) * V`` with ``V = W0 + s A B`` (``lora_jax.dora``). An
    embedding's table becomes ``E + s A B``; a head tied to it (GPT-2) then changes too, as in PEFT,
    which is logged as a warning.

    A QLoRA base (NF4 kernels) is dequantized first, bit for bit as bitsandbytes does, so the result is
    the full-precision model ``dequantize_params(params)`` merged: exactly ``merge(dequantize_params(params),
    adapter)``. With ``requantize`` the kernels that were NF4 are quantized again, with their block size and
    double quantization: a 4-bit merged model, which rounds ``s A B`` into the NF4 grid (docs/qlora.md
    measures the loss).

    Args:
        params: The base params (not modified); float or a QLoRA base.
        adapter: An ``Adapter`` for these params; its config supplies each module's scaling.
        requantize: Quantize the merged kernels that were NF4 in ``params`` again.

    Raises:
        TypeError: ``adapter`` is not an ``Adapter``.
        ValueError: A LoRA module is missing from params, its shapes do not fit the kernel, or
            they disagree with the adapter's rank; ``requantize`` with params that hold no NF4 kernel.
    """
    if requantize and not has_nf4(params):
        raise ValueError("merge(..., requantize=True) re-quantizes the NF4 kernels of a QLoRA base, and these params "
                         "hold none; drop requantize, or call lora_jax.quantize_params(merged) to quantize a float model.")
    quantized, params = params, dequantize_params(params)
    kernels = _checked_kernels(params, adapter)
    if adapter.embeddings():
        _log.warning(
            "merging LoRA into the embeddings %s: a model whose output head is tied to such a table (GPT-2's wte) "
            "then applies the update in the head too, so merged logits differ from unmerged ones; PEFT's "
            "merge_and_unload does the same (docs/variants.md).", [dotted_name(p) for p in adapter.embeddings()])
    merged = _with_kernels(params, {path: _new_kernel(k, adapter, path, 1.0, None) for path, k in kernels.items()})
    return requantize_like(merged, quantized) if requantize else merged


def dora_weight_norms(params: Mapping[str, Any], adapter: Adapter) -> dict[ModulePath, Any]:
    """``{path: ||W0 + s A B||_c}`` (out,) for a DoRA adapter's modules, from the unmerged ``params``.

    Keep it from before ``merge`` to ``unmerge`` a DoRA adapter: a merged kernel's columns have norm
    ``|m|``, so the norm the merge divided by cannot be recovered from it (PEFT caches it too).

    Raises:
        TypeError, ValueError: As ``merge``.
    """
    kernels = _checked_kernels(dequantize_params(params), adapter)
    modules = adapter.modules()
    return {path: weight_norm(kernels[path], *modules[path], adapter.scaling(path)) for path in adapter.magnitudes()}


def unmerge(merged: Mapping[str, Any], adapter: Adapter, *, weight_norms: Mapping[ModulePath, Any] | None = None
            ) -> dict[str, Any]:
    """Inverse of ``merge``: subtracts ``s A B`` again, restoring ``W0`` up to float rounding.

    Args:
        merged: Params returned by ``merge(params, adapter)``.
        adapter: The same adapter.
        weight_norms: For a DoRA adapter, ``dora_weight_norms(params, adapter)`` taken before merging.

    Raises:
        ValueError: As ``merge``, or a DoRA adapter without ``weight_norms`` for each of its modules.
    """
    merged = dequantize_params(merged)  # a re-quantized merge: W0 comes back only up to the NF4 rounding
    kernels = _checked_kernels(merged, adapter)
    dora = adapter.magnitudes()
    if dora and (weight_norms is None or any(path not in weight_norms for path in dora)):
        raise ValueError(
            "unmerging a DoRA adapter needs the weight norms taken before the merge: a merged kernel's columns have "
            "norm |m|, so ||W0 + s A B|| cannot be recovered from it. Call norms = dora_weight_norms(params, adapter) "
            "before merge(params, adapter), then unmerge(merged, adapter, weight_norms=norms); or keep params."
        )
    return _with_kernels(merged, {path: _new_kernel(k, adapter, path, -1.0, weight_norms) for path, k in kernels.items()})
