"""``inject_lora``: swap the targeted ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` children for LoRA wrappers."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_format.all_linear import ALL_LINEAR, expand_all_linear, is_all_linear
from lora_format.patterns import Pattern, module_rank_alpha, normalise_pattern
from lora_format.adapter_dir import DEFAULT_ADAPTER
from lora_torch.dora import DORA_WRAPPER_FOR_TYPE, DoRAWrapper
from lora_torch.embedding import EmbeddingWithLoRA
from lora_torch.initialize import InitLoraWeights, check_init_lora_weights
from lora_torch.layers import (
    LINEAR_WRAPPER_FOR_TYPE,
    LoRALayer,
    LoRAWrapper,
    check_adapter_name,
    check_lora_settings,
)
from lora_torch.quantize import Linear4bitWithDoRA, Linear4bitWithLoRA, is_linear4bit
from lora_torch.targeting import (
    TargetModules,
    check_layers_pattern,
    check_layers_to_transform,
    check_target_modules,
    module_is_targeted,
    summarize_names,
)

logger = logging.getLogger(__name__)

# The wrapper for each supported base type; inject_lora dispatches on this table.
WRAPPER_FOR_TYPE: dict[type[nn.Module], type[LoRAWrapper]] = {**LINEAR_WRAPPER_FOR_TYPE,
                                                              nn.Embedding: EmbeddingWithLoRA}



def _names(types) -> str:
    return ", ".join(f"{t.__module__}.{t.__qualname__}" for t in types)


_SUPPORTED = _names(WRAPPER_FOR_TYPE)


def lora_wrappers(model: nn.Module) -> dict[str, LoRAWrapper]:
    """Returns every LoRA wrapper in ``model`` by dotted module name, in module order.

    >>> model = inject_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], rank=2, verbose=False)
    >>> list(lora_wrappers(model))
    ['0']
    """
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRAWrapper)}


def lora_module_names(model: nn.Module) -> list[str]:
    """Returns the dotted names of the modules that carry LoRA (the names ``inject_lora`` replaced)."""
    return list(lora_wrappers(model))


def targetable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Named modules, without the insides of existing wrappers (a wrapper's base_layer is not a target)."""
    kept, wrapper_prefixes = [], []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapper_prefixes):
            continue
        kept.append((name, module))
        if isinstance(module, LoRAWrapper):
            wrapper_prefixes.append(name + ".")
    return kept


def _output_layer_names(model: nn.Module) -> list[str]:
    """The name of the module ``model.get_output_embeddings()`` returns (``lm_head``), if the model has one."""
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if not isinstance(output, nn.Module):
        return []
    return [name for name, module in model.named_modules() if module is output]


def all_linear_targets(model: nn.Module) -> tuple[str, ...]:
    """The full names PEFT's ``target_modules="all-linear"`` selects: every ``nn.Linear`` / ``Conv1D``
    (or a LoRA wrapper of one) but the output layer ``model.get_output_embeddings()`` returns.

    The rule is ``lora_format.all_linear``'s, PEFT 0.21's ``_maybe_include_all_linear_layers``.

    >>> all_linear_targets(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)))
    ('0', '2')
    """
    linear_types = (nn.Linear, Conv1D)  # PEFT's linear classes; embeddings are never "linear"
    names = [name for name, module in targetable_modules(model) if isinstance(module, linear_types) or (
        isinstance(module, LoRAWrapper) and isinstance(module.base_layer, linear_types))]
    return expand_all_linear(names, _output_layer_names(model))


def select_modules(
    model: nn.Module,
    target_modules: TargetModules,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Returns the ``(name, module)`` pairs a target setting selects, possibly none.

    >>> [name for name, _ in select_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), ["1", "2"])]
    ['1']
    >>> [name for name, _ in select_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "ALL-linear")]
    ['0']
    """
    if is_all_linear(target_modules):
        # Full names, as PEFT expands it: exact names are not filtered by layers_to_transform.
        target_modules = all_linear_targets(model)
    return [(name, module) for name, module in targetable_modules(model)
            if name and module_is_targeted(name, target_modules, layers_to_transform, layers_pattern)]


def find_target_modules(
    model: nn.Module,
    target_modules: TargetModules,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Returns the ``(name, module)`` pairs a target setting selects; raises a ValueError if none.

    >>> [name for name, _ in find_target_modules(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "[0-9]")]
    ['0', '1']
    """
    matched = select_modules(model, target_modules, layers_to_transform, layers_pattern)
    if not matched:
        candidates = [name for name, module in targetable_modules(model)
                      if isinstance(module, tuple(WRAPPER_FOR_TYPE) + (LoRAWrapper,))]
        layers = f"layers_to_transform={layers_to_transform!r}" + (
            "" if layers_pattern is None else f", layers_pattern={layers_pattern!r}")
        raise ValueError(
            f"target_modules={target_modules!r} ({layers}) matched no module "
            f"of {type(model).__name__}. List entries match a module whose dotted name equals the entry or ends "
            f"in '.' + entry; a str is a regex fullmatched against the name. Candidate modules: "
            f"{summarize_names(candidates)}")
    return matched


def check_wrappable(matched: list[tuple[str, nn.Module]], *, use_dora: bool = False,
                    adapter_name: str | None = None) -> None:
    """Raises unless every matched module can take the new adapter.

    Without ``adapter_name`` (``inject_lora``) a module must be a supported layer that has no LoRA yet.
    With it (``add_adapter``) a module may also be a LoRA wrapper of the same kind (DoRA or not).
    With ``use_dora`` the supported layers are DoRA's (``nn.Linear`` and ``Conv1D``).
    """
    wrapped = [name for name, module in matched if isinstance(module, LoRAWrapper)]
    if wrapped and adapter_name is None:
        # Raising (rather than skipping) keeps one adapter per module: a nested wrapper would
        # silently stack two updates, and a skipped one would ignore the new rank/alpha.
        raise ValueError(f"these modules already carry LoRA: {wrapped}. Injecting twice would nest adapters; "
                         "call merge_lora_weights(model) first, choose target_modules without them, or add a second "
                         "named adapter with add_adapter(model, name, ...).")
    other_kind = [f"{name} ({type(module).__name__})" for name, module in matched
                  if isinstance(module, LoRAWrapper) and isinstance(module, DoRAWrapper) != use_dora]
    if other_kind:
        raise ValueError(f"adapter {adapter_name!r} (use_dora={use_dora}) targets modules that carry "
                         f"{'plain LoRA' if use_dora else 'DoRA'} adapters: {other_kind}. A module holds adapters of "
                         "one kind here (DoRA rescales the whole weight, so the two do not add up); use "
                         f"use_dora={not use_dora}, or leave those modules out of target_modules.")
    unsupported = [f"{name} ({type(module).__name__})" for name, module in matched
                   if not isinstance(module, tuple(WRAPPER_FOR_TYPE) + (LoRAWrapper,))]
    if unsupported:
        raise TypeError(f"target_modules matched modules of unsupported type: {unsupported}. Supported types: "
                        f"{_SUPPORTED}. Name the linear layers inside them instead (e.g. 'c_attn', not 'attn').")
    no_dora = [f"{name} ({type(module).__name__})" for name, module in matched
               if not isinstance(module, tuple(DORA_WRAPPER_FOR_TYPE) + (DoRAWrapper,))]
    if use_dora and no_dora:
        raise ValueError(f"use_dora=True is supported on {_names(DORA_WRAPPER_FOR_TYPE)} only, and target_modules "
                         f"matched {no_dora}. Leave those modules out of target_modules, or use plain LoRA "
                         "(use_dora=False).")


def _wrap(module: nn.Module, use_dora: bool, **lora_kwargs) -> LoRAWrapper:
    if is_linear4bit(module):  # before the table: Linear4bit is an nn.Linear whose weight holds packed codes
        return (Linear4bitWithDoRA if use_dora else Linear4bitWithLoRA)(module, **lora_kwargs)
    for base_type, wrapper_type in (DORA_WRAPPER_FOR_TYPE if use_dora else WRAPPER_FOR_TYPE).items():
        if isinstance(module, base_type):
            return wrapper_type(module, **lora_kwargs)
    raise TypeError(f"cannot wrap {type(module).__name__}; supported types: {_SUPPORTED}.")


def model_active_adapters(model: nn.Module) -> list[str]:
    """The active adapters of ``model``: those of its first wrapper (model-level calls keep them all equal)."""
    return next((list(w.active_adapters) for w in lora_wrappers(model).values()), [])


def _check_settings(target_modules, rank, lora_alpha, dropout, use_dora, init_lora_weights, layers_to_transform,
                    layers_pattern, rank_pattern, alpha_pattern):
    check_target_modules(target_modules)
    check_layers_to_transform(layers_to_transform)
    check_layers_pattern(layers_pattern)
    check_lora_settings(rank, lora_alpha, dropout)
    if not isinstance(use_dora, bool):
        raise TypeError(f"use_dora must be True or False, got {use_dora!r}.")
    init_lora_weights = check_init_lora_weights(init_lora_weights)
    rank_pattern = normalise_pattern(rank_pattern, "rank_pattern", integer=True)
    alpha_pattern = normalise_pattern(alpha_pattern, "alpha_pattern", integer=False)
    if is_all_linear(target_modules) and layers_to_transform is not None:
        raise ValueError(f"layers_to_transform does not apply to target_modules={ALL_LINEAR!r} (PEFT expands it to "
                         "full module names, which it does not filter by layer); list the modules instead, e.g. "
                         '["c_attn", "c_proj", "c_fc"] with layers_to_transform.')
    if isinstance(target_modules, str) and layers_to_transform is not None:
        raise ValueError("layers_to_transform does not apply to a regex target_modules (PEFT ignores it there); "
                         r"put the layer index in the regex, e.g. r'.*\.h\.(0|1)\.attn\.c_attn'.")
    return init_lora_weights, rank_pattern, alpha_pattern


def _inject(model: nn.Module, adapter_name: str, into_wrappers: bool, target_modules: TargetModules, rank: int,
            lora_alpha: float, *, dropout: float, use_rslora: bool, use_dora: bool, init_lora_weights: InitLoraWeights,
            layers_to_transform, layers_pattern, rank_pattern, alpha_pattern, verbose: bool) -> nn.Module:
    """Adds adapter ``adapter_name`` to the targeted modules; every check runs before anything changes."""
    init_lora_weights, rank_pattern, alpha_pattern = _check_settings(
        target_modules, rank, lora_alpha, dropout, use_dora, init_lora_weights, layers_to_transform, layers_pattern,
        rank_pattern, alpha_pattern)
    matched = find_target_modules(model, target_modules, layers_to_transform, layers_pattern)
    check_wrappable(matched, use_dora=use_dora, adapter_name=adapter_name if into_wrappers else None)
    active = model_active_adapters(model)
    # The first adapter of a model is active and trainable; a later one waits for set_adapter, as in PEFT.
    first = not lora_wrappers(model)
    branches, wrappers = {}, {}
    for name, module in matched:
        module_rank, module_alpha = module_rank_alpha(name, rank, lora_alpha, rank_pattern, alpha_pattern)
        settings = {"rank": module_rank, "lora_alpha": module_alpha, "dropout": dropout, "use_rslora": use_rslora,
                    "init_lora_weights": init_lora_weights}
        if isinstance(module, LoRAWrapper):
            branches[name] = module.new_branch(**settings)
        else:
            wrappers[name] = _wrap(module, use_dora, adapter_name=adapter_name, **settings)
    for name, wrapper in wrappers.items():
        if not first:
            wrapper.active_adapters = list(active)
            wrapper.adapters[adapter_name].requires_grad_(adapter_name in active)
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, wrapper)
    for name, branch in branches.items():
        branch.requires_grad_(adapter_name in active)
        model.get_submodule(name).add_adapter(adapter_name, branch)
    if verbose:
        patterns = f", rank_pattern={dict(rank_pattern)}, alpha_pattern={dict(alpha_pattern)}" \
            if rank_pattern or alpha_pattern else ""
        what = f"add_adapter: adapter {adapter_name!r} on" if into_wrappers else "inject_lora: replaced"
        logger.info("%s %d modules (rank=%d, alpha=%g%s%s): %s", what, len(matched), rank, lora_alpha, patterns,
                    ", DoRA" if use_dora else "", ", ".join(name for name, _ in matched))
    return model


def inject_lora(
    model: nn.Module,
    target_modules: TargetModules,
    rank: int = 8,
    lora_alpha: float = 16.0,
    *,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    init_lora_weights: InitLoraWeights = True,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    rank_pattern: dict[str, int] | Pattern | None = None,
    alpha_pattern: dict[str, float] | Pattern | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Replaces each targeted ``nn.Linear`` / ``Conv1D`` / ``nn.Embedding`` with its LoRA wrapper, in place.

    A bitsandbytes ``Linear4bit`` (a QLoRA base: ``quantize_base``, or transformers' 4-bit loading) gets a
    ``Linear4bitWithLoRA`` (``Linear4bitWithDoRA`` with ``use_dora``): float32 LoRA on a frozen NF4 base.

    Every check runs before any module is replaced, so an error leaves ``model`` unchanged.
    Injecting into a module that already carries LoRA raises instead of nesting adapters.

    Args:
        model: the model to adapt (modified in place).
        target_modules: a list of module names (exact dotted name or ``"." + suffix`` match), or one
            regex string fullmatched against dotted names. Same rule as PEFT. ``"all-linear"`` (any case)
            is PEFT's shorthand: every ``nn.Linear`` / ``Conv1D`` but the output layer
            (``model.get_output_embeddings()``, e.g. GPT-2's ``lm_head``); see ``all_linear_targets``.
        rank: LoRA rank ``r``.
        lora_alpha: LoRA ``alpha``; the branch is scaled by ``alpha / r``.
        dropout: dropout probability on the LoRA branch's input (not on embeddings: PEFT ignores it there).
        use_rslora: scale by ``alpha / sqrt(r)``.
        use_dora: DoRA (``lora_torch.dora``): wrap with ``LinearWithDoRA`` / ``Conv1DWithDoRA``, which add a
            trainable magnitude per output feature. Only ``nn.Linear`` and ``Conv1D`` support it.
        init_lora_weights: PEFT's init choice (``lora_torch.initialize``): ``True`` (A uniform, B = 0),
            ``"gaussian"`` (A ~ N(0, 1/r^2), B = 0) or ``False`` (B drawn too, so the adapter acts at once).
        layers_to_transform: keep only modules in these layer indices (``h.{i}``), as PEFT does.
            Not allowed with a regex string: PEFT ignores it there, so put the index in the regex.
        layers_pattern: the name of the layer list (``"h"`` for GPT-2) when the default rule,
            the first ``<name>.<digits>.`` segment, picks the wrong index.
        rank_pattern: PEFT's per-module ranks, ``{regex: rank}`` (or ``(regex, rank)`` pairs): a module
            takes the value of the first key that matches its dotted name as PEFT matches it (the whole
            name, or a tail after a dot, e.g. ``"h.0.attn.c_attn"`` or ``"c_fc"``), else ``rank``.
            The rule is ``lora_format.patterns``', shared with lora_jax and tested against PEFT.
        alpha_pattern: per-module ``lora_alpha`` values, matched the same way; default ``lora_alpha``.
        verbose: log the replaced module names at INFO level (the tutorial's report), through
            ``logging.getLogger("lora_torch.inject")``.

    Returns:
        ``model``; ``lora_module_names(model)`` lists the replaced modules.

    Raises:
        ValueError: nothing matched (the message lists candidates), a module already has LoRA,
            a setting is out of range, a pattern key does not compile as a regex, ``use_dora`` with a
            module DoRA does not support, or an unknown ``init_lora_weights``.
        TypeError: a matched module is not ``nn.Linear``, ``Conv1D`` or ``nn.Embedding``, or ``target_modules``,
            ``layers_to_transform``, ``layers_pattern`` or a pattern has the wrong type.

    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> model = inject_lora(model, ["0", "2"], rank=2, lora_alpha=4.0, verbose=False)
    >>> type(model[0]).__name__, lora_module_names(model)
    ('LinearWithLoRA', ['0', '2'])
    >>> model = inject_lora(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), ["0", "1"], rank=2, lora_alpha=4.0,
    ...                     rank_pattern={"1": 1}, alpha_pattern={"1": 3.0}, verbose=False)
    >>> [(w.lora.rank, w.lora.scaling) for w in lora_wrappers(model).values()]
    [(2, 2.0), (1, 3.0)]
    """
    return _inject(model, DEFAULT_ADAPTER, False, target_modules, rank, lora_alpha, dropout=dropout,
                   use_rslora=use_rslora, use_dora=use_dora, init_lora_weights=init_lora_weights,
                   layers_to_transform=layers_to_transform, layers_pattern=layers_pattern, rank_pattern=rank_pattern,
                   alpha_pattern=alpha_pattern, verbose=verbose)


def add_adapter(
    model: nn.Module,
    adapter_name: str,
    target_modules: TargetModules,
    rank: int = 8,
    lora_alpha: float = 16.0,
    *,
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    init_lora_weights: InitLoraWeights = True,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
    rank_pattern: dict[str, int] | Pattern | None = None,
    alpha_pattern: dict[str, float] | Pattern | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Adds a second (third, ...) named adapter to ``model``, in place; PEFT's ``add_adapter``.

    Takes ``inject_lora``'s settings, so adapters may differ in rank, alpha, targets and rsLoRA.
    A targeted module that carries LoRA already gets one more branch; any other targeted module is
    wrapped. As in PEFT, the new adapter is not active, and its parameters do not require grad,
    until ``set_adapter`` activates it, unless it is the model's first adapter. Every check runs before
    anything changes.

    Args:
        model: the model (modified in place).
        adapter_name: a new name: letters, digits, ``_`` and ``-`` (it names a subdirectory on save).
        target_modules: as in ``inject_lora``.
        rank: as in ``inject_lora``; and the rest of the arguments too.
        lora_alpha: as in ``inject_lora``.
        dropout: as in ``inject_lora``.
        use_rslora: as in ``inject_lora``.
        use_dora: as in ``inject_lora``; a module holds adapters of one kind (all DoRA or none).
        init_lora_weights: as in ``inject_lora``.
        layers_to_transform: as in ``inject_lora``.
        layers_pattern: as in ``inject_lora``.
        rank_pattern: as in ``inject_lora``.
        alpha_pattern: as in ``inject_lora``.
        verbose: log the adapted module names at INFO level.

    Returns:
        ``model``.

    Raises:
        ValueError: the name exists already or is not a valid name, nothing matched, a module of the other
            kind (DoRA or not), or any error of ``inject_lora``.
        TypeError: as ``inject_lora``.

    >>> model = inject_lora(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), ["0"], rank=2, verbose=False)
    >>> model = add_adapter(model, "task_b", ["0", "1"], rank=1, verbose=False)
    >>> {name: list(wrapper.adapters) for name, wrapper in lora_wrappers(model).items()}
    {'0': ['default', 'task_b'], '1': ['task_b']}
    >>> model[1].active_adapters, model[1].adapters["task_b"].lora_B.requires_grad
    (['default'], False)
    """
    check_adapter_name(adapter_name)
    existing = list_adapters(model)
    if adapter_name in existing:
        raise ValueError(f"the model already has an adapter named {adapter_name!r} (adapters: {existing}); choose a "
                         f"new name, or delete_adapter(model, {adapter_name!r}) first.")
    return _inject(model, adapter_name, True, target_modules, rank, lora_alpha, dropout=dropout, use_rslora=use_rslora,
                   use_dora=use_dora, init_lora_weights=init_lora_weights, layers_to_transform=layers_to_transform,
                   layers_pattern=layers_pattern, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                   verbose=verbose)


def list_adapters(model: nn.Module) -> list[str]:
    """The names of every adapter in ``model``: ``"default"`` first (if there), then the others sorted.

    >>> list_adapters(inject_lora(nn.Sequential(nn.Linear(2, 2)), ["0"], rank=1, verbose=False))
    ['default']
    """
    names = {name for wrapper in lora_wrappers(model).values() for name in wrapper.adapters}
    return sorted(names, key=lambda name: (name != DEFAULT_ADAPTER, name))


def adapter_layers(model: nn.Module, adapter_name: str | None = None) -> dict[str, LoRALayer]:
    """Each module's branch of adapter ``adapter_name`` by module name; default the one active adapter.

    Raises:
        ValueError: no such adapter, or (without a name) not exactly one active adapter.

    >>> model = inject_lora(nn.Sequential(nn.Linear(2, 2)), ["0"], rank=1, verbose=False)
    >>> {name: layer.rank for name, layer in adapter_layers(model).items()}
    {'0': 1}
    """
    if adapter_name is None:
        active = model_active_adapters(model)
        if len(active) != 1:
            raise ValueError(f"{len(active)} adapters are active ({active}); name the adapter you mean "
                             f"(adapter_name=..., one of {list_adapters(model)}).")
        adapter_name = active[0]
    layers = {name: wrapper.adapters[adapter_name] for name, wrapper in lora_wrappers(model).items()
              if adapter_name in wrapper.adapters}
    if not layers:
        raise ValueError(f"the model has no adapter named {adapter_name!r}; its adapters are {list_adapters(model)}.")
    return layers

