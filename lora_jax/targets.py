"""Which modules of a Flax params pytree receive LoRA, by PEFT's matching rules.

In a params pytree every nested dict is a module, and its dotted name is its path joined by
``"."`` (``transformer.h.0.attn.c_attn``), the same string as the PyTorch module name when the
Flax model mirrors it. A module LoRA can adapt holds a 2-D ``kernel`` leaf of shape (in, out):
a ``flax.linen.Dense``.

Example:
    >>> import numpy as np
    >>> from lora_jax.config import LoraConfig
    >>> params = {"encoder": {"layers": {"0": {"query": {"kernel": np.zeros((4, 6))},
    ...                                        "norm": {"scale": np.ones(4)}}}}}
    >>> resolve_targets(params, LoraConfig(rank=2, target_modules=["query"]))
    (('encoder', 'layers', '0', 'query'),)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from lora_format.all_linear import expand_all_linear, is_all_linear
from lora_jax.config import LoraConfig
from lora_jax.lora_tree import ModulePath, get_module

SUPPORTED_MODULES = ("modules holding a 2-D 'kernel' (in, out) leaf, i.e. flax.linen.Dense, or a 2-D 'embedding' "
                     "(num_embeddings, features) leaf, i.e. flax.linen.Embed")

# What "all-linear" leaves out: PEFT drops model.get_output_embeddings(), which a params tree cannot name, so the
# output layer is recognised by transformers' name for it, a top-level "lm_head". (GPT-2's head is tied to wte,
# an embedding, and is no Dense at all.)
OUTPUT_LAYERS = ("lm_head",)


def dotted_name(path: ModulePath) -> str:
    """The module name PEFT and PyTorch use: the path joined by dots.

    >>> dotted_name(("transformer", "h", "0", "attn", "c_attn"))
    'transformer.h.0.attn.c_attn'
    """
    return ".".join(path)


def iter_modules(params: Mapping[str, Any], prefix: ModulePath = ()) -> Iterator[tuple[ModulePath, Mapping]]:
    """Yields ``(path, module_dict)`` for every nested dict below the root, depth first."""
    for key, value in params.items():
        if isinstance(value, Mapping):
            path = (*prefix, str(key))
            yield path, value
            yield from iter_modules(value, path)


def is_dense(module: Mapping[str, Any]) -> bool:
    """True when a module dict holds a 2-D ``kernel`` leaf (arrays or ``ShapeDtypeStruct``)."""
    kernel = module.get("kernel")
    return kernel is not None and not isinstance(kernel, Mapping) and len(getattr(kernel, "shape", ())) == 2


def is_embedding(module: Mapping[str, Any]) -> bool:
    """True when a module dict holds a 2-D ``embedding`` leaf and no kernel: a ``flax.linen.Embed``."""
    table = module.get("embedding")
    return ("kernel" not in module and table is not None and not isinstance(table, Mapping)
            and len(getattr(table, "shape", ())) == 2)


def base_weight_name(module: Mapping[str, Any]) -> str:
    """The leaf LoRA adapts: ``"kernel"`` (a Dense, (in, out)) or ``"embedding"`` (an Embed, (num_embeddings, features))."""
    return "embedding" if is_embedding(module) else "kernel"


def name_matches(name: str, target_modules: tuple[str, ...] | str) -> bool:
    """PEFT's rule: regex fullmatch for a string, exact or ``"." + entry`` suffix for a list.

    >>> name_matches("h.0.mlp.c_proj", ("c_proj",)), name_matches("h.0.mlp.c_proj2", ("c_proj",))
    (True, False)
    >>> name_matches("h.0.attn.c_attn", r".*attn\\.c_attn")
    True
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in target_modules)


def layer_index(path: ModulePath, layers_pattern: tuple[str, ...] | str | None = None) -> int | None:
    """The module's layer number as PEFT finds it, or None.

    Without ``layers_pattern``: the first number in the dotted name that has at least two
    names before it and one after (``transformer.h.11.attn`` -> 11). With it: the first number
    right after one of those names (``model.layers.3.experts.0.w1`` with ``"layers"`` -> 3).

    >>> layer_index(("transformer", "h", "11", "attn", "c_attn")), layer_index(("head",))
    (11, None)
    >>> layer_index(("model", "blocks", "2", "mixer", "experts", "0", "w1"), "blocks")
    2
    """
    name = dotted_name(path)
    if not layers_pattern:
        # Lazy .*? takes the first numbered segment, so a nested index (experts.0) is not mistaken for it.
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = (layers_pattern,) if isinstance(layers_pattern, str) else layers_pattern
        match = next(
            (m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)) is not None), None
        )
    return None if match is None else int(match.group("idx"))


def _check_params_root(params: Any) -> None:
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a (nested) dict of arrays, got {type(params).__name__}.")
    if set(params) == {"params"}:
        raise ValueError(
            "params looks like a Flax variables dict ({'params': ...}); pass variables['params'] "
            "so that module names start at the model's first submodule, as PEFT's do."
        )


def _selected(path: ModulePath, config: LoraConfig) -> bool:
    name = dotted_name(path)
    if not name_matches(name, config.target_modules):
        return False
    if config.layers_to_transform is None or (not isinstance(config.target_modules, str) and name in config.target_modules):
        # As in PEFT (and lora_torch), a module named in full is taken whatever its layer.
        return True
    # PEFT drops a suffix-matched module whose layer index is missing or not listed.
    return layer_index(path, config.layers_pattern) in config.layers_to_transform


def resolve_targets(params: Mapping[str, Any], config: LoraConfig) -> tuple[ModulePath, ...]:
    """The paths of the modules ``config`` targets in ``params``, in tree order.

    Args:
        params: A Flax params pytree (the value under ``"params"``); leaves may be arrays or
            ``jax.ShapeDtypeStruct``.
        config: The LoRA config whose ``target_modules`` and ``layers_to_transform`` apply.

    Returns:
        One path tuple per matched module. ``target_modules="all-linear"`` (PEFT's shorthand) takes
        every dense module except a top-level ``lm_head`` (``OUTPUT_LAYERS``).

    Raises:
        ValueError: Nothing matches (the message lists the candidate names), a matched module
            is neither a dense layer nor an embedding, ``use_dora`` selects an embedding, or
            ``config.rank`` exceeds ``min(in, out)`` of a matched module.
    """
    _check_params_root(params)
    modules = list(iter_modules(params))
    if is_all_linear(config.target_modules):
        names = set(expand_all_linear([dotted_name(p) for p, m in modules if is_dense(m)], OUTPUT_LAYERS))
        matched = [(p, m) for p, m in modules if dotted_name(p) in names]
    else:
        matched = [(p, m) for p, m in modules if _selected(p, config)]
    unsupported = [dotted_name(p) for p, m in matched if not (is_dense(m) or is_embedding(m))]
    if unsupported:
        raise ValueError(
            f"target_modules {config.target_modules!r} matched modules LoRA cannot adapt: {unsupported[:8]}. "
            f"Supported: {SUPPORTED_MODULES}. Name the dense layers or embeddings themselves."
        )
    if not matched:
        candidates = [dotted_name(p) for p, m in modules if is_dense(m) or is_embedding(m)]
        raise ValueError(
            f"target_modules {config.target_modules!r} (layers_to_transform={config.layers_to_transform}) "
            f"matched no module. Dense and Embed modules in these params: {candidates[:40]}"
            f"{' ...' if len(candidates) > 40 else ''}. A list entry must equal a name or its last "
            "dot-separated parts; a single string must match a whole name as a regex."
        )
    embeddings = [dotted_name(p) for p, m in matched if is_embedding(m)]
    if config.use_dora and embeddings:
        raise ValueError(
            f"use_dora is supported on dense layers only, and target_modules also selects the embeddings {embeddings}; "
            "drop them from target_modules, or train them with plain LoRA in a separate adapter."
        )
    for path, module in matched:
        fan_in, fan_out = module[base_weight_name(module)].shape
        if config.rank > min(fan_in, fan_out):
            raise ValueError(
                f"rank {config.rank} exceeds min(in, out) = {min(fan_in, fan_out)} of module "
                f"{dotted_name(path)!r} with kernel ({fan_in}, {fan_out}); lower the rank or drop that target."
            )
    return tuple(path for path, _ in matched)


def target_kernel_shapes(params: Mapping[str, Any], config: LoraConfig) -> dict[ModulePath, tuple[int, int]]:
    """``{path: (in, out)}``: the kernel shape of each module ``config`` targets, in tree order.

    An embedding's "kernel" is its table, (num_embeddings, features): the rows it maps ids to.

    What ``init_lora``, ``lora_param_count`` and ``load_adapter`` size the LoRA factors from.

    Raises:
        ValueError: As ``resolve_targets``.

    >>> import numpy as np
    >>> target_kernel_shapes({"up": {"kernel": np.zeros((4, 8))}}, LoraConfig(rank=2, target_modules=["up"]))
    {('up',): (4, 8)}
    """
    shapes = {}
    for path in resolve_targets(params, config):
        module = get_module(params, path)
        shapes[path] = tuple(module[base_weight_name(module)].shape)
    return shapes
