"""The embedded default base model: a small GPT-2 the project pre-trains itself, offline.

Modules:
    ``corpus``: the texts every CPython ships (pre-training text and the LoRA target text).
    ``tokenizer``: a byte-level BPE trained on that corpus with the ``tokenizers`` library.
    ``pretraining``: the base model's pre-training loop.
    ``base``: ``ensure_base``, which builds the base once and caches it.

The user-facing names are re-exported flat from ``lora_jax``.
"""
