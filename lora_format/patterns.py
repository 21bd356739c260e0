"""PEFT's ``rank_pattern`` and ``alpha_pattern``: which rank and alpha each adapted module gets.

One rule, used by both halves and proven against PEFT itself (``tests/lora_format/test_patterns.py``
compares ``pattern_key`` with ``peft.utils.other.get_pattern_key``; ``tests/test_rank_alpha_patterns.py``
compares the per-module ranks with the layers ``peft.get_peft_model`` builds). PEFT 0.21
(``peft/tuners/lora/model.py``, ``LoraModel._create_and_replace``) does, for a module named
``current_key``::

    r_key = get_pattern_key(rank_pattern.keys(), current_key)
    r = rank_pattern.get(r_key, r)                  # likewise alpha from alpha_pattern, default lora_alpha

and ``get_pattern_key`` (``peft/utils/other.py``) returns the FIRST key, in dict order, for which
``re.match(rf"(.*\\.)?({key})$", current_key)`` matches: the key is a regex that must match the whole
name or a tail of it that starts after a dot. The scaling then uses each module's own rank and alpha.

A pattern is held as a tuple of ``(key, value)`` pairs, in the order given (hashable, so a config
holding one stays a static ``jax.jit`` argument). Order matters when keys overlap; note that
``adapter_config.json`` stores the keys sorted (PEFT's ``save_pretrained`` writes ``sort_keys=True``,
and so does ``lora_format.adapter_dir``), so ``check_survives_sorting`` tells whether a pattern means
the same after a save.

Example:
    >>> names = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.h.0.mlp.c_fc"]
    >>> rank_pattern = normalise_pattern({"h.0.attn.c_attn": 2, "c_fc": 6}, "rank_pattern", integer=True)
    >>> [module_rank_alpha(name, 4, 8.0, rank_pattern, ()) for name in names]
    [(2, 8.0), (4, 8.0), (6, 8.0)]
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Pattern = tuple[tuple[str, Any], ...]


def _regex(key: str) -> str:
    return rf"(.*\.)?({key})$"  # PEFT's exact expression (peft/utils/other.py, get_pattern_key)


def pattern_key(keys: Iterable[str], name: str) -> str | None:
    """The first of ``keys`` (a regex each) that matches the dotted module ``name`` as PEFT matches it, or None.

    PEFT's ``get_pattern_key`` returns ``name`` itself instead of None; ``module_rank_alpha`` accounts for that.

    >>> pattern_key(["h.0.attn.c_attn", "c_attn"], "transformer.h.0.attn.c_attn")
    'h.0.attn.c_attn'
    >>> pattern_key(["c_attn"], "transformer.h.0.attn.c_attn_x") is None  # a key matches up to the end
    True
    >>> pattern_key(["n.c_attn"], "transformer.h.0.attn.c_attn") is None  # ...and from a dot
    True
    """
    for key in keys:
        if re.match(_regex(key), name):
            return key
    return None


def _value(pattern: Pattern, name: str, default: Any) -> Any:
    values = dict(pattern)
    key = pattern_key(values, name)
    # As PEFT: with no match it looks the name itself up (which only differs for a key that is the
    # name but does not match it as a regex).
    return values.get(name if key is None else key, default)


def module_rank_alpha(name: str, rank: int, alpha: float, rank_pattern: Pattern = (),
                      alpha_pattern: Pattern = ()) -> tuple[int, float]:
    """``(rank, alpha)`` of the module called ``name``: the first matching pattern's value, else the defaults.

    Args:
        name: the module's dotted name, e.g. ``"transformer.h.0.mlp.c_fc"``.
        rank: ``r``, the rank of modules no ``rank_pattern`` key matches.
        alpha: ``lora_alpha``, likewise for ``alpha_pattern``.
        rank_pattern: ``(key, rank)`` pairs in order (see ``normalise_pattern``).
        alpha_pattern: ``(key, alpha)`` pairs in order.

    >>> module_rank_alpha("transformer.h.1.mlp.c_proj", 4, 8.0, (("c_fc", 6),), (("mlp.c_proj", 3.0),))
    (4, 3.0)
    """
    return _value(rank_pattern, name, rank), float(_value(alpha_pattern, name, alpha))


def module_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA, for one module's own rank and alpha.

    >>> module_scaling(4, 8.0, False), module_scaling(4, 8.0, True)
    (2.0, 4.0)
    """
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pairs(value: Any, field: str) -> list[tuple[Any, Any]]:
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, Sequence) and not isinstance(value, str) and all(
            isinstance(pair, Sequence) and not isinstance(pair, str) and len(pair) == 2 for pair in value):
        pairs = [tuple(pair) for pair in value]
        keys = [key for key, _ in pairs]
        duplicated = sorted({str(key) for key in keys if keys.count(key) > 1})
        if duplicated:
            raise ValueError(f"{field} repeats the keys {duplicated}; give each key once.")
        return pairs
    raise TypeError(f"{field} must be a dict from module-name regex to value (or (key, value) pairs), "
                    f"got {value!r:.60}.")


def _check_key(key: Any, field: str) -> str:
    if not isinstance(key, str) or not key:
        raise TypeError(f"{field} keys must be non-empty strings (module-name regexes), got {key!r}.")
    try:
        re.compile(_regex(key))
    except re.error as err:
        raise ValueError(f"{field} key {key!r} is read as a regex and does not compile ({err}); escape special "
                         r"characters (e.g. 'h\.0\.attn\.c_attn') or use a plain name such as 'c_attn'.") from None
    return key


def _check_value(key: str, value: Any, field: str, integer: bool) -> int | float:
    if integer:
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{field}[{key!r}] must be a positive int rank, got {value!r}; typical ranks are 4 to 64.")
        return value
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field}[{key!r}] must be a finite number > 0, got {value!r}; a common choice is 2 * rank.")
    return float(value)


def normalise_pattern(value: Any, field: str, *, integer: bool) -> Pattern:
    """Checks a ``rank_pattern`` / ``alpha_pattern`` and returns it as ``(key, value)`` pairs in its order.

    Args:
        value: a dict ``{regex: value}``, a sequence of ``(regex, value)`` pairs, or None (no pattern).
        field: the name used in messages, e.g. ``"rank_pattern"`` or ``"LoraConfig.alpha_pattern"``.
        integer: ranks (positive ints) when True, alphas (finite numbers > 0, returned as float) otherwise.

    Raises:
        TypeError: not a dict or pairs, or a key that is not a non-empty string.
        ValueError: a key that does not compile as PEFT's regex, a repeated key, or a bad value.

    >>> normalise_pattern({"c_fc": 3}, "alpha_pattern", integer=False)
    (('c_fc', 3.0),)
    >>> normalise_pattern({"c_fc": 0}, "rank_pattern", integer=True)
    Traceback (most recent call last):
    ...
    ValueError: rank_pattern['c_fc'] must be a positive int rank, got 0; typical ranks are 4 to 64.
    """
    if value is None:
        return ()
    return tuple((_check_key(key, field), _check_value(key, v, field, integer)) for key, v in _pairs(value, field))


def resolve_modules(names: Iterable[str], rank: int, alpha: float, rank_pattern: Pattern = (),
                    alpha_pattern: Pattern = ()) -> dict[str, tuple[int, float]]:
    """``{name: (rank, alpha)}`` for each module name.

    >>> resolve_modules(["a.q", "a.v"], 4, 8.0, (("q", 2),))
    {'a.q': (2, 8.0), 'a.v': (4, 8.0)}
    """
    return {name: module_rank_alpha(name, rank, alpha, rank_pattern, alpha_pattern) for name in names}


def check_survives_sorting(names: Iterable[str], rank: int, alpha: float, rank_pattern: Pattern = (),
                           alpha_pattern: Pattern = ()) -> None:
    """Raises unless the patterns give every module the same rank and alpha with their keys sorted.

    ``adapter_config.json`` holds the keys sorted (PEFT writes it with ``sort_keys=True``), and the first
    matching key wins, so overlapping keys whose order matters would load with other ranks or alphas.

    >>> check_survives_sorting(["t.h.0.c_attn", "t.h.1.c_attn"], 4, 8.0, (("h.0.c_attn", 2), ("c_attn", 5)))
    Traceback (most recent call last):
    ...
    ValueError: rank_pattern/alpha_pattern keys overlap and their order matters, but adapter_config.json stores them sorted (PEFT's save_pretrained does too), so the saved file would give t.h.0.c_attn rank 5, alpha 8.0 instead of rank 2, alpha 8.0. Make the keys match disjoint modules, e.g. full module names such as 't.h.0.c_attn'.
    """
    names = list(names)
    given = resolve_modules(names, rank, alpha, rank_pattern, alpha_pattern)
    saved = resolve_modules(names, rank, alpha, tuple(sorted(rank_pattern)), tuple(sorted(alpha_pattern)))
    changed = [name for name in names if given[name] != saved[name]]
    if changed:
        name = changed[0]
        (r0, a0), (r1, a1) = given[name], saved[name]
        raise ValueError(
            "rank_pattern/alpha_pattern keys overlap and their order matters, but adapter_config.json stores them "
            f"sorted (PEFT's save_pretrained does too), so the saved file would give {name} rank {r1}, alpha {a1} "
            f"instead of rank {r0}, alpha {a0}. Make the keys match disjoint modules, e.g. full module names "
            f"such as {name!r}.")
