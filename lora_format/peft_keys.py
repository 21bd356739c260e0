"""PEFT's tensor keys in ``adapter_model.safetensors``, for every LoRA part both halves save.

A key is ``base_model.model.<dotted module name>.<part>``. The parts, with the layout PEFT stores
(shared/DESIGN.md; ``in``/``out`` are the layer's input and output features):

========================  ==================  ==============================================
part                      PEFT shape          this project's array
========================  ==================  ==============================================
``lora_A.weight``         (r, in)             ``A.T``, A is (in, r)
``lora_B.weight``         (out, r)            ``B.T``, B is (r, out)
``lora_magnitude_vector`` (out,)              DoRA's magnitude ``m``, one entry per output feature
``lora_embedding_A``      (r, num_embeddings) ``A.T`` of an embedding, A is (num_embeddings, r)
``lora_embedding_B``      (dim, r)            ``B.T`` of an embedding, B is (r, dim)
========================  ==================  ==============================================

Example:
    >>> module_key("transformer.h.0.attn.c_attn", LORA_MAGNITUDE)
    'base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector'
    >>> split_key("base_model.model.transformer.wte.lora_embedding_B")
    ('transformer.wte', 'lora_embedding_B')
    >>> split_key("model.wte.lora_A.weight") is None
    True
"""

from __future__ import annotations

KEY_PREFIX = "base_model.model."

LORA_A = "lora_A.weight"
LORA_B = "lora_B.weight"
LORA_MAGNITUDE = "lora_magnitude_vector"
EMBEDDING_A = "lora_embedding_A"
EMBEDDING_B = "lora_embedding_B"
PARTS = (LORA_A, LORA_B, LORA_MAGNITUDE, EMBEDDING_A, EMBEDDING_B)


def module_key(name: str, part: str) -> str:
    """The key of ``part`` (one of ``PARTS``) of the module with dotted ``name``.

    Raises:
        ValueError: ``part`` is not one of ``PARTS``.
    """
    if part not in PARTS:
        raise ValueError(f"unknown PEFT tensor part {part!r}; the parts are {PARTS}.")
    return f"{KEY_PREFIX}{name}.{part}"


def split_key(key: str) -> tuple[str, str] | None:
    """``(dotted module name, part)`` of a PEFT key, or None when it is not one of ``PARTS``' keys."""
    if not key.startswith(KEY_PREFIX):
        return None
    for part in PARTS:
        if key.endswith("." + part) and len(key) > len(KEY_PREFIX) + len(part) + 1:
            return key[len(KEY_PREFIX): -len(part) - 1], part
    return None
