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
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lora_format.adapter_dir import (
    CONFIG_NAME,
    PICKLED_WEIGHTS_NAME,
    WEIGHTS_NAME,
    encode_config,
    read_adapter_files,
    save_adapter_dir,
    weights_metadata,
)
from lora_format.peft_keys import EMBEDDING_A, EMBEDDING_B, KEY_PREFIX, LORA_A, LORA_B, LORA_MAGNITUDE, module_key
from lora_torch.embedding import EmbeddingWithLoRA
from lora_torch.inject import check_wrappable, find_target_modules, inject_lora, lora_wrappers
from lora_torch.layers import LoRAWrapper, lora_scaling
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
    """The PEFT parts that hold A and B for this module (embeddings have their own)."""
    return (EMBEDDING_A, EMBEDDING_B) if isinstance(module, (nn.Embedding, EmbeddingWithLoRA)) else (LORA_A, LORA_B)


def _peft_tensors(wrapper: LoRAWrapper) -> dict[str, torch.Tensor]:
    """A wrapper's tensors by PEFT part, in PEFT's layout (live parameters, not copies)."""
    part_a, part_b = _ab_parts(wrapper)
    parts = {part_a: wrapper.lora.lora_A.T, part_b: wrapper.lora.lora_B.T}
    if wrapper.lora.use_dora:
        parts[LORA_MAGNITUDE] = wrapper.lora.magnitude
    return parts


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Returns the model's LoRA tensors under PEFT keys and layouts (A.T, B.T, DoRA's m), as float32."""
    return {module_key(name, part): tensor.detach().float()
            for name, wrapper in lora_wrappers(model).items() for part, tensor in _peft_tensors(wrapper).items()}


def save_adapter(model: nn.Module, directory: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Writes the injected LoRA as a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads.

    The whole directory is replaced in one atomic step (``lora_format.adapter_dir.save_adapter_dir``):
    a crash or a concurrent save leaves the previous adapter or this one, never a mix, and the
    weights record the sha256 of their config, which ``load_adapter`` checks.

    Args:
        model: a model with LoRA injected (one dropout/use_rslora/use_dora for all modules; ranks and alphas may
            differ per module, and are written as ``rank_pattern`` / ``alpha_pattern``).
        directory: destination directory (created if needed). It may hold a previous adapter and a
            ``README.md`` (kept); anything else is refused, since the directory is replaced whole.
        base_model_name_or_path: recorded in the config, e.g. ``"gpt2"`` or a checkpoint directory.

    Returns:
        The directory path.

    Raises:
        ValueError: no LoRA, modules with different settings, or ``directory`` holds other files.
    """
    config_bytes = encode_config(build_adapter_config(model, base_model_name_or_path))
    tensors = {name: t.to("cpu").contiguous() for name, t in peft_state_dict(model).items()}

    def write_files(new: Path) -> None:
        save_file(tensors, str(new / WEIGHTS_NAME), metadata=weights_metadata(config_bytes))
        (new / CONFIG_NAME).write_bytes(config_bytes)

    return save_adapter_dir(directory, write_files)


def _in_out(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, (LoRAWrapper, nn.Linear)):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D stores (in, out), nn.Embedding (num_embeddings, dim)


def _same_rank_and_scaling(name: str, wrapper: LoRAWrapper, spec: AdapterSpec) -> bool:
    rank, alpha = spec.module_rank_alpha(name)
    return wrapper.lora.rank == rank and wrapper.lora.scaling == lora_scaling(rank, alpha, spec.use_rslora)


def _check_compatible(model: nn.Module, existing: dict[str, LoRAWrapper], spec: AdapterSpec, source: str) -> None:
    """Raises unless the model's ``existing`` wrappers are exactly the ones ``spec`` describes."""
    selected = [name for name, _ in find_target_modules(model, spec.target_modules, spec.layers_to_transform,
                                                         spec.layers_pattern)]
    same_modules = sorted(selected) == sorted(existing)
    same_settings = all(_same_rank_and_scaling(name, wrapper, spec) and wrapper.lora.use_dora == spec.use_dora
                        for name, wrapper in existing.items())
    if not (same_modules and same_settings):
        raise ValueError(f"{source} does not match the LoRA already in the model (modules {sorted(existing)[:3]}..., "
                         f"rank/scaling of each, DoRA or not; the file has use_dora={spec.use_dora}); load it into "
                         "the plain base model instead, or merge first.")


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


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, allow_nonfinite: bool = False) -> nn.Module:
    """Loads a PEFT LoRA adapter directory into ``model``; returns ``model``.

    A plain model gets LoRA injected as the config says, each module at the rank and alpha that
    ``rank_pattern`` / ``alpha_pattern`` give it (DoRA wrappers when the config has ``use_dora``, whose
    magnitudes are loaded too); a model that already carries exactly that LoRA (same modules, each
    module's rank and scaling, DoRA or not) has its weights overwritten. Both files are read from one
    save even if another save replaces the directory meanwhile. The config, the config digest the
    weights record (if any), every tensor name, shape, dtype and value are checked before the model
    is touched, so any error leaves it unchanged.

    Args:
        model: the base model the adapter was trained on (e.g. ``GPT2LMHeadModel.from_pretrained``).
        directory: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        allow_nonfinite: accept NaN and inf tensor values instead of refusing the adapter.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: bad or unsupported config, config and weights from different saves, truncated
            file, missing/unknown keys, wrong shapes (e.g. an adapter for a different base model),
            non-float tensors, NaN/inf values, or incompatible existing LoRA.
        TypeError: the config targets modules that are not ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding``.
    """
    files = read_adapter_files(directory)
    directory = files.directory
    spec = parse_adapter_config(parse_json(files.config, str(directory / CONFIG_NAME)), str(directory / CONFIG_NAME))
    source = str(directory / files.weights_name)
    tensors = tensors_from_bytes(files.weights, files.weights_name, source)
    existing = lora_wrappers(model)
    if existing:
        _check_compatible(model, existing, spec, source)
        modules = existing
    else:
        matched = find_target_modules(model, spec.target_modules, spec.layers_to_transform, spec.layers_pattern)
        check_wrappable(matched, use_dora=spec.use_dora)
        modules = dict(matched)
    check_tensors_fit(_expected_shapes(modules, spec), tensors, source, allow_nonfinite=allow_nonfinite)
    if not existing:
        inject_lora(model, spec.target_modules, spec.rank, spec.lora_alpha, dropout=spec.dropout,
                    use_rslora=spec.use_rslora, use_dora=spec.use_dora, layers_to_transform=spec.layers_to_transform,
                    layers_pattern=spec.layers_pattern, rank_pattern=spec.rank_pattern,
                    alpha_pattern=spec.alpha_pattern, verbose=False)
    with torch.no_grad():
        for name, wrapper in lora_wrappers(model).items():
            for part, destination in _peft_tensors(wrapper).items():
                destination.copy_(tensors[module_key(name, part)])  # a transposed view writes through
    return model
