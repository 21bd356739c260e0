"""PEFT's ``adapter_config.json``: build it from an injected model, and read it back strictly.

Reading applies ``lora_format.peft_fields``, the table lora_jax reads with too: the PEFT features
this package does not implement (trained biases, extra saved modules...) are refused instead of
silently dropped, and a missing ``r`` or ``lora_alpha`` is an error. ``rank_pattern`` and
``alpha_pattern`` are read into the ``AdapterSpec``; ``lora_format.patterns`` applies them.

Modules injected with different ranks or alphas are written as PEFT writes them: the most common
rank and alpha as ``r`` and ``lora_alpha``, every other module by its full name in ``rank_pattern``
/ ``alpha_pattern``. Each key matches exactly one adapted module, so the description does not depend
on key order (``adapter_config.json`` stores keys sorted).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lora_format.patterns import Pattern, module_rank_alpha, pattern_key, resolve_modules
from lora_format.peft_fields import read_adapter_config
from lora_torch.embedding import EmbeddingLoRALayer
from lora_torch.inject import adapter_layers, lora_wrappers, select_modules
from lora_torch.layers import Conv1DWithLoRA, LoRALayer
from lora_torch.targeting import TargetModules, layer_index


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterSpec:
    """The parts of a PEFT LoRA config that decide which modules get LoRA and how it is scaled."""

    rank: int
    lora_alpha: float
    dropout: float
    use_rslora: bool
    target_modules: TargetModules
    use_dora: bool = False
    layers_to_transform: int | Sequence[int] | None = None
    layers_pattern: str | Sequence[str] | None = None
    rank_pattern: Pattern = ()
    alpha_pattern: Pattern = ()

    def module_rank_alpha(self, name: str) -> tuple[int, float]:
        """``(rank, lora_alpha)`` of the module with dotted ``name``, by PEFT's pattern rule.

        >>> AdapterSpec(rank=4, lora_alpha=8, dropout=0.0, use_rslora=False, target_modules=["c_fc"],
        ...             rank_pattern=(("c_fc", 6),)).module_rank_alpha("h.0.mlp.c_fc")
        (6, 8.0)
        """
        return module_rank_alpha(name, self.rank, self.lora_alpha, self.rank_pattern, self.alpha_pattern)


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


def _uniform(layers: dict[str, LoRALayer], attribute: str):
    values = {getattr(layer, attribute) for layer in layers.values()}
    if len(values) != 1:
        raise ValueError(f"LoRA modules use different {attribute} values {sorted(values)}; PEFT's adapter_config.json "
                         "holds one setting for all modules (only rank and alpha can vary, through rank_pattern and "
                         "alpha_pattern). Inject with one dropout/use_rslora/use_dora.")
    return values.pop()


def exact_key(name: str, names: Sequence[str]) -> str:
    """A ``rank_pattern`` key that matches the module ``name`` and none of the other ``names``.

    The name itself reads best (PEFT's docs use full names); where it would also match another
    module as a regex (a name that is a dotted tail of another), it is anchored and escaped.

    >>> exact_key("h.0.c_fc", ["h.0.c_fc", "h.1.c_fc"]), exact_key("c_fc", ["c_fc", "x.c_fc"])
    ('h.0.c_fc', '^c_fc')
    """
    others = [other for other in names if other != name]
    if pattern_key([name], name) == name and all(pattern_key([name], other) is None for other in others):
        return name
    return "^" + re.escape(name)


def _dropout(layers: dict[str, LoRALayer]) -> float:
    # PEFT never applies lora_dropout to embeddings, and their branches hold none; the others must agree.
    linear = {name: layer for name, layer in layers.items() if not isinstance(layer, EmbeddingLoRALayer)}
    return _uniform(linear, "dropout_p") if linear else 0.0


def _most_common(values: Sequence):
    return Counter(values).most_common(1)[0][0]  # ties: the first module's value


def describe_ranks(layers: dict[str, LoRALayer]) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """``(r, lora_alpha, rank_pattern, alpha_pattern)`` that give each module's branch exactly its rank and alpha.

    ``r`` and ``lora_alpha`` are the most common values; each other module is named by ``exact_key``.
    """
    names = list(layers)
    actual = {name: (layer.rank, layer.lora_alpha) for name, layer in layers.items()}
    rank = _most_common([r for r, _ in actual.values()])
    alpha = _most_common([a for _, a in actual.values()])
    rank_pattern = {exact_key(name, names): r for name, (r, _) in actual.items() if r != rank}
    alpha_pattern = {exact_key(name, names): a for name, (_, a) in actual.items() if a != alpha}
    # The file holds the keys sorted; read back that way, the description must give every module its values.
    resolved = resolve_modules(names, rank, alpha, tuple(sorted(rank_pattern.items())),
                               tuple(sorted(alpha_pattern.items())))
    if resolved != actual:  # exact_key makes the keys disjoint, so this is a bug, not bad input
        raise RuntimeError(f"rank/alpha patterns do not reproduce the model: {resolved} != {actual}")
    return rank, alpha, rank_pattern, alpha_pattern


def _task_type(model: nn.Module) -> str | None:
    # PEFT's key prefix is base_model.model. for every task type; the task type only picks the PeftModel class.
    return "CAUSAL_LM" if type(model).__name__.endswith(("LMHeadModel", "ForCausalLM")) else None


def build_adapter_config(model: nn.Module, base_model_name_or_path: str | None = None, *,
                         adapter_name: str | None = None) -> dict:
    """Returns the ``adapter_config.json`` dict that describes one adapter of ``model``.

    Modules with different ranks or alphas are described by ``describe_ranks``.

    Args:
        model: a model with LoRA injected.
        base_model_name_or_path: recorded in the config.
        adapter_name: the adapter to describe; default the one active adapter (the only one after ``inject_lora``).

    Raises:
        ValueError: no LoRA in the model, no such adapter (or several active and none named), or modules with
            different dropout, rsLoRA or DoRA settings.
    """
    if not lora_wrappers(model):
        raise ValueError(f"{type(model).__name__} has no LoRA modules; call inject_lora(model, ...) first.")
    layers = adapter_layers(model, adapter_name)
    wrappers = lora_wrappers(model)
    target_modules, layers_to_transform = describe_targets(list(layers), model)
    rank, alpha, rank_pattern, alpha_pattern = describe_ranks(layers)
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": _dropout(layers),
        "use_rslora": _uniform(layers, "use_rslora"),
        "target_modules": target_modules,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": None,
        # GPT-2's Conv1D stores (in, out); PEFT needs this flag to merge it without a transpose.
        "fan_in_fan_out": any(isinstance(wrappers[name], Conv1DWithLoRA) for name in layers),
        "bias": "none",
        "use_dora": _uniform(layers, "use_dora"),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
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
        use_dora=fields.use_dora,
        target_modules=fields.target_modules,
        layers_to_transform=fields.layers_to_transform,
        layers_pattern=fields.layers_pattern,
        rank_pattern=fields.rank_pattern,
        alpha_pattern=fields.alpha_pattern,
    )
