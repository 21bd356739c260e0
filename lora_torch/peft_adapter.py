"""PEFT's adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module>.lora_A.weight`` holding ``A.T`` (r, in) and
``...lora_B.weight`` holding ``B.T`` (out, r), float32, exactly what ``peft`` writes and reads; a DoRA
module adds ``...lora_magnitude_vector`` (out,), and an embedding stores ``...lora_embedding_A`` (``A.T``,
(r, num_embeddings)) and ``...lora_embedding_B`` (``B.T``, (dim, r)) instead. The keys come from
``lora_format.peft_keys``, shared with lora_jax.

Saving and reading go through ``lora_format.adapter_dir``: a save replaces the whole directory in
one atomic step, a read takes both files from one save, and the weights' metadata records the
sha256 of the config they were saved with, so a config and weights from different saves are refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lora_format.adapter_dir import (
    CONFIG_NAME,
    PICKLED_WEIGHTS_NAME,
    WEIGHTS_NAME,
    AdapterFiles,
    encode_config,
    named_adapter_subdir,
    read_adapter_files,
    read_named_adapter_files,
    save_adapter_dir,
    weights_metadata,
)
from lora_format.peft_keys import EMBEDDING_A, EMBEDDING_B, KEY_PREFIX, LORA_A, LORA_B, LORA_MAGNITUDE, module_key
from lora_torch.dora import DoRAWrapper
from lora_torch.embedding import EmbeddingLoRALayer, EmbeddingWithLoRA
from lora_torch.inject import (
    adapter_layers,
    add_adapter,
    check_wrappable,
    find_target_modules,
    list_adapters,
    lora_wrappers,
)
from lora_torch.layers import LoRALayer, LoRAWrapper, check_adapter_name, lora_scaling
from lora_torch.lora_weights import check_tensors_fit
from lora_torch.peft_config import AdapterSpec, build_adapter_config, parse_adapter_config
from lora_torch.tensor_files import parse_json, tensors_from_bytes

__all__ = ["CONFIG_NAME", "KEY_PREFIX", "PICKLED_WEIGHTS_NAME", "WEIGHTS_NAME", "load_adapter", "peft_keys",
           "peft_state_dict", "save_adapter"]


def peft_keys(module_name: str) -> tuple[str, str]:
    """Returns the PEFT tensor keys of a linear module's A and B (``lora_format.peft_keys.module_key``).

    >>> peft_keys("transformer.h.0.attn.c_attn")[1]
    'base_model.model.transformer.h.0.attn.c_attn.lora_B.weight'
    """
    return module_key(module_name, LORA_A), module_key(module_name, LORA_B)


def _ab_parts(module: nn.Module) -> tuple[str, str]:
    """The PEFT parts that hold A and B for this module or branch (embeddings have their own)."""
    embedding = (nn.Embedding, EmbeddingWithLoRA, EmbeddingLoRALayer)
    return (EMBEDDING_A, EMBEDDING_B) if isinstance(module, embedding) else (LORA_A, LORA_B)


def _peft_tensors(layer: LoRALayer) -> dict[str, torch.Tensor]:
    """A branch's tensors by PEFT part, in PEFT's layout (live parameters, not copies)."""
    part_a, part_b = _ab_parts(layer)
    parts = {part_a: layer.lora_A.T, part_b: layer.lora_B.T}
    if layer.use_dora:
        parts[LORA_MAGNITUDE] = layer.magnitude
    return parts


def peft_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Returns one adapter's tensors under PEFT keys and layouts (A.T, B.T, DoRA's m), as float32.

    Args:
        model: a model with LoRA injected.
        adapter_name: the adapter; default the one active adapter (the only one after ``inject_lora``).
    """
    return {module_key(name, part): tensor.detach().float()
            for name, layer in adapter_layers(model, adapter_name).items()
            for part, tensor in _peft_tensors(layer).items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 selected_adapters: Sequence[str] | None = None) -> Path:
    """Writes the model's adapters as a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads.

    Several adapters are laid out as PEFT's ``save_pretrained`` lays them out: the adapter named
    ``"default"`` at the root, every other one in a subdirectory named after it (load those into
    PEFT with ``load_adapter(directory / name, adapter_name=name)``). A model with the one adapter
    ``inject_lora`` made writes the two files at the root, as before.

    The whole directory is replaced in one atomic step (``lora_format.adapter_dir.save_adapter_dir``):
    a crash or a concurrent save leaves the previous adapters or these, never a mix, and each
    adapter's weights record the sha256 of their config, which ``load_adapter`` checks.

    Args:
        model: a model with LoRA injected (per adapter, one dropout/use_rslora/use_dora for all modules; ranks
            and alphas may differ per module, and are written as ``rank_pattern`` / ``alpha_pattern``).
        directory: destination directory (created if needed). It may hold a previous save and a
            ``README.md`` (kept); anything else is refused, since the directory is replaced whole.
        base_model_name_or_path: recorded in each config, e.g. ``"gpt2"`` or a checkpoint directory.
        selected_adapters: the adapters to save (PEFT's argument); default all of them.

    Returns:
        The directory path.

    Raises:
        ValueError: no LoRA, an unknown adapter, modules with different settings within one adapter, or
            ``directory`` holds other files.
    """
    available = list_adapters(model)
    if not available:
        raise ValueError(f"{type(model).__name__} has no LoRA modules; call inject_lora(model, ...) first.")
    names = available if selected_adapters is None else list(dict.fromkeys(selected_adapters))
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise ValueError(f"save_adapter: selected_adapters={selected_adapters!r} names no adapter or unknown ones "
                         f"{unknown}; the model's adapters are {available}.")
    payload = {}
    for name in names:
        config_bytes = encode_config(build_adapter_config(model, base_model_name_or_path, adapter_name=name))
        tensors = {key: t.to("cpu").contiguous() for key, t in peft_state_dict(model, name).items()}
        payload[name] = config_bytes, tensors

    def write_files(new: Path) -> None:
        for name, (config_bytes, tensors) in payload.items():
            target = named_adapter_subdir(new, name)
            target.mkdir(exist_ok=True)
            save_file(tensors, str(target / WEIGHTS_NAME), metadata=weights_metadata(config_bytes))
            (target / CONFIG_NAME).write_bytes(config_bytes)

    return save_adapter_dir(directory, write_files)


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, (LoRAWrapper, nn.Linear)):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D stores (in, out), nn.Embedding (num_embeddings, dim)


def _same_rank_and_scaling(name: str, layer: LoRALayer, spec: AdapterSpec) -> bool:
    rank, alpha = spec.module_rank_alpha(name)
    return layer.rank == rank and layer.scaling == lora_scaling(rank, alpha, spec.use_rslora)


def _check_compatible(model: nn.Module, existing: dict[str, LoRALayer], spec: AdapterSpec, source: str,
                      adapter_name: str) -> None:
    """Raises unless the model's adapter ``adapter_name`` (``existing``) is exactly the one ``spec`` describes."""
    selected = [name for name, _ in find_target_modules(model, spec.target_modules, spec.layers_to_transform,
                                                         spec.layers_pattern)]
    same_modules = sorted(selected) == sorted(existing)
    same_settings = all(_same_rank_and_scaling(name, layer, spec) and layer.use_dora == spec.use_dora
                        for name, layer in existing.items())
    if not (same_modules and same_settings):
        raise ValueError(f"{source} does not match the LoRA already in the model as adapter {adapter_name!r} "
                         f"(modules {sorted(existing)[:3]}..., rank/scaling of each, DoRA or not; the file has "
                         f"use_dora={spec.use_dora}); load it into the plain base model instead, load it under "
                         "another adapter_name, or merge first.")


def _expected_shapes(modules: dict[str, nn.Module], spec: AdapterSpec) -> dict[str, torch.Tensor]:
    # Meta tensors carry only shapes, so checking costs no memory. Each module has its own rank.
    expected = {}
    for name, module in modules.items():
        in_features, out_features = _in_out(module)
        rank, _ = spec.module_rank_alpha(name)
        part_a, part_b = _ab_parts(module)
        expected[module_key(name, part_a)] = torch.empty(rank, in_features, device="meta")
        expected[module_key(name, part_b)] = torch.empty(out_features, rank, device="meta")
        if spec.use_dora:
            expected[module_key(name, LORA_MAGNITUDE)] = torch.empty(out_features, device="meta")
    return expected


@dataclass(frozen=True)
class _LoadPlan:
    """One adapter of a load, checked: where it goes and what it holds."""

    adapter_name: str
    spec: AdapterSpec
    tensors: dict[str, torch.Tensor]
    overwrite: bool  # the model has this adapter already: only its weights are written


def _plan(model: nn.Module, adapter_name: str, files: AdapterFiles, kinds: dict[str, bool],
          allow_nonfinite: bool) -> _LoadPlan:
    """Checks one adapter against the model (and the adapters planned before it, ``kinds``: module -> DoRA)."""
    directory = files.directory
    spec = parse_adapter_config(parse_json(files.config, str(directory / CONFIG_NAME)), str(directory / CONFIG_NAME))
    source = str(directory / files.weights_name)
    tensors = tensors_from_bytes(files.weights, files.weights_name, source)
    check_adapter_name(adapter_name)
    existing = {name: wrapper.adapters[adapter_name] for name, wrapper in lora_wrappers(model).items()
                if adapter_name in wrapper.adapters}
    if existing:
        _check_compatible(model, existing, spec, source, adapter_name)
        modules = {name: model.get_submodule(name) for name in existing}
    else:
        matched = find_target_modules(model, spec.target_modules, spec.layers_to_transform, spec.layers_pattern)
        check_wrappable(matched, use_dora=spec.use_dora, adapter_name=adapter_name)
        clash = sorted(name for name, _ in matched if kinds.get(name, spec.use_dora) != spec.use_dora)
        if clash:
            raise ValueError(f"{source}: adapter {adapter_name!r} (use_dora={spec.use_dora}) targets {clash}, which "
                             "another adapter of this load adapts with the other kind; a module holds adapters of "
                             "one kind here. Load them into separate models.")
        modules = dict(matched)
        kinds.update(dict.fromkeys(modules, spec.use_dora))
    check_tensors_fit(_expected_shapes(modules, spec), tensors, source, allow_nonfinite=allow_nonfinite)
    return _LoadPlan(adapter_name, spec, tensors, bool(existing))


def _read_all(directory: str | os.PathLike) -> dict[str, AdapterFiles]:
    """Every adapter of ``directory`` (``read_named_adapter_files``), with the root's own error when it is broken."""
    try:
        return read_named_adapter_files(directory)
    except FileNotFoundError:
        # read_named_adapter_files reports a root adapter that lacks its weights as a missing directory;
        # reading the root alone names the missing file. If the root reads fine, the first error stands.
        if Path(directory, CONFIG_NAME).is_file():
            read_adapter_files(directory)
        raise


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, adapter_name: str | None = None,
                 allow_nonfinite: bool = False) -> nn.Module:
    """Loads a PEFT LoRA adapter directory into ``model``, or every adapter of a multi-adapter one; returns ``model``.

    Without ``adapter_name`` every adapter of the directory is loaded, laid out as PEFT's
    ``save_pretrained`` lays them out: the root holds ``"default"``, each subdirectory with an
    ``adapter_config.json`` the adapter of its name. With ``adapter_name`` the directory holds one
    adapter (at its root), loaded under that name (PEFT's ``load_adapter(path, adapter_name)``).

    An adapter the model does not have yet is added as its config says (``add_adapter``: each module
    at the rank and alpha ``rank_pattern`` / ``alpha_pattern`` give it, DoRA wrappers for ``use_dora``).
    The model's first adapter is active; later ones wait for ``set_adapter``. An adapter the model has
    already (same name) must be exactly that LoRA (same modules, each module's rank and scaling, DoRA
    or not), and has its weights overwritten. All files are read from one save even if another save
    replaces the directory meanwhile. Every config, the config digest the weights record (if any),
    every tensor name, shape, dtype and value are checked, for every adapter, before the model is
    touched, so any error leaves it unchanged.

    Args:
        model: the base model the adapters were trained on (e.g. ``GPT2LMHeadModel.from_pretrained``).
        directory: a directory with ``adapter_config.json`` and ``adapter_model.safetensors`` (and, for a
            multi-adapter save, subdirectories holding the same).
        adapter_name: load the directory's one (root) adapter under this name.
        allow_nonfinite: accept NaN and inf tensor values instead of refusing the adapter.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: bad or unsupported config, config and weights from different saves, truncated
            file, missing/unknown keys, wrong shapes (e.g. an adapter for a different base model),
            non-float tensors, NaN/inf values, incompatible existing LoRA, or an adapter name torch cannot use.
        TypeError: the config targets modules that are not ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding``.
    """
    if adapter_name is None:
        found = _read_all(directory)
    else:
        found = {check_adapter_name(adapter_name): read_adapter_files(directory)}
    kinds: dict[str, bool] = {name: isinstance(w, DoRAWrapper) for name, w in lora_wrappers(model).items()}
    plans = [_plan(model, name, files, kinds, allow_nonfinite) for name, files in found.items()]
    for plan in plans:
        spec = plan.spec
        if not plan.overwrite:
            add_adapter(model, plan.adapter_name, spec.target_modules, spec.rank, spec.lora_alpha, dropout=spec.dropout,
                        use_rslora=spec.use_rslora, use_dora=spec.use_dora, layers_to_transform=spec.layers_to_transform,
                        layers_pattern=spec.layers_pattern, rank_pattern=spec.rank_pattern,
                        alpha_pattern=spec.alpha_pattern, verbose=False)
        with torch.no_grad():
            for name, layer in adapter_layers(model, plan.adapter_name).items():
                for part, destination in _peft_tensors(layer).items():
                    destination.copy_(plan.tensors[module_key(name, part)])  # a transposed view writes through
    return model
