"""The LoRA hyper-parameters, validated once when the config is built.

Everything that can be wrong about a config is caught here, in plain Python, so that no bad
value ever reaches a jitted function. The config is frozen and hashable, which also lets it be
a static argument of ``jax.jit``.

Example:
    >>> config = LoraConfig(rank=8, alpha=16.0, target_modules=["c_attn", "c_proj"])
    >>> config.target_modules, config.scaling
    (('c_attn', 'c_proj'), 2.0)
    >>> LoraConfig(rank=4, alpha=8.0, target_modules=["c_attn"], use_rslora=True).scaling
    4.0
    >>> varied = LoraConfig(rank=4, alpha=8.0, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2})
    >>> varied.rank_pattern, varied.module_rank("transformer.h.0.mlp.c_fc"), varied.module_scaling("h.0.mlp.c_fc")
    ((('c_fc', 2),), 2, 4.0)
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from lora_format.all_linear import ALL_LINEAR, is_all_linear
from lora_format.patterns import Pattern, module_rank_alpha, module_scaling, normalise_pattern


INIT_OPTIONS = (True, "gaussian", False)


def _is_int(value: object) -> bool:
    # bool is an int subclass; `rank=True` is a typo, not a rank of one.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which dense layers get a LoRA branch, and its rank, scale and dropout.

    Attributes:
        rank: The rank ``r`` of ``A`` (in, r) and ``B`` (r, out); an int > 0.
        alpha: The scale numerator; the branch is multiplied by ``scaling``.
        target_modules: A list or tuple of module names: an entry matches a module whose dotted
            name equals it or ends with ``"." + entry`` (``"c_proj"`` hits ``attn.c_proj`` and
            ``mlp.c_proj``, never ``c_proj_extra``). A single string is a regular expression
            that must match the whole dotted name. Lists are stored as tuples. ``"all-linear"`` (any
            case) is PEFT's shorthand for every dense layer but the output layer
            (``lora_jax.targets.resolve_targets``).
        dropout: Dropout probability on the LoRA branch input, in [0, 1).
        use_rslora: Scale by ``alpha / sqrt(rank)`` (rank-stabilised LoRA) instead of
            ``alpha / rank``.
        layers_to_transform: ``None`` for every layer, or layer indices (ints >= 0; a single
            int is accepted). A module's layer index is found as PEFT finds it (see
            ``lora_jax.targets.layer_index``); modules without one are left out. Only valid
            with a list of target modules, as in PEFT.
        layers_pattern: Optional name(s) of the layer list (``"h"`` for GPT-2) after which the
            layer index is read; needs ``layers_to_transform``. Stored as a tuple for a list.
        rank_pattern: PEFT's per-module ranks: ``{regex: rank}``. A module takes the value of the
            first key (in the given order) that matches its dotted name as PEFT matches it (the
            whole name, or a tail of it starting after a dot; ``lora_format.patterns``), else
            ``rank``. Stored as a tuple of ``(key, rank)`` pairs, so the config stays hashable.
        alpha_pattern: PEFT's per-module alphas, matched the same way; default ``alpha``. Stored
            as ``(key, alpha)`` pairs with float alphas.
        use_dora: DoRA (PEFT's ``use_dora``): each module also learns a magnitude ``m`` (out,), and
            computes ``x (m / ||W0 + s A B||_c) * (W0 + s A B)`` with the column norm detached
            (``lora_jax.dora``).
        init_lora_weights: How ``init_lora`` makes fresh weights, as PEFT's option: ``True``
            (``A ~ U(+-1/sqrt(in))``, ``B = 0``), ``"gaussian"`` (``A ~ N(0, 1/r^2)``, ``B = 0``) or
            ``False`` (``B`` random too, so the adapter is not the identity; for tests).

    Raises:
        TypeError: A field has the wrong type.
        ValueError: A field has a value outside its range.
    """

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] | str
    dropout: float = 0.0
    use_rslora: bool = False
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    rank_pattern: Pattern = ()
    alpha_pattern: Pattern = ()
    use_dora: bool = False
    init_lora_weights: bool | str = True

    def __post_init__(self) -> None:
        _check_rank(self.rank)
        _check_alpha(self.alpha)
        _check_dropout(self.dropout)
        for flag in ("use_rslora", "use_dora"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"LoraConfig.{flag} must be a bool, got {getattr(self, flag)!r}.")
        if not any(type(self.init_lora_weights) is type(option) and self.init_lora_weights == option
                   for option in INIT_OPTIONS):  # by type too: 1 is not True
            raise ValueError(f"LoraConfig.init_lora_weights must be one of {INIT_OPTIONS}, got "
                             f"{self.init_lora_weights!r}; PEFT's other inits (pissa, olora, ...) change the base "
                             "weights and are not implemented.")
        # The dataclass is frozen; normalising fields at construction is the one allowed write.
        object.__setattr__(self, "target_modules", _normalise_targets(self.target_modules))
        layers = _normalise_layers(self.layers_to_transform)
        if layers is not None and isinstance(self.target_modules, str):
            raise ValueError(
                "LoraConfig.layers_to_transform needs target_modules to be a list of names; with a "
                "regex string PEFT ignores layers_to_transform. Put the layer numbers in the regex "
                r"instead, e.g. r'.*\.h\.(0|1)\.attn\.c_attn'."
            )
        object.__setattr__(self, "layers_to_transform", layers)
        object.__setattr__(self, "layers_pattern", _normalise_pattern(self.layers_pattern, layers))
        object.__setattr__(self, "rank_pattern", normalise_pattern(
            self.rank_pattern, "LoraConfig.rank_pattern", integer=True))
        object.__setattr__(self, "alpha_pattern", normalise_pattern(
            self.alpha_pattern, "LoraConfig.alpha_pattern", integer=False))

    @property
    def scaling(self) -> float:
        """The default factor ``s`` of ``s * (x A) B``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA.

        A module a pattern matches has its own: ``module_scaling``.
        """
        return module_scaling(self.rank, self.alpha, self.use_rslora)

    def module_rank(self, name: str) -> int:
        """The rank of the module with dotted ``name``: ``rank_pattern``'s first match, else ``rank``."""
        return module_rank_alpha(name, self.rank, self.alpha, self.rank_pattern, ())[0]

    def module_alpha(self, name: str) -> float:
        """The alpha of the module with dotted ``name``: ``alpha_pattern``'s first match, else ``alpha``."""
        return module_rank_alpha(name, self.rank, self.alpha, (), self.alpha_pattern)[1]

    def module_scaling(self, name: str) -> float:
        """The scaling of the module with dotted ``name``, from its own rank and alpha."""
        return module_scaling(self.module_rank(name), self.module_alpha(name), self.use_rslora)


def _check_rank(rank: object) -> None:
    if not _is_int(rank):
        raise TypeError(f"LoraConfig.rank must be an int, got {rank!r} ({type(rank).__name__}).")
    if rank <= 0:
        raise ValueError(f"LoraConfig.rank must be > 0, got {rank}; typical ranks are 4 to 64.")


def _check_alpha(alpha: object) -> None:
    if not _is_real(alpha):
        raise TypeError(f"LoraConfig.alpha must be a number, got {alpha!r} ({type(alpha).__name__}).")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoraConfig.alpha must be a finite number > 0, got {alpha}; a common choice is 2 * rank.")


def _check_dropout(dropout: object) -> None:
    if not _is_real(dropout):
        raise TypeError(f"LoraConfig.dropout must be a number, got {dropout!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {dropout}; use 0.0 to disable it.")


def _normalise_targets(targets: object) -> tuple[str, ...] | str:
    if is_all_linear(targets):
        return ALL_LINEAR
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(
                f"LoraConfig.target_modules {targets!r} is a single string, so it is read as a regex, "
                f"and it does not compile: {err}. Pass a list of names for exact/suffix matching."
            ) from None
        return targets
    if not isinstance(targets, Sequence):
        raise TypeError(
            f"LoraConfig.target_modules must be a list/tuple of module names or one regex string, got {targets!r}."
        )
    names = tuple(targets)
    if not names:
        raise ValueError("LoraConfig.target_modules is empty; name at least one module, e.g. ['c_attn'].")
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"LoraConfig.target_modules entries must be non-empty strings, got {name!r}.")
    return names


def _normalise_layers(layers: object) -> tuple[int, ...] | None:
    if layers is None:
        return None
    if _is_int(layers):
        layers = (layers,)
    if not isinstance(layers, Sequence) or isinstance(layers, str):
        raise TypeError(f"LoraConfig.layers_to_transform must be None, an int or a list of ints, got {layers!r}.")
    for index in layers:
        if not _is_int(index) or index < 0:
            raise ValueError(f"LoraConfig.layers_to_transform entries must be ints >= 0, got {index!r}.")
    if not layers:
        raise ValueError("LoraConfig.layers_to_transform is empty; use None to transform every layer.")
    return tuple(layers)


def _normalise_pattern(pattern: object, layers: tuple[int, ...] | None) -> tuple[str, ...] | str | None:
    if pattern is None or pattern == "" or (isinstance(pattern, Sequence) and not isinstance(pattern, str) and not pattern):
        return None  # PEFT treats None, "" and [] alike: any layer name
    if layers is None:
        raise ValueError("LoraConfig.layers_pattern only takes effect with layers_to_transform; set both or neither.")
    if isinstance(pattern, str):
        return pattern
    if not isinstance(pattern, Sequence) or not all(isinstance(p, str) and p for p in pattern):
        raise TypeError(f"LoraConfig.layers_pattern must be a name or a list of names, got {pattern!r}.")
    return tuple(pattern)
