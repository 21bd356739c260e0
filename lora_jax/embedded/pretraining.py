"""Full pre-training of a small Flax GPT-2 on one token stream, and its per-token loss.

This trains every parameter (it makes the base model LoRA later adapts), with optax AdamW,
gradient clipping and a warmup + cosine learning-rate schedule. Batches are random windows of
the stream drawn from a seeded numpy generator, so a run is reproducible.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from tqdm.auto import tqdm

from lora_jax.gpt2.model import GPT2, GPT2Config, Params, init_gpt2_params
from lora_jax.training.losses import Batch, lm_loss
from lora_jax.training.text_data import heldout_windows


def _base_loss(model: GPT2, params: Params, batch: Batch) -> jax.Array:
    """The library's one next-token loss, on the base model alone (no adapter)."""
    return lm_loss(model)(None, params, batch, None)


# The model is hashable (a frozen config), so one compiled loss serves every call per shape.
_jitted_base_loss = jax.jit(_base_loss, static_argnums=0)


def pretraining_optimizer(learning_rate: float, steps: int, weight_decay: float = 0.01) -> optax.GradientTransformation:
    """AdamW with clipping at 1.0, 10% linear warmup, cosine decay to 10%; no decay on vectors."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 10), max(2, steps), end_value=learning_rate * 0.1
    )
    # Decaying LayerNorm scales and biases towards 0 only hurts; decay matrices and embeddings.
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask),
    )


def pretrain(
    config: GPT2Config,
    ids: np.ndarray,
    *,
    batch_size: int,
    steps: int,
    learning_rate: float,
    seed: int,
    progress: bool = True,
) -> tuple[Params, list[float]]:
    """Trains a fresh GPT-2 of ``config`` on random windows of ``config.n_positions`` tokens.

    Args:
        config: Model shape; ``n_positions`` is the training context length.
        ids: The token stream, 1-D ints below ``config.vocab_size``.
        batch_size: Windows per step.
        steps: Optimizer steps.
        learning_rate: Peak learning rate.
        seed: Seeds both the initialisation and the window sampler.
        progress: Show a tqdm bar with the running loss.

    Returns:
        ``(params, losses)``: trained parameters and the loss of every step.
    """
    ids = np.asarray(ids, dtype=np.int32)
    span = config.n_positions
    if ids.ndim != 1 or len(ids) <= span:
        raise ValueError(f"ids must be a 1-D stream longer than n_positions = {span} tokens, got shape {ids.shape}.")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}.")
    model = GPT2(config)
    params = init_gpt2_params(config, jax.random.key(seed))
    optimizer = pretraining_optimizer(learning_rate, steps)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params: Params, opt_state: Any, batch: Batch):
        loss, grads = jax.value_and_grad(_base_loss, argnums=1)(model, params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="pre-training embedded base", disable=not progress, unit="step")
    for _ in bar:
        starts = rng.integers(0, len(ids) - span + 1, size=batch_size)
        windows = np.stack([ids[s : s + span] for s in starts])  # (B, T)
        params, opt_state, loss = step(params, opt_state, Batch(windows))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return params, losses


def mean_token_loss(model: GPT2, params: Params, ids: np.ndarray, *, batch_size: int = 16) -> float:
    """Average next-token loss (nats) over consecutive, non-overlapping windows of ``ids``.

    Windows hold ``n_positions`` tokens and share one token at their boundary
    (``lora_jax.training.text_data.heldout_windows``), so each token is predicted at most once.
    Every batch has the same shape (one compilation): the windows that do not fill a last
    batch, and a ragged tail shorter than a window, are dropped.
    """
    span = model.config.n_positions
    if len(ids) < span:
        raise ValueError(
            f"Need at least n_positions = {span} tokens to evaluate one window, got {len(ids)}; pass more text."
        )
    windows = heldout_windows(ids, span)
    batch = min(batch_size, len(windows))
    n_batches = len(windows) // batch
    windows = windows[: n_batches * batch].reshape(n_batches, batch, span)  # (N, B, T)
    return float(np.mean([float(_jitted_base_loss(model, params, Batch(chunk))) for chunk in windows]))
