"""PEFT's ``target_modules="all-linear"``: every linear layer but the model's output layer.

PEFT 0.21 (``peft.tuners.tuners_utils._maybe_include_all_linear_layers``) compares the string
case-insensitively, collects the full dotted names of every ``nn.Linear`` and transformers
``Conv1D`` module, removes the module ``model.get_output_embeddings()`` returns (``lm_head`` in a
causal LM), and from then on uses that set of full names as ``target_modules``; that set is also
what its ``adapter_config.json`` records. Each half lists its own linear modules and output layer;
the rule itself is here, once.

Example:
    >>> is_all_linear("All-Linear"), is_all_linear(["all-linear"]), is_all_linear(r".*c_attn")
    (True, False, False)
    >>> expand_all_linear(["transformer.h.0.mlp.c_fc", "lm_head", "transformer.h.0.attn.c_attn"], ["lm_head"])
    ('transformer.h.0.attn.c_attn', 'transformer.h.0.mlp.c_fc')
"""

from __future__ import annotations

from collections.abc import Iterable

ALL_LINEAR = "all-linear"


def is_all_linear(target_modules: object) -> bool:
    """Whether ``target_modules`` is PEFT's shorthand: the string ``"all-linear"`` in any case."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def expand_all_linear(linear_names: Iterable[str], output_names: Iterable[str]) -> tuple[str, ...]:
    """The full names ``"all-linear"`` selects: ``linear_names`` minus ``output_names``, sorted.

    Raises:
        ValueError: No linear module is left, so the adapter would be empty.
    """
    names = tuple(sorted(set(linear_names) - set(output_names)))
    if not names:
        raise ValueError("target_modules='all-linear' found no linear layer besides the output layer; "
                         "name the modules to adapt instead.")
    return names
