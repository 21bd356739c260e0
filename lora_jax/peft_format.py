"""PEFT's adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

The directory loads in ``peft.PeftModel.from_pretrained`` and gives the same logits, and
adapters saved by PEFT load here. Layout (shared/DESIGN.md):

- key ``base_model.model.<dotted name>.lora_A.weight`` holds ``A.T``, shape (r, in);
  ``...lora_B.weight`` holds ``B.T``, shape (out, r); a DoRA adapter adds ``...lora_magnitude_vector``
  (out,); float32 (``lora_format.peft_keys``).
- the config carries ``peft_type: "LORA"``, ``r``, ``lora_alpha``, ``target_modules``,
  ``use_rslora``, ``layers_to_transform``, ``fan_in_fan_out``, ``rank_pattern``, ``alpha_pattern``
  and PEFT's other LoRA keys. Each module's tensors have its own rank (``rank_pattern``'s first
  match, else ``r``); the file stores pattern keys sorted, as PEFT's does, so ``save_adapter``
  refuses patterns whose meaning depends on their order.

Saving replaces the whole directory in one atomic step (``lora_format.adapter_dir``): a crash or
a concurrent save leaves the previous adapter or the new one, never a mix, and the weights record
the sha256 of their config, which loading checks. Loading reads both files from one save, then
validates every key, shape, dtype, value and config field against the params before it returns
anything.

Example:
    >>> import tempfile, numpy as np
    >>> from lora_jax.adapter import Adapter
    >>> from lora_jax.config import LoraConfig
    >>> params = {"h": {"0": {"attn": {"kernel": np.zeros((4, 6), np.float32)}}}}
    >>> weights = {"h": {"0": {"attn": {"lora_A": np.ones((4, 2), np.float32), "lora_B": np.ones((2, 6), np.float32)}}}}
    >>> adapter = Adapter(weights, LoraConfig(rank=2, target_modules=["attn"]))
    >>> out = tempfile.mkdtemp()
    >>> save_adapter(out, adapter)
    >>> sorted(peft_state_dict(adapter))
    ['base_model.model.h.0.attn.lora_A.weight', 'base_model.model.h.0.attn.lora_B.weight']
    >>> loaded = load_adapter(out, params)
    >>> loaded.weights["h"]["0"]["attn"]["lora_B"].shape, loaded.config.rank, loaded.config.target_modules
    ((2, 6), 2, ('attn',))
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import safetensors.flax
import safetensors.numpy

from lora_format.adapter_dir import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    encode_config,
    named_adapter_subdir,
    read_adapter_files,
    read_named_adapter_files,
    safetensors_header,
    save_adapter_dir,
    weights_metadata,
)
from lora_format.all_linear import is_all_linear
from lora_format.json_files import parse_json_object
from lora_format import peft_keys
from lora_format.patterns import check_survives_sorting
from lora_format.peft_fields import read_adapter_config
from lora_jax.adapter import Adapter, checked_modules
from lora_jax.adapter_set import AdapterSet
from lora_jax.config import INIT_OPTIONS, LoraConfig
from lora_jax.initialize import factor_shapes
from lora_jax.lora_tree import EMBEDDING_A, EMBEDDING_B, LORA_A, LORA_B, LORA_MAGNITUDE, ModulePath, get_module, nest
from lora_jax.targets import dotted_name, is_embedding

CONFIG_FILE = CONFIG_NAME
WEIGHTS_FILE = WEIGHTS_NAME
KEY_PREFIX = peft_keys.KEY_PREFIX
# This project's leaf name -> PEFT's key part (lora_format.peft_keys).
_PARTS = {LORA_A: peft_keys.LORA_A, LORA_B: peft_keys.LORA_B, LORA_MAGNITUDE: peft_keys.LORA_MAGNITUDE,
          EMBEDDING_A: peft_keys.EMBEDDING_A, EMBEDDING_B: peft_keys.EMBEDDING_B}
_LEAVES = {part: leaf for leaf, part in _PARTS.items()}


def peft_key(path: ModulePath, which: str) -> str:
    """``base_model.model.<dotted name>.lora_A.weight`` (``lora_B.weight``, ``lora_magnitude_vector``, ``lora_embedding_A``...).

    >>> peft_key(("transformer", "h", "0", "attn", "c_attn"), "lora_B")
    'base_model.model.transformer.h.0.attn.c_attn.lora_B.weight'
    """
    return peft_keys.module_key(dotted_name(path), _PARTS[which])


def peft_state_dict(adapter: Adapter) -> dict[str, np.ndarray]:
    """The adapter as PEFT's tensors, float32: ``A.T`` (r, in), ``B.T`` (out, r), DoRA's ``m`` (out,), and an
    embedding's ``lora_embedding_A`` (r, num_embeddings) and ``lora_embedding_B`` (features, r)."""
    tensors = {}
    for path in checked_modules(adapter):
        for leaf, value in get_module(adapter.weights, path).items():
            array = np.asarray(value, np.float32)
            tensors[peft_key(path, leaf)] = np.ascontiguousarray(array.T if array.ndim == 2 else array)
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

    >>> meta = adapter_config_dict(LoraConfig(rank=4, alpha=8, target_modules=["c_attn", "c_fc"],
    ...                                       rank_pattern={"c_fc": 6}, alpha_pattern={"c_fc": 3}))
    >>> meta["r"], meta["lora_alpha"], meta["rank_pattern"], meta["alpha_pattern"]
    (4, 8, {'c_fc': 6}, {'c_fc': 3.0})
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
        "use_dora": config.use_dora,
        "layers_to_transform": None if config.layers_to_transform is None else list(config.layers_to_transform),
        "layers_pattern": list(config.layers_pattern) if isinstance(config.layers_pattern, tuple) else config.layers_pattern,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "modules_to_save": None,
        "init_lora_weights": config.init_lora_weights,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
    }


def save_adapter(
    out_dir: str | os.PathLike,
    adapter: Adapter,
    *,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = True,
) -> None:
    """Writes a PEFT adapter directory for ``adapter``, replacing any previous one in one atomic step.

    Args:
        out_dir: The adapter directory (created if missing). An existing one must hold only an
            adapter (PEFT's README.md is kept); it is replaced whole.
        adapter: The ``Adapter``; its config is what ``adapter_config.json`` records.
        base_model_name_or_path: Recorded for PEFT (e.g. ``"gpt2"`` or a checkpoint path).
        fan_in_fan_out: See ``adapter_config_dict``.

    Raises:
        TypeError: ``adapter`` is not an ``Adapter``.
        ValueError: The adapter is empty, its shapes disagree with its ranks, its rank/alpha patterns
            overlap so that their order matters (the file stores them sorted, see
            ``lora_format.patterns.check_survives_sorting``), or ``out_dir`` holds files that are not an
            adapter's. Raised before anything is written.
    """
    write = _adapter_writer(adapter, base_model_name_or_path, fan_in_fan_out)
    save_adapter_dir(out_dir, write)


def _adapter_writer(adapter: Adapter, base_model_name_or_path: str | None, fan_in_fan_out: bool
                    ) -> Callable[[Path], None]:
    """Checks ``adapter`` and encodes its files; returns ``write(directory)``, which writes them there."""
    tensors = peft_state_dict(adapter)
    if not tensors:
        raise ValueError("The adapter has no LoRA modules; there is nothing to save.")
    config = adapter.config
    check_survives_sorting([dotted_name(path) for path in adapter.modules()], config.rank, config.alpha,
                           config.rank_pattern, config.alpha_pattern)
    meta = adapter_config_dict(
        adapter.config, base_model_name_or_path=base_model_name_or_path, fan_in_fan_out=fan_in_fan_out
    )
    if is_all_linear(config.target_modules):  # as PEFT 0.21 saves it: the full names it expanded to
        meta["target_modules"] = sorted(dotted_name(path) for path in adapter.modules())
    config_bytes = encode_config(meta)

    def write_files(new: Path) -> None:
        new.mkdir(exist_ok=True)
        # PEFT itself writes {"format": "pt"}; the config digest ties these weights to their config.
        safetensors.numpy.save_file(tensors, str(new / WEIGHTS_FILE), metadata=weights_metadata(config_bytes))
        (new / CONFIG_FILE).write_bytes(config_bytes)

    return write_files


def save_adapters(
    out_dir: str | os.PathLike,
    adapters: AdapterSet,
    *,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = True,
) -> None:
    """Writes every adapter of ``adapters`` in PEFT's multi-adapter layout, replacing ``out_dir`` whole, atomically.

    As ``PeftModel.save_pretrained``: the adapter named ``"default"`` at the root of ``out_dir``, every
    other one in the subdirectory ``out_dir/<name>``. ``load_adapters`` (or PEFT's
    ``from_pretrained`` + ``load_adapter(out_dir/<name>, name)``) reads it back.

    Raises:
        ValueError: As ``save_adapter`` for any adapter, or a name that cannot be a directory name.
            Every adapter is checked and encoded before anything is written.
    """
    writers = {named_adapter_subdir(Path("."), name): _adapter_writer(adapter, base_model_name_or_path,
                                                                      fan_in_fan_out)
               for name, adapter in adapters.adapters.items()}
    if not writers:
        raise ValueError("The AdapterSet is empty; there is nothing to save.")

    def write_all(new: Path) -> None:
        for relative, write in writers.items():
            write(new / relative)

    save_adapter_dir(out_dir, write_all)


def config_from_adapter_dict(meta: Mapping[str, Any], source: str = CONFIG_FILE) -> LoraConfig:
    """Reads a ``LoraConfig`` from ``adapter_config.json`` content.

    The rules are ``lora_format.peft_fields``'s, the same table lora_torch reads with.

    Args:
        meta: The parsed JSON.
        source: The file it came from, named in every message.

    Raises:
        ValueError: It is not a LoRA adapter, ``r``, ``lora_alpha`` or ``target_modules`` is missing
            or invalid, or it uses a PEFT feature this library does not implement (DoRA,
            modules_to_save, bias training...).
    """
    fields = read_adapter_config(meta, source)
    try:
        return LoraConfig(
            rank=fields.rank,
            alpha=fields.alpha,
            target_modules=fields.target_modules,
            dropout=fields.dropout,
            use_rslora=fields.use_rslora,
            layers_to_transform=fields.layers_to_transform,
            layers_pattern=fields.layers_pattern,
            rank_pattern=fields.rank_pattern,
            alpha_pattern=fields.alpha_pattern,
            use_dora=fields.use_dora,
            init_lora_weights=_init_option(fields.raw.get("init_lora_weights", True)),
        )
    except (TypeError, ValueError) as err:  # a rule LoraConfig has and the shared table lacks
        raise ValueError(f"{source}: {err}") from err


def _init_option(value: Any) -> bool | str:
    # Only a fresh adapter's init reads it; an init PEFT accepts but lora_jax lacks (orthogonal, eva, mica) only
    # shaped the initial weights, which the file's weights replace.
    return value if any(type(value) is type(o) and value == o for o in INIT_OPTIONS) else True


# safetensors dtype codes of the float types an adapter may hold; an integer or bool tensor is not
# a LoRA weight (casting int32 ids to float would give values like 1e9).
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _read_header(data: bytes, file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from the safetensors header alone; non-float tensors are refused."""
    header = safetensors_header(data, str(file))
    try:
        entries = {key: (str(info["dtype"]), tuple(int(d) for d in info["shape"]))
                   for key, info in header.items() if key != "__metadata__"}
    except Exception as err:  # a malformed entry can fail in many ways; all mean the same to the user
        raise ValueError(f"{file} is not a readable safetensors file ({err!r}); it may be truncated.") from None
    not_float = sorted(f"{key} ({dtype})" for key, (dtype, _) in entries.items() if dtype not in FLOAT_DTYPES)
    if not_float:
        raise ValueError(
            f"{file} holds non-float tensors: {not_float[:4]}. LoRA weights are floating point "
            f"({', '.join(FLOAT_DTYPES)}); the file is not a LoRA adapter or was written wrongly."
        )
    return {key: shape for key, (_, shape) in entries.items()}


def check_finite(tensors: Mapping[str, Any], source: str) -> None:
    """Raises when a tensor holds NaN or infinity, naming each such tensor and how many values.

    >>> check_finite({"a": np.array([1.0, np.nan, np.inf])}, "adapter")
    Traceback (most recent call last):
    ...
    ValueError: adapter holds non-finite values: a (2 of 3). A diverged training run saves such weights; retrain or load an earlier adapter (allow_nonfinite=True loads it anyway).
    """
    bad = []
    for key, tensor in tensors.items():
        count = int(np.size(tensor) - np.count_nonzero(np.isfinite(np.asarray(tensor, np.float32))))
        if count:
            bad.append(f"{key} ({count} of {np.size(tensor)})")
    if bad:
        raise ValueError(
            f"{source} holds non-finite values: {', '.join(bad[:4])}. A diverged training run saves such "
            "weights; retrain or load an earlier adapter (allow_nonfinite=True loads it anyway)."
        )


def _module_of(key: str) -> tuple[ModulePath, str]:
    name, part = peft_keys.split_key(key)  # every key was checked against the expected ones
    return tuple(name.split(".")), _LEAVES[part]


def _check_keys_and_shapes(shapes: Mapping[str, tuple[int, ...]], params: Mapping[str, Any], config: LoraConfig) -> None:
    expected = {}
    for path, (fan_in, fan_out, rank) in factor_shapes(params, config).items():  # each module at its own rank
        leaf_a, leaf_b = (EMBEDDING_A, EMBEDDING_B) if is_embedding(get_module(params, path)) else (LORA_A, LORA_B)
        expected[peft_key(path, leaf_a)] = (rank, fan_in)
        expected[peft_key(path, leaf_b)] = (fan_out, rank)
        if config.use_dora:
            expected[peft_key(path, LORA_MAGNITUDE)] = (fan_out,)
    unexpected = sorted(set(shapes) - set(expected))
    missing = sorted(set(expected) - set(shapes))
    if unexpected or missing:
        raise ValueError(
            f"adapter tensors do not match these params under its own config: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}. The adapter was made for a different model or is incomplete."
        )
    wrong = [f"{key}: file {shapes[key]}, model needs {want}" for key, want in expected.items() if shapes[key] != want]
    if wrong:
        raise ValueError(f"adapter tensor shapes do not fit these params: {wrong[:6]}. Wrong base model, or a "
                         "config whose r / rank_pattern is not the one the tensors were saved with?")


def load_adapter(adapter_dir: str | os.PathLike, params: Mapping[str, Any], *, allow_nonfinite: bool = False) -> Adapter:
    """Reads a PEFT adapter directory into an ``Adapter`` for ``params``.

    Args:
        adapter_dir: A directory written by ``save_adapter``, ``lora_torch`` or PEFT's ``save_pretrained``.
        params: The base params it adapts (only kernel shapes are read).
        allow_nonfinite: Load tensors holding NaN or infinity instead of refusing them.

    Returns:
        An ``Adapter`` with float32 ``lora_A`` (in, r) and ``lora_B`` (r, out) arrays and the config read from the file.

    Raises:
        FileNotFoundError: A file is missing.
        ValueError: A file is damaged, a tensor is missing or extra, not floating point, holds
            NaN or infinity, a shape does not fit ``params``, or the config uses an unsupported
            PEFT feature. Names, shapes, dtypes and the config are checked before any tensor is read.
    """
    return _adapter_from_files(read_adapter_files(adapter_dir), params, allow_nonfinite)


def load_adapters(adapter_dir: str | os.PathLike, params: Mapping[str, Any], *, allow_nonfinite: bool = False
                  ) -> AdapterSet:
    """Reads every adapter of a directory in PEFT's multi-adapter layout, all from one save, into an ``AdapterSet``.

    The root adapter (if any) is named ``"default"``, each subdirectory's by the subdirectory; all are
    validated against ``params`` before the set is returned. The first one is active.

    Raises:
        FileNotFoundError, ValueError: As ``load_adapter``, for any of the adapters.
    """
    found = read_named_adapter_files(adapter_dir)
    return AdapterSet({name: _adapter_from_files(files, params, allow_nonfinite) for name, files in found.items()})


def _adapter_from_files(files: Any, params: Mapping[str, Any], allow_nonfinite: bool) -> Adapter:
    directory = files.directory
    weights_file = directory / files.weights_name
    if files.weights_name != WEIGHTS_FILE:
        raise ValueError(
            f"{weights_file} is a pickle; lora_jax never unpickles. Convert it to {WEIGHTS_FILE} with PEFT "
            "(load it and save_pretrained(..., safe_serialization=True)), or load it with lora_torch."
        )
    config_file = str(directory / CONFIG_FILE)
    config = config_from_adapter_dict(parse_json_object(files.config, config_file), config_file)
    shapes = _read_header(files.weights, weights_file)
    _check_keys_and_shapes(shapes, params, config)
    try:
        # The flax framework reads bf16/fp16 adapters too (numpy has no bfloat16).
        tensors = safetensors.flax.load(files.weights)
    except Exception as err:
        raise ValueError(f"{weights_file} could not be read ({err}); it may be truncated.") from None
    if not allow_nonfinite:
        check_finite(tensors, str(weights_file))
    entries: dict[ModulePath, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        path, which = _module_of(key)
        array = jnp.asarray(tensor, jnp.float32)
        entries.setdefault(path, {})[which] = array.T if array.ndim == 2 else array
    return Adapter(nest(dict(sorted(entries.items()))), config)
