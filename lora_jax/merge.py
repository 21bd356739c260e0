"""Fold a LoRA tree into the kernels (``W = W0 + s A B``) and take it back out.

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

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapter import Adapter, checked_modules
from lora_jax.lora_tree import ModulePath, get_module
from lora_jax.targets import dotted_name


def lora_delta(a: jax.Array, b: jax.Array, scaling: float) -> jax.Array:
    """``scaling * A @ B`` in float32, shape (in, out): the change LoRA makes to a kernel."""
    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return scaling * jnp.matmul(a32, b32, precision=jax.lax.Precision.HIGHEST)


def _checked_kernel(params: Mapping[str, Any], path: ModulePath, a: Any, b: Any) -> Any:
    module = get_module(params, path)
    if module is None or "kernel" not in module:
        raise ValueError(
            f"LoRA module {dotted_name(path)!r} has no kernel in params; merge needs the params "
            "the adapter was made for."
        )
    kernel = module["kernel"]
    expected = (kernel.shape[0], a.shape[1]), (a.shape[1], kernel.shape[1])
    if (tuple(a.shape), tuple(b.shape)) != expected:
        raise ValueError(
            f"LoRA shapes for {dotted_name(path)!r} are A {tuple(a.shape)}, B {tuple(b.shape)} but its "
            f"kernel {tuple(kernel.shape)} needs A {expected[0]}, B {expected[1]}."
        )
    return kernel


def _with_kernels(params: Mapping[str, Any], new_kernels: Mapping[ModulePath, Any], path: ModulePath = ()) -> dict:
    """A copy of ``params`` whose kernels at ``new_kernels``' paths are replaced."""
    out = {}
    for key, value in params.items():
        here = (*path, key)
        if key == "kernel" and path in new_kernels:
            out[key] = new_kernels[path]
        elif isinstance(value, Mapping):
            out[key] = _with_kernels(value, new_kernels, here)
        else:
            out[key] = value
    return out


def _apply_delta(params: Mapping[str, Any], adapter: Adapter, sign: float) -> dict:
    # Validate every module before computing anything, so a bad adapter changes nothing.
    modules = checked_modules(adapter)
    kernels = {path: _checked_kernel(params, path, a, b) for path, (a, b) in modules.items()}
    new_kernels = {
        path: (jnp.asarray(kernels[path], jnp.float32) + sign * lora_delta(a, b, adapter.scaling(path))).astype(
            kernels[path].dtype
        )
        for path, (a, b) in modules.items()
    }
    return _with_kernels(params, new_kernels)


def merge(params: Mapping[str, Any], adapter: Adapter) -> dict[str, Any]:
    """Returns params whose adapted kernels are ``W0 + s A B``; the result has no LoRA branch.

    Args:
        params: The base params (not modified).
        adapter: An ``Adapter`` for these params; its config supplies each module's scaling.

    Raises:
        TypeError: ``adapter`` is not an ``Adapter``.
        ValueError: A LoRA module is missing from params, its shapes do not fit the kernel, or
            they disagree with the adapter's rank.
    """
    return _apply_delta(params, adapter, 1.0)


def unmerge(merged: Mapping[str, Any], adapter: Adapter) -> dict[str, Any]:
    """Inverse of ``merge``: subtracts ``s A B`` again, restoring ``W0`` up to float rounding."""
    return _apply_delta(merged, adapter, -1.0)
