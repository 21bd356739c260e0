"""Google's qwix LoRA on this project's linen GPT-2: the peer row of ``compare_implementations.py``.

qwix adds LoRA by intercepting ``jax.lax.dot_general`` inside the modules whose path matches a
``qwix.LoraRule``; each matched ``nn.Dense`` gets ``kernel_lora_a`` (in, r) and ``kernel_lora_b``
(r, out) next to its ``kernel`` and returns ``x W0 + b + (alpha / r) (x A) B``, the same
convention as lora_jax. The row is built to differ from ``jax_lora`` only in how LoRA enters
the model:

- the same ``lora_jax.GPT2`` module, the same base weights (``init_gpt2_params``);
- the same A and B (``from_lora_jax`` copies an ``Adapter``'s factors in), so both start equal;
- the same loss (the chunked LM head, or full logits) and the same ``make_train_step`` with the
  same optax AdamW, which differentiates only qwix's LoRA leaves (``split_lora``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from lora_jax.gpt2.model import GPT2, GPT2Config
    >>> model = qwix_gpt2(GPT2(GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2)), ["c_fc"], 2, 4.0)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
    >>> lora, frozen = split_lora(params)
    >>> sorted(lora["transformer"]["h"]["0"]["mlp"]["c_fc"]), lora["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel_lora_b"].shape
    (['kernel_lora_a', 'kernel_lora_b'], (2, 32))
"""

from __future__ import annotations

import re
from typing import Any

LORA_SUFFIXES = ("_lora_a", "_lora_b")


def qwix_gpt2(model: Any, targets: list[str], rank: int, alpha: float) -> Any:
    """``model`` with qwix LoRA on every Dense whose last path component is one of ``targets``.

    ``hidden`` is intercepted too, so the chunked LM-head loss can run on the qwix model.
    """
    import qwix

    pattern = r"(.*/)?(" + "|".join(map(re.escape, targets)) + ")"  # qwix fullmatches "transformer/h/0/attn/c_attn"
    provider = qwix.LoraProvider(module_path=pattern, rank=rank, alpha=alpha)
    return qwix.apply_lora_to_model(model, provider, methods=("__call__", "hidden"))


def _flat(tree: dict) -> dict:
    from flax import traverse_util

    return traverse_util.flatten_dict(tree)


def _unflat(flat: dict) -> dict:
    from flax import traverse_util

    return traverse_util.unflatten_dict(flat)


def split_lora(params: dict) -> tuple[dict, dict]:
    """``(lora, frozen)``: qwix's ``*_lora_a`` / ``*_lora_b`` leaves, and every other leaf."""
    flat = _flat(params)
    is_lora = {key: key[-1].endswith(LORA_SUFFIXES) for key in flat}
    if not any(is_lora.values()):
        raise ValueError("These params hold no qwix LoRA leaves (*_lora_a, *_lora_b); build them with "
                         "qwix_gpt2(model, ...).init(...).")
    return (_unflat({k: v for k, v in flat.items() if is_lora[k]}),
            _unflat({k: v for k, v in flat.items() if not is_lora[k]}))


def combine(lora: dict, frozen: dict) -> dict:
    """The inverse of ``split_lora``."""
    return _unflat({**_flat(frozen), **_flat(lora)})


def from_lora_jax(qwix_lora: dict, adapter: Any) -> dict:
    """qwix's LoRA tree with every ``kernel_lora_a`` / ``kernel_lora_b`` replaced by ``adapter``'s A / B.

    Raises:
        ValueError: The two trees do not adapt the same modules with the same shapes.
    """
    flat = _flat(qwix_lora)
    theirs = {key[:-1] for key in flat}
    ours = {tuple(path) for path in adapter.modules()}
    if theirs != ours:
        raise ValueError(f"qwix adapts {sorted(theirs ^ ours)} differently from the lora_jax adapter; "
                         "give both the same targets.")
    out = {}
    for path, (a, b) in adapter.modules().items():
        for suffix, value in (("kernel_lora_a", a), ("kernel_lora_b", b)):
            key = (*path, suffix)
            if flat[key].shape != value.shape:
                raise ValueError(f"{'/'.join(key)}: qwix shape {flat[key].shape}, lora_jax shape {value.shape}.")
            out[key] = value
    return _unflat(out)


def qwix_lm_loss(qwix_model: Any, *, chunk_size: int | None) -> Any:
    """``loss_fn(lora, frozen, batch, rng)`` for ``make_train_step``: the loss ``lm_loss`` computes.

    ``chunk_size=None``: full logits and ``next_token_loss``; an int: the chunked, gradient-fused
    LM-head loss over the tied ``wte``, as ``lm_loss(model, chunk_size=...)``.
    """
    from lora_jax.training.chunked_loss import chunked_next_token_loss
    from lora_jax.training.losses import next_token_loss

    def loss_fn(lora: dict, frozen: dict, batch: Any, rng: Any) -> Any:
        del rng  # dropout 0, as in every row
        variables = {"params": combine(lora, frozen)}
        if chunk_size is None:
            return next_token_loss(qwix_model.apply(variables, batch.input_ids), batch.input_ids, batch.mask)
        hidden = qwix_model.apply(variables, batch.input_ids, method="hidden")
        return chunked_next_token_loss(hidden, frozen["transformer"]["wte"]["embedding"], batch.input_ids,
                                       batch.mask, chunk_size=chunk_size)

    return loss_fn
