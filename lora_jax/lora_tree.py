"""The LoRA tree: a nested dict that mirrors the targeted modules' paths.

Each adapted module contributes one dict with two leaves, ``lora_A`` (in, r) and ``lora_B``
(r, out), at the same path its ``kernel`` has in the params tree (docs/architecture.md). A DoRA
module holds a third, ``lora_magnitude_vector`` (out,), PEFT's name for DoRA's magnitude ``m``. An
adapted embedding (``nn.Embed``, e.g. GPT-2's ``wte``) holds ``lora_embedding_A`` (num_embeddings, r)
and ``lora_embedding_B`` (r, features) instead, PEFT's names; its update ``s A B`` has the shape of
the embedding table.

Example:
    >>> import numpy as np
    >>> tree = nest({("h", "0", "attn"): {"lora_A": np.zeros((4, 2)), "lora_B": np.zeros((2, 4))}})
    >>> list(tree["h"]["0"]["attn"])
    ['lora_A', 'lora_B']
    >>> [(path, a.shape, b.shape) for path, (a, b) in lora_modules(tree).items()]
    [(('h', '0', 'attn'), (4, 2), (2, 4))]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

LORA_A = "lora_A"
LORA_B = "lora_B"
LORA_MAGNITUDE = "lora_magnitude_vector"
EMBEDDING_A = "lora_embedding_A"
EMBEDDING_B = "lora_embedding_B"
LORA_KEYS = (LORA_A, LORA_B)
LEAF_NAMES = (LORA_A, LORA_B, LORA_MAGNITUDE, EMBEDDING_A, EMBEDDING_B)
# The leaf sets a module dict may hold: plain LoRA, DoRA, an embedding's LoRA.
_MODULE_KINDS = ({LORA_A, LORA_B}, {LORA_A, LORA_B, LORA_MAGNITUDE}, {EMBEDDING_A, EMBEDDING_B})

ModulePath = tuple[str, ...]


def nest(entries: Mapping[ModulePath, Any]) -> dict[str, Any]:
    """Builds a nested dict holding ``entries[path]`` at each path.

    Raises:
        ValueError: A path is empty, or one path is a prefix of another.
    """
    for path in entries:
        if not path:
            raise ValueError("A module path must not be empty; the root of a params tree is not a module.")
        # Entries are dicts themselves, so a module inside another would silently merge into it.
        if any(path[:i] in entries for i in range(1, len(path))):
            raise ValueError(f"Path {path} lies inside another module path; module paths must not nest.")
    tree: dict[str, Any] = {}
    for path, value in entries.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def lora_modules(lora: Mapping[str, Any], prefix: ModulePath = ()) -> dict[ModulePath, tuple[Any, Any]]:
    """Flattens a LoRA tree to ``{module_path: (A, B)}`` in tree order.

    An embedding's ``(lora_embedding_A, lora_embedding_B)`` is its ``(A, B)``; ``embedding_paths``
    tells those modules apart. A DoRA module's ``lora_magnitude_vector`` is left out here;
    ``magnitudes`` returns those.

    Raises:
        ValueError: A module dict does not hold ``lora_A`` and ``lora_B`` (and optionally
            ``lora_magnitude_vector``), or ``lora_embedding_A`` and ``lora_embedding_B``, and nothing else.
    """
    found: dict[ModulePath, tuple[Any, Any]] = {}
    if any(key in lora for key in LEAF_NAMES):
        if set(lora) not in _MODULE_KINDS:
            raise ValueError(
                f"LoRA module {'.'.join(prefix)!r} must hold {LORA_KEYS} (and {LORA_MAGNITUDE!r} for DoRA), "
                f"or {(EMBEDDING_A, EMBEDDING_B)} for an embedding; got keys {sorted(lora)}."
            )
        found[prefix] = (lora[LORA_A], lora[LORA_B]) if LORA_A in lora else (lora[EMBEDDING_A], lora[EMBEDDING_B])
        return found
    for key, value in lora.items():
        if not isinstance(value, Mapping):
            raise ValueError(
                f"Unexpected leaf {'.'.join((*prefix, str(key)))!r} in a LoRA tree; leaves must be "
                f"named {LEAF_NAMES}. Did you pass the params tree instead of the LoRA tree?"
            )
        found.update(lora_modules(value, (*prefix, str(key))))
    return found


def magnitudes(lora: Mapping[str, Any]) -> dict[ModulePath, Any]:
    """``{module_path: m}`` for the modules that hold a DoRA ``lora_magnitude_vector``, in tree order.

    >>> import numpy as np
    >>> tree = {"up": {"lora_A": np.zeros((4, 1)), "lora_B": np.zeros((1, 3)), "lora_magnitude_vector": np.ones(3)}}
    >>> {path: m.shape for path, m in magnitudes(tree).items()}
    {('up',): (3,)}
    """
    return {path: module[LORA_MAGNITUDE] for path in lora_modules(lora)
            if LORA_MAGNITUDE in (module := get_module(lora, path))}


def embedding_paths(lora: Mapping[str, Any]) -> tuple[ModulePath, ...]:
    """The paths of the modules that hold an embedding's LoRA (``lora_embedding_A``/``_B``), in tree order.

    >>> import numpy as np
    >>> embedding_paths({"wte": {"lora_embedding_A": np.zeros((9, 1)), "lora_embedding_B": np.zeros((1, 4))}})
    (('wte',),)
    """
    return tuple(path for path in lora_modules(lora) if EMBEDDING_A in get_module(lora, path))


def get_module(params: Mapping[str, Any], path: ModulePath) -> Mapping[str, Any] | None:
    """The dict at ``path`` in a nested dict, or None when the path does not exist."""
    node: Any = params
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, Mapping) else None
