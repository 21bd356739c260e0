"""Training LoRA with optax: the step, the losses, checkpoints, sharding and text batches.

Modules:
    ``step``: ``make_train_step`` (differentiates the adapter only) and ``lora_optimizer``.
    ``losses``: the one ``Batch`` convention and the one loss builder, ``lm_loss``.
    ``chunked_loss``: the LM head and cross-entropy in chunks, so full logits never exist.
    ``checkpoint``: atomic, validated, resumable training checkpoints.
    ``sharding``: meshes, partition specs and the sharded step.
    ``text_data``: token streams cut into deterministic, resumable batches.

The user-facing names are re-exported flat from ``lora_jax``.
"""
