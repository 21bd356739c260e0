"""PEFT's adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

The directory loads in ``peft.PeftModel.from_pretrained`` and gives the same logits, and
adapters saved by PEFT load here. Layout (shared/DESIGN.md):

- key ``base_model.model.<dotted name>.lora_A.weight`` holds ``A.T``, shape (r, in);
  ``...lora_B.weight`` holds ``B.T``, shape (out, r); float32.
- the config carries ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
  ``use_rslora``, ``layers_to_transform``, ``fan_in_fan_out`` and PEFT's other LoRA keys.

Saving writes each file to a temporary name in the same directory and ``os.replace``s it, so
a crash never leaves a half-written file. Loading validates every key, shape and config field
against the params before it returns anything.

Example:
    >>> import tempfile, numpy as np
    >>> from lora_jax.config import LoraConfig
    >>> params = {"h": {"0": {"attn": {"kernel": np.zeros((4, 6), np.float32)}}}}
    >>> lora = {"h": {"0": {"attn": {"lora_A": np.ones((4, 2), np.float32), "lora_B": np.ones((2, 6), np.float32)}}}}
    >>> out = tempfile.mkdtemp()
    >>> save_adapter(out, lora, LoraConfig(rank=2, target_modules=["attn"]))
    >>> sorted(peft_state_dict(lora))
    ['base_model.model.h.0.attn.lora_A.weight', 'base_model.model.h.0.attn.lora_B.weight']
    >>> lora2, config = load_adapter(out, params)
    >>> lora2["h"]["0"]["attn"]["lora_B"].shape, config.rank, config.target_modules
    ((2, 6), 2, ('attn',))
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from lora_jax.atomic_files import atomic_write, atomic_write_text
from lora_jax.config import LoraConfig
from lora_jax.lora_tree import LORA_A, LORA_B, ModulePath, lora_modules, nest
from lora_jax.targets import dotted_name, target_kernel_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_SUFFIXES = {LORA_A: ".lora_A.weight", LORA_B: ".lora_B.weight"}

# PEFT config fields that would change the math; this module supports their neutral values only.
_NEUTRAL_FIELDS = {
    "use_dora": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "bias": ("none", None),
    "exclude_modules": (None, [], ""),
    "target_parameters": (None, []),
    "lora_bias": (False, None),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "use_qalora": (False, None),
    "use_bdlora": (False, None),
    "alora_invocation_tokens": (None, []),
    "kasa_config": (None, {}),
    "monteclora_config": (None, {}),
}


def peft_key(path: ModulePath, which: str) -> str:
    """``base_model.model.<dotted name>.lora_A.weight`` (or ``lora_B``).

    >>> peft_key(("transformer", "h", "0", "attn", "c_attn"), "lora_B")
    'base_model.model.transformer.h.0.attn.c_attn.lora_B.weight'
    """
    return KEY_PREFIX + dotted_name(path) + _SUFFIXES[which]


def peft_state_dict(lora: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The LoRA tree as PEFT's tensors: ``A.T`` (r, in) and ``B.T`` (out, r), float32, contiguous."""
    tensors = {}
    for path, (a, b) in lora_modules(lora).items():
        tensors[peft_key(path, LORA_A)] = np.ascontiguousarray(np.asarray(a, np.float32).T)
        tensors[peft_key(path, LORA_B)] = np.ascontiguousarray(np.asarray(b, np.float32).T)
    return tensors


def adapter_config_dict(
    config: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = True,
    task_type: str = "CAUSAL_LM",
) -> dict[str, Any]:
    """The ``adapter_config.json`` content PEFT reads for ``config``.

    ``fan_in_fan_out`` is True for GPT-2 (its ``Conv1D`` stores (in, out) weights); it tells
    PEFT how to merge, and does not change the saved tensors.
    """
    targets = config.target_modules
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets if isinstance(targets, str) else list(targets),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "layers_to_transform": None if config.layers_to_transform is None else list(config.layers_to_transform),
        "layers_pattern": list(config.layers_pattern) if isinstance(config.layers_pattern, tuple) else config.layers_pattern,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
    }


def _check_lora_for_save(lora: Mapping[str, Any], config: LoraConfig) -> None:
    modules = lora_modules(lora)
    if not modules:
        raise ValueError("The LoRA tree is empty; there is nothing to save.")
    for path, (a, b) in modules.items():
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[1] != config.rank or b.shape[0] != config.rank:
            raise ValueError(
                f"LoRA module {dotted_name(path)!r} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not "
                f"have rank {config.rank}; save with the config the tree was made with."
            )


def save_adapter(
    out_dir: str | os.PathLike,
    lora: Mapping[str, Any],
    config: LoraConfig,
    *,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = True,
) -> None:
    """Writes a PEFT adapter directory for ``lora`` (created if missing; files replaced atomically).

    Args:
        out_dir: Directory to write ``adapter_config.json`` and ``adapter_model.safetensors`` in.
        lora: The LoRA tree.
        config: The config the tree was made with.
        base_model_name_or_path: Recorded for PEFT (e.g. ``"gpt2"`` or a checkpoint path).
        fan_in_fan_out: See ``adapter_config_dict``.

    Raises:
        ValueError: The tree is empty or its shapes disagree with ``config.rank``.
    """
    _check_lora_for_save(lora, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = peft_state_dict(lora)
    # PEFT itself writes {"format": "pt"}; loaders that check the metadata expect it.
    atomic_write(out / WEIGHTS_FILE, lambda temp: safetensors.numpy.save_file(tensors, temp, metadata={"format": "pt"}))
    meta = adapter_config_dict(
        config, base_model_name_or_path=base_model_name_or_path, fan_in_fan_out=fan_in_fan_out
    )
    atomic_write_text(out / CONFIG_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")


def config_from_adapter_dict(meta: Mapping[str, Any]) -> LoraConfig:
    """Reads a ``LoraConfig`` from ``adapter_config.json`` content.

    Raises:
        ValueError: It is not a LoRA adapter, or it uses a PEFT feature this library does not
            implement (DoRA, per-module ranks, modules_to_save, bias training...).
    """
    if meta.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json has peft_type {meta.get('peft_type')!r}; only 'LORA' adapters load here.")
    unsupported = [
        f"{field}={meta[field]!r}" for field, neutral in _NEUTRAL_FIELDS.items() if field in meta and meta[field] not in neutral
    ]
    if unsupported:
        raise ValueError(
            f"adapter uses PEFT features lora_jax does not implement: {', '.join(unsupported)}. "
            "Re-create the adapter as plain LoRA (one rank, no DoRA, no extra trained modules)."
        )
    if meta.get("target_modules") is None:
        raise ValueError("adapter_config.json has no target_modules; PEFT's model-type defaults are not supported.")
    return LoraConfig(
        rank=meta["r"],
        alpha=meta["lora_alpha"],
        target_modules=meta["target_modules"],
        dropout=meta.get("lora_dropout", 0.0),
        use_rslora=meta.get("use_rslora", False),
        layers_to_transform=meta.get("layers_to_transform"),
        layers_pattern=meta.get("layers_pattern"),
    )


def _read_config(directory: Path) -> LoraConfig:
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"No {CONFIG_FILE} in {directory}; is this a PEFT adapter directory?")
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); the adapter is damaged.") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(meta).__name__}.")
    return config_from_adapter_dict(meta)


def _read_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes, read from the safetensors header only."""
    if not file.is_file():
        raise FileNotFoundError(f"No {WEIGHTS_FILE} at {file}; is this a PEFT adapter directory?")
    try:
        with safetensors.safe_open(str(file), framework="numpy") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{file} is not a readable safetensors file ({err}); it may be truncated.") from None


def _module_of(key: str) -> tuple[ModulePath, str] | None:
    for which, suffix in _SUFFIXES.items():
        if key.startswith(KEY_PREFIX) and key.endswith(suffix):
            return tuple(key[len(KEY_PREFIX) : -len(suffix)].split(".")), which
    return None


def _check_keys_and_shapes(shapes: Mapping[str, tuple[int, ...]], params: Mapping[str, Any], config: LoraConfig) -> None:
    expected = {}
    for path, (fan_in, fan_out) in target_kernel_shapes(params, config).items():
        expected[peft_key(path, LORA_A)] = (config.rank, fan_in)
        expected[peft_key(path, LORA_B)] = (fan_out, config.rank)
    unexpected = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    if unexpected or missing:
        raise ValueError(
            f"adapter tensors do not match these params under its own config: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}. The adapter was made for a different model or is incomplete."
        )
    wrong = [f"{key}: file {shapes[key]}, model needs {want}" for key, want in expected.items() if shapes[key] != want]
    if wrong:
        raise ValueError(f"adapter tensor shapes do not fit these params: {wrong[:6]}. Wrong base model?")


def load_adapter(adapter_dir: str | os.PathLike, params: Mapping[str, Any]) -> tuple[dict[str, Any], LoraConfig]:
    """Reads a PEFT adapter directory into a LoRA tree for ``params``.

    Args:
        adapter_dir: A directory written by ``save_adapter``, ``lora_torch`` or PEFT's ``save_pretrained``.
        params: The base params it adapts (only kernel shapes are read).

    Returns:
        ``(lora, config)``: float32 ``lora_A`` (in, r) and ``lora_B`` (r, out) arrays, and the config.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: A file is damaged, a tensor is missing or extra, a shape does not fit
            ``params``, or the config uses an unsupported PEFT feature. Checked before any
            tensor is read.
    """
    directory = Path(adapter_dir)
    config = _read_config(directory)
    shapes = _read_header(directory / WEIGHTS_FILE)
    _check_keys_and_shapes(shapes, params, config)
    try:
        # The flax framework reads bf16/fp16 adapters too (numpy has no bfloat16).
        with safetensors.safe_open(str(directory / WEIGHTS_FILE), framework="flax") as handle:
            tensors = {key: handle.get_tensor(key) for key in shapes}
    except Exception as err:
        raise ValueError(f"{directory / WEIGHTS_FILE} could not be read ({err}); it may be truncated.") from None
    entries: dict[ModulePath, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        path, which = _module_of(key)
        entries.setdefault(path, {})[which] = jnp.asarray(tensor, jnp.float32).T
    return nest(dict(sorted(entries.items()))), config
