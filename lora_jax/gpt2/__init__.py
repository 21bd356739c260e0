"""This project's Flax GPT-2: the model, loading Hugging Face checkpoints, and generation.

Modules:
    ``model``: ``GPT2``, ``GPT2Config`` and the KV cache; every ``GPT2Config`` option that changes
        transformers' math.
    ``loading``: ``load_gpt2`` / ``save_gpt2`` in Hugging Face's checkpoint format.
    ``generation``: jitted greedy and sampled ``generate`` with the KV cache.

The user-facing names are re-exported flat from ``lora_jax``.
"""
