"""PEFT's ``adapter_config.json``: build it from an injected model, and read it back strictly.

Reading applies ``lora_format.peft_fields``, the table lora_jax reads with too: the PEFT features
this package does not implement (DoRA, trained biases, per-module rank/alpha patterns, extra saved
modules...) are refused instead of silently dropped, and a missing ``r`` or ``lora_alpha`` is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lora_format.peft_fields import read_adapter_config
from lora_torch.inject import lora_wrappers, select_modules
from lora_torch.layers import Conv1DWithLoRA, LoRAWrapper
from lora_torch.targeting import TargetModules, layer_index


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterSpec:
    """The parts of a PEFT LoRA config that decide which modules get LoRA and how it is scaled."""

    rank: int
    lora_alpha: float
    dropout: float
    use_rslora: bool
    target_modules: TargetModules
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None


def _selected(model: nn.Module, target_modules, layers_to_transform) -> set[str]:
    return {name for name, _ in select_modules(model, target_modules, layers_to_transform)}


def describe_targets(names: Sequence[str], model: nn.Module) -> tuple[list[str], list[int] | None]:
    """Returns the shortest ``(target_modules, layers_to_transform)`` that selects exactly ``names``.

    Tries name suffixes of growing length, first for every layer, then restricted to the layers
    present; the full dotted names always work, so this ends with an exact description.
    """
    wanted = set(names)
    layers = sorted({index for name in names if (index := layer_index(name)) is not None})
    longest = max(len(name.split(".")) for name in names)
    for depth in range(1, longest + 1):
        suffixes = sorted({".".join(name.split(".")[-depth:]) for name in names})
        for layer_setting in (None, layers or None):
            if _selected(model, suffixes, layer_setting) == wanted:
                return suffixes, layer_setting
    return sorted(wanted), None


def _uniform(wrappers: dict[str, LoRAWrapper], attribute: str):
    values = {getattr(w.lora, attribute) for w in wrappers.values()}
    if len(values) != 1:
        raise ValueError(f"LoRA modules use different {attribute} values {sorted(values)}; a PEFT adapter here holds "
                         "one setting for all modules. Inject with one rank/alpha/dropout/use_rslora.")
    return values.pop()


def _task_type(model: nn.Module) -> str | None:
    # PEFT's key prefix is base_model.model. for every task type; the task type only picks the PeftModel class.
    return "CAUSAL_LM" if type(model).__name__.endswith(("LMHeadModel", "ForCausalLM")) else None


def build_adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """Returns the ``adapter_config.json`` dict that describes the LoRA injected in ``model``.

    Raises:
        ValueError: no LoRA in the model, or modules with different rank/alpha/dropout/rsLoRA.
    """
    wrappers = lora_wrappers(model)
    if not wrappers:
        raise ValueError(f"{type(model).__name__} has no LoRA modules; call inject_lora(model, ...) first.")
    target_modules, layers_to_transform = describe_targets(list(wrappers), model)
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "r": _uniform(wrappers, "rank"),
        "lora_alpha": _uniform(wrappers, "lora_alpha"),
        "lora_dropout": _uniform(wrappers, "dropout_p"),
        "use_rslora": _uniform(wrappers, "use_rslora"),
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": None,
        # GPT-2's Conv1D stores (in, out); PEFT needs this flag to merge it without a transpose.
        "fan_in_fan_out": any(isinstance(w, Conv1DWithLoRA) for w in wrappers.values()),
        "bias": "none",
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "init_lora_weights": True,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
    }


def parse_adapter_config(config: dict, source: str) -> AdapterSpec:
    """Validates a PEFT LoRA config dict and returns its ``AdapterSpec``.

    Args:
        config: the parsed ``adapter_config.json``.
        source: the file it came from, for messages.

    Raises:
        ValueError: not a LoRA config, a missing or invalid field, or a PEFT feature lora_torch lacks
            (see ``lora_format.peft_fields.FIELDS``).

    >>> parse_adapter_config({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}, "x").rank
    4
    """
    fields = read_adapter_config(config, source)
    return AdapterSpec(
        rank=fields.rank,
        lora_alpha=fields.alpha,
        dropout=fields.dropout,
        use_rslora=fields.use_rslora,
        target_modules=fields.target_modules,
        layers_to_transform=fields.layers_to_transform,
        layers_pattern=fields.layers_pattern,
    )
