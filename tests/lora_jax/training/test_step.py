"""Training updates LoRA only: frozen params bit-identical, no optimizer state for them, and the optax.masked trap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.config import LoraConfig
from lora_jax.forward import lora_apply
from lora_jax.initialize import init_lora
from lora_jax.partition import combine, split, trainable_mask
from lora_jax.training.step import lora_optimizer, make_combined_train_step, make_train_step
from tests.lora_jax.encoder_model import Encoder, init_encoder, random_ids

CONFIG = LoraConfig(rank=2, alpha=4.0, target_modules=["query", "value", "head"], dropout=0.1)
STEPS = 20


@pytest.fixture(scope="module")
def setup():
    model = Encoder()
    params = init_encoder(model)
    lora = init_lora(params, CONFIG, jax.random.key(1))
    ids = random_ids(3, batch=4, length=8)
    # The steps donate their lora/full arguments; tests copy before training so the fixture survives.
    targets = jax.random.randint(jax.random.key(4), ids.shape, 0, 5)
    return model, params, lora, {"ids": ids, "targets": targets}


def classification_loss(model):
    forward = lora_apply(model.apply, CONFIG)

    def loss_fn(lora, frozen, batch, rng):
        logits = forward(frozen, lora, batch["ids"], dropout_rng=rng)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    return loss_fn


def combined_loss(model):
    """The same loss over one combined tree: ``loss_fn(full, batch, rng)``."""
    inner = classification_loss(model)

    def loss_fn(full, batch, rng):
        frozen, lo = split(full)
        return inner(lo, frozen, batch, rng)

    return loss_fn


def shapes(tree):
    return {tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "shape")}


def copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def bit_identical(x, y) -> bool:
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))


def test_split_step_trains_lora_and_leaves_frozen_bit_identical(setup):
    model, params, lora, batch = setup
    frozen_before = jax.tree_util.tree_map(np.array, params)
    tx = optax.adamw(1e-2, weight_decay=0.01)
    step = make_train_step(classification_loss(model), tx)
    lora = copy(lora)
    opt_state = tx.init(lora)
    # The optimizer state holds moments shaped like LoRA leaves only: (16, 2), (2, 16), (2, 5).
    assert shapes(opt_state) - {()} == {(16, 2), (2, 16), (2, 5)}
    losses = []
    for i in range(STEPS):
        lora, opt_state, metrics = step(lora, opt_state, params, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert bit_identical(params, frozen_before)
    assert losses[-1] < losses[0] - 0.1  # 20 AdamW steps at lr 1e-2 fit a 4x8-token batch noticeably
    assert float(jnp.abs(lora["head"]["lora_B"]).max()) > 0.0


def test_combined_tree_step_freezes_base_with_partition(setup):
    model, params, lora, batch = setup
    loss_fn = combined_loss(model)
    tx = optax.adamw(1e-2, weight_decay=0.01)
    full = copy(combine(params, lora))  # combine shares leaves; donating them would delete params
    opt_state = lora_optimizer(tx).init(full)
    # No moment has a base-kernel shape such as (16, 16) or (16, 32): set_to_zero keeps no state.
    assert shapes(opt_state) - {()} == {(16, 2), (2, 16), (2, 5)}
    step = make_combined_train_step(loss_fn, tx)
    for i in range(STEPS):
        full, opt_state, _ = step(full, opt_state, batch, jax.random.key(i))
    frozen_after, lora_after = split(full)
    assert bit_identical(frozen_after, params)
    assert float(jnp.abs(lora_after["head"]["lora_B"]).max()) > 0.0


def test_optax_masked_alone_drifts_frozen_weights(setup):
    """The trap this library avoids: masked() passes the frozen leaves' raw gradients through."""
    model, params, lora, batch = setup
    loss_fn = combined_loss(model)
    full = combine(params, lora)
    tx = optax.masked(optax.adam(1e-2), trainable_mask(full))
    opt_state = tx.init(full)
    grads = jax.jit(jax.grad(loss_fn))(full, batch, jax.random.key(0))
    updates, _ = jax.jit(tx.update)(grads, opt_state, full)
    # The frozen head kernel's update IS its raw gradient, which is non-zero.
    np.testing.assert_array_equal(updates["head"]["kernel"], grads["head"]["kernel"])
    assert float(jnp.abs(grads["head"]["kernel"]).max()) > 1e-4
    drifted = optax.apply_updates(full, updates)
    assert not np.array_equal(drifted["head"]["kernel"], params["head"]["kernel"])


def test_bad_arguments_raise_before_tracing():
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        make_train_step(lambda *a: 0.0, "adam")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        make_train_step(None, optax.sgd(0.1))
