"""Read the 4-bit tensors of a checkpoint that transformers saved from a bitsandbytes (QLoRA) model.

``model.save_pretrained`` of a model loaded with ``BitsAndBytesConfig(load_in_4bit=True, ...)`` stores each
``Linear4bit`` weight as a group of tensors beside the float ones::

    <name>.weight                                  uint8 (ceil(n / 2), 1): packed codes, first code in the high nibble
    <name>.weight.absmax                           float32 per block, or uint8 8-bit codes with double quantization
    <name>.weight.quant_map                        float32 (16,): the NF4 table
    <name>.weight.nested_absmax                    float32 per 256 blocks (double quantization only)
    <name>.weight.nested_quant_map                 float32 (256,): the 8-bit dynamic map (double quantization only)
    <name>.weight.quant_state.bitsandbytes__nf4    uint8: JSON {"quant_type", "blocksize", "dtype", "shape",
                                                   "nested_blocksize", "nested_dtype", "nested_offset"}

``split_4bit_tensors`` turns each group into an ``NF4Tensor`` without re-quantizing. Every group is checked
first, and one ``ValueError`` names each tensor whose statistics do not fit its codes: the block count
``ceil(n / blocksize)``, the nested block count, the maps (exactly NF4 and bitsandbytes' dynamic map, the only
ones ``NF4Tensor`` decodes), the shape and dtype from the JSON, missing or extra parts. Nothing is unpickled.

Example:
    >>> import json, numpy as np
    >>> from lora_jax.nf4 import NF4_VALUES, quantize_nf4
    >>> q = quantize_nf4(np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64), double_quant=False)
    >>> state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [2, 64]})
    >>> raw = {"fc.weight": np.asarray(q.codes)[:, None], "fc.weight.absmax": np.asarray(q.absmax),
    ...        "fc.weight.quant_map": NF4_VALUES, "fc.bias": np.zeros(2, np.float32),
    ...        "fc.weight.quant_state.bitsandbytes__nf4": np.frombuffer(state.encode(), np.uint8)}
    >>> rest, quantized = split_4bit_tensors(raw)
    >>> sorted(rest), quantized["fc.weight"].shape, quantized["fc.weight"].double_quant
    (['fc.bias'], (2, 64), False)
    >>> raw["fc.weight.absmax"] = raw["fc.weight.absmax"][:1]
    >>> split_4bit_tensors(raw)
    Traceback (most recent call last):
    ...
    ValueError: The 4-bit tensors of this checkpoint do not fit together: fc.weight: absmax has shape (1,), expected (2,) (one per block of 64 of 128 values). Re-save the checkpoint from the quantized model (model.save_pretrained), or load the float checkpoint with quantize='nf4'.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from lora_jax.nf4 import BLOCK_SIZES, INPUT_DTYPES, NESTED_BLOCK_SIZE, NF4_VALUES, NF4Tensor, dynamic_map

STATE_SUFFIX = ".quant_state.bitsandbytes__"
_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_DTYPES = {np.dtype(d).name: np.dtype(d) for d in INPUT_DTYPES}


class _Problems(list):
    """Problems found in one tensor group; each names the tensor."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def add(self, message: str) -> None:
        self.append(f"{self.name}: {message}")


def split_4bit_tensors(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, NF4Tensor]]:
    """``(float_tensors, {weight_name: NF4Tensor})``: the 4-bit groups of ``raw`` decoded, every other tensor kept.

    Args:
        raw: name -> array, as read from ``model.safetensors``.

    Raises:
        ValueError: Any group is incomplete, or its statistics do not match its codes (all problems in one
            message, before any ``NF4Tensor`` is built), or it is not NF4 (bitsandbytes' FP4).
    """
    states = {key[: key.index(STATE_SUFFIX)]: key for key in raw if STATE_SUFFIX in key}
    problems: list[str] = []
    groups = {}
    for weight, state_key in states.items():
        group = _Problems(weight)
        groups[weight] = _checked_group(raw, weight, state_key, group)
        problems += group
    owned = {key for weight, state_key in states.items()
             for key in (weight, state_key, *(f"{weight}.{part}" for part in _PARTS))}
    orphans = [key for key in raw if key not in owned and key.rsplit(".", 1)[-1] in _PARTS]
    problems += [f"{key}: a 4-bit statistic without its {key.rsplit('.', 1)[0]}{STATE_SUFFIX}nf4 entry" for key in orphans]
    if problems:
        raise ValueError("The 4-bit tensors of this checkpoint do not fit together: " + "; ".join(problems) + ". "
                         "Re-save the checkpoint from the quantized model (model.save_pretrained), or load the float "
                         "checkpoint with quantize='nf4'.")
    rest = {key: value for key, value in raw.items() if key not in owned}
    return rest, {weight: _nf4_tensor(raw, weight, state) for weight, state in groups.items()}


def _read_state(blob: Any, group: _Problems) -> dict[str, Any] | None:
    try:
        state = json.loads(np.asarray(blob, np.uint8).tobytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        group.add(f"its quant_state is not JSON ({err})")
        return None
    if not isinstance(state, dict):
        group.add("its quant_state is not a JSON object")
        return None
    return state


def _checked_state(state: dict[str, Any], double: bool, group: _Problems) -> bool:
    """Checks the JSON fields; True when the shape, block size and dtype are usable for the array checks."""
    if state.get("quant_type") != "nf4":
        group.add(f"quant_type is {state.get('quant_type')!r}; lora_jax reads NF4 only (bnb_4bit_quant_type='nf4')")
    shape = state.get("shape")
    usable = True
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape)):
        group.add(f"quant_state shape is {shape!r}, expected [out, in] of a Linear4bit weight")
        usable = False
    if state.get("blocksize") not in BLOCK_SIZES:
        group.add(f"blocksize {state.get('blocksize')!r} is not one bitsandbytes accepts {BLOCK_SIZES}")
        usable = False
    if state.get("dtype") not in _DTYPES:
        group.add(f"dtype {state.get('dtype')!r} is not one of {sorted(_DTYPES)}")
    if double:
        if state.get("nested_blocksize") != NESTED_BLOCK_SIZE:
            group.add(f"nested_blocksize is {state.get('nested_blocksize')!r}, expected {NESTED_BLOCK_SIZE}")
        if state.get("nested_dtype") != "float32":
            group.add(f"nested_dtype is {state.get('nested_dtype')!r}, expected 'float32'")
        offset = state.get("nested_offset")
        if not (isinstance(offset, (int, float)) and math.isfinite(offset)):
            group.add(f"nested_offset is {offset!r}, expected a finite number")
    return usable


def _check_array(raw: Mapping[str, Any], key: str, shape: tuple[int, ...], dtype: Any, why: str, group: _Problems,
                 equal_to: np.ndarray | None = None) -> None:
    part = key.split(".weight", 1)[-1].lstrip(".") or "codes"
    value = raw[key]
    if np.dtype(value.dtype) != np.dtype(dtype):
        group.add(f"{part} is {np.dtype(value.dtype).name}, expected {np.dtype(dtype).name}")
    elif tuple(value.shape) != shape:
        group.add(f"{part} has shape {tuple(value.shape)}, expected {shape} ({why})")
    elif equal_to is not None and not np.array_equal(np.asarray(value), equal_to):
        group.add(f"{part} differs from {why}")
    elif equal_to is None and np.issubdtype(value.dtype, np.floating) and not (
            np.all(np.isfinite(value)) and np.all(np.asarray(value) >= 0)):
        group.add(f"{part} holds negative or non-finite values; block absmax values are finite and >= 0")


def _checked_group(raw: Mapping[str, Any], weight: str, state_key: str, group: _Problems) -> dict[str, Any] | None:
    missing = [f"{weight}.{p}" for p in ("absmax", "quant_map") if f"{weight}.{p}" not in raw]
    missing += [] if weight in raw else [weight]
    double = f"{weight}.nested_absmax" in raw or f"{weight}.nested_quant_map" in raw
    if double:
        missing += [f"{weight}.{p}" for p in ("nested_absmax", "nested_quant_map") if f"{weight}.{p}" not in raw]
    if not state_key.endswith("nf4"):
        group.add(f"{state_key.rsplit('__', 1)[-1]} quantization; lora_jax reads NF4 only (bnb_4bit_quant_type='nf4')")
    if missing:
        group.add("missing " + ", ".join(missing))
        return None
    state = _read_state(raw[state_key], group)
    if state is None or not _checked_state(state, double, group):
        return None
    n = math.prod(state["shape"])
    blocks = -(n // -state["blocksize"])
    nested = -(blocks // -NESTED_BLOCK_SIZE)
    codes = raw[weight]
    if np.dtype(codes.dtype) != np.uint8:
        group.add(f"codes are {np.dtype(codes.dtype).name}, expected uint8 (two NF4 codes per byte)")
    elif codes.size != -(n // -2) or codes.ndim > 2 or (codes.ndim == 2 and codes.shape[1] != 1):
        group.add(f"codes have shape {tuple(codes.shape)}, expected ({-(n // -2)}, 1): two per byte of the "
                  f"{n} values of shape {tuple(state['shape'])}")
    _check_array(raw, f"{weight}.quant_map", (16,), np.float32, "the NF4 table", group, NF4_VALUES)
    _check_array(raw, f"{weight}.absmax", (blocks,), np.uint8 if double else np.float32,
                 f"one per block of {state['blocksize']} of {n} values", group)
    if double:
        _check_array(raw, f"{weight}.nested_absmax", (nested,), np.float32,
                     f"one per {NESTED_BLOCK_SIZE} of the {blocks} blocks", group)
        _check_array(raw, f"{weight}.nested_quant_map", (256,), np.float32, "bitsandbytes' 8-bit dynamic map",
                     group, dynamic_map())
    return state


def _nf4_tensor(raw: Mapping[str, Any], weight: str, state: dict[str, Any]) -> NF4Tensor:
    double = f"{weight}.nested_absmax" in raw
    return NF4Tensor(
        codes=jnp.asarray(np.asarray(raw[weight]).reshape(-1)),
        absmax=jnp.asarray(raw[f"{weight}.absmax"]),
        nested_absmax=jnp.asarray(raw[f"{weight}.nested_absmax"]) if double else None,
        offset=jnp.asarray(np.float32(state["nested_offset"])) if double else None,
        shape=tuple(state["shape"]), dtype=_DTYPES[state["dtype"]], block_size=state["blocksize"])
