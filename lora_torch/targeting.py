"""Which modules a ``target_modules`` setting selects: PEFT's rule, so both agree on every name.

- A list (or tuple/set) entry selects a module whose dotted name equals the entry or ends in
  ``"." + entry``. ``"c_proj"`` selects ``attn.c_proj`` and ``mlp.c_proj`` but never ``c_proj_x``
  (the tutorial's substring match would).
- A single string is a regular expression, fullmatched against the dotted name.
- ``layers_to_transform`` keeps suffix matches whose layer index (the first ``<name>.<digits>.``
  segment, or ``<layers_pattern>.<digits>.``) is listed. As in PEFT it does not filter exact-name
  entries or regex strings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

TargetModules = str | Sequence[str]


def check_target_modules(target_modules: object) -> None:
    """Raises a clear error unless ``target_modules`` is a regex string or a non-empty list of names.

    >>> check_target_modules(["c_attn", "c_proj"])
    >>> check_target_modules([])
    Traceback (most recent call last):
    ...
    ValueError: target_modules is empty; pass module names such as ["c_attn", "c_proj"] or a regex string.
    """
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regex ({err}); pass a list "
                             "of module names for exact/suffix matching instead.") from err
        return
    if not isinstance(target_modules, (list, tuple, set, frozenset)):
        raise TypeError(f"target_modules must be a str (regex) or a list of str, got "
                        f"{type(target_modules).__name__}.")
    if not target_modules:
        raise ValueError('target_modules is empty; pass module names such as ["c_attn", "c_proj"] '
                         "or a regex string.")
    bad = [entry for entry in target_modules if not isinstance(entry, str) or not entry]
    if bad:
        raise TypeError(f"every target_modules entry must be a non-empty str, got {bad!r}.")


def check_layers_to_transform(layers_to_transform: object) -> None:
    """Raises unless ``layers_to_transform`` is None, a non-negative int or a list of them."""
    if layers_to_transform is None:
        return
    values = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    if not isinstance(values, (list, tuple, set, frozenset)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise TypeError(f"layers_to_transform must be None, a non-negative int or a list of them, "
                        f"got {layers_to_transform!r}.")


def check_layers_pattern(layers_pattern: object) -> None:
    """Raises unless ``layers_pattern`` is None, a layer-list name or a list of names.

    >>> check_layers_pattern("h"), check_layers_pattern(["h", "layers"])
    (None, None)
    >>> check_layers_pattern(["h", 0])
    Traceback (most recent call last):
    ...
    TypeError: layers_pattern must be None, a layer-list name ("h" for GPT-2) or a list of them, got ['h', 0].
    """
    if layers_pattern is None or isinstance(layers_pattern, str):
        return
    if not isinstance(layers_pattern, (list, tuple)) or not all(isinstance(p, str) and p for p in layers_pattern):
        raise TypeError(f'layers_pattern must be None, a layer-list name ("h" for GPT-2) or a list of them, '
                        f"got {layers_pattern!r}.")


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """Returns the layer index in a dotted module name, as PEFT finds it, or None.

    >>> layer_index("transformer.h.11.mlp.c_fc"), layer_index("lm_head")
    (11, None)
    >>> layer_index("model.layers.3.experts.0.w1", layers_pattern="layers")
    3
    """
    if not layers_pattern:
        # Lazy .*? takes the first numbered segment, so nested indices (experts.0) are not mistaken for it.
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def module_is_targeted(
    name: str,
    target_modules: TargetModules,
    layers_to_transform: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> bool:
    """Tells whether the module called ``name`` is selected (PEFT's ``check_target_module_exists``).

    >>> module_is_targeted("transformer.h.0.mlp.c_proj", ["c_proj"])
    True
    >>> module_is_targeted("transformer.h.0.attn", ["attn.c"]), module_is_targeted("h.0.attn.c_attn", r".*\\.c_attn")
    (False, True)
    >>> module_is_targeted("transformer.h.1.attn.c_attn", ["c_attn"], layers_to_transform=[0])
    False
    """
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    if name in target_modules:
        return True
    if not any(name.endswith("." + entry) for entry in target_modules):
        return False
    layers = [layers_to_transform] if isinstance(layers_to_transform, int) else layers_to_transform
    if not layers:  # None or empty: every layer
        return True
    index = layer_index(name, layers_pattern)
    return index is not None and index in layers


def summarize_names(names: Iterable[str]) -> list[str]:
    """Collapses per-layer names into patterns, for short error messages.

    >>> summarize_names(["h.0.attn.c_attn", "h.1.attn.c_attn", "lm_head"])
    ['h.{i}.attn.c_attn', 'lm_head']
    """
    return list(dict.fromkeys(re.sub(r"\.\d+(?=\.|$)", ".{i}", name) for name in names))
