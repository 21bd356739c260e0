"""Training updates LoRA only: frozen params bit-identical, no optimizer state for them, and the optax.masked trap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.adapter import Adapter
from lora_jax.config import LoraConfig
from lora_jax.counting import count_params
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
    adapter = init_lora(params, CONFIG, jax.random.key(1))
    ids = random_ids(3, batch=4, length=8)
    # The steps donate their adapter/full arguments; tests copy before training so the fixture survives.
    targets = jax.random.randint(jax.random.key(4), ids.shape, 0, 5)
    return model, params, adapter, {"ids": ids, "targets": targets}


def classification_loss(model):
    forward = lora_apply(model.apply)

    def loss_fn(adapter, frozen, batch, rng):
        logits = forward(frozen, adapter, batch["ids"], dropout_rng=rng)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    return loss_fn


def combined_loss(model):
    """The same loss over one combined tree: ``loss_fn(full, batch, rng)``."""
    inner = classification_loss(model)

    def loss_fn(full, batch, rng):
        frozen, weights = split(full)
        return inner(Adapter(weights, CONFIG), frozen, batch, rng)

    return loss_fn


def shapes(tree):
    return {tuple(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "shape")}


def copy(tree):
    return jax.tree_util.tree_map(jnp.copy, tree)


def bit_identical(x, y) -> bool:
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))


def test_split_step_trains_lora_and_leaves_frozen_bit_identical(setup):
    model, params, adapter, batch = setup
    frozen_before = jax.tree_util.tree_map(np.array, params)
    tx = optax.adamw(1e-2, weight_decay=0.01)
    step = make_train_step(classification_loss(model), tx)
    adapter = copy(adapter)
    opt_state = tx.init(adapter)
    # The optimizer state holds moments shaped like LoRA leaves only: (16, 2), (2, 16), (2, 5).
    assert shapes(opt_state) - {()} == {(16, 2), (2, 16), (2, 5)}
    losses = []
    for i in range(STEPS):
        adapter, opt_state, metrics = step(adapter, opt_state, params, batch, jax.random.key(i))
        losses.append(float(metrics["loss"]))
    assert bit_identical(params, frozen_before)
    assert losses[-1] < losses[0] - 0.1  # 20 AdamW steps at lr 1e-2 fit a 4x8-token batch noticeably
    assert float(jnp.abs(adapter.weights["head"]["lora_B"]).max()) > 0.0


def test_step_returns_an_adapter_with_its_config_and_state_for_lora_leaves_only(setup):
    model, params, adapter, batch = setup
    tx = optax.adam(1e-2)
    opt_state = tx.init(adapter)
    # Adam's moments are Adapters of the same config, and every non-scalar leaf of the state is one of them.
    mu, nu = opt_state[0].mu, opt_state[0].nu
    assert type(mu) is Adapter and mu.config is CONFIG and nu.config is CONFIG
    moments = [leaf for leaf in jax.tree_util.tree_leaves(opt_state) if np.ndim(leaf) > 0]
    # query and value: 16*2 + 2*16 each, in 2 layers; head: 16*2 + 2*5. mu and nu: twice that.
    assert sum(leaf.size for leaf in moments) == 2 * count_params(adapter) == 2 * (4 * 64 + 42)
    assert jax.tree_util.tree_structure(mu) == jax.tree_util.tree_structure(adapter)
    step = make_train_step(classification_loss(model), tx, donate=False)
    new, new_state, metrics = step(adapter, opt_state, params, batch, jax.random.key(0))
    assert type(new) is Adapter and new.config is CONFIG
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(adapter)
    assert jax.tree_util.tree_structure(new_state) == jax.tree_util.tree_structure(opt_state)
    # Adam's first step moves each entry by lr * g / (|g| + eps), i.e. by lr where the gradient is not tiny.
    # While B = 0 the gradient of A is zero, so look at the head's B.
    assert float(jnp.abs(new.weights["head"]["lora_B"] - adapter.weights["head"]["lora_B"]).max()) == pytest.approx(1e-2, rel=1e-3)
    assert float(metrics["grad_norm"]) > 0.0


def test_combined_tree_step_freezes_base_with_partition(setup):
    model, params, adapter, batch = setup
    loss_fn = combined_loss(model)
    tx = optax.adamw(1e-2, weight_decay=0.01)
    full = copy(combine(params, adapter))  # combine shares leaves; donating them would delete params
    opt_state = lora_optimizer(tx).init(full)
    # No moment has a base-kernel shape such as (16, 16) or (16, 32): set_to_zero keeps no state.
    assert shapes(opt_state) - {()} == {(16, 2), (2, 16), (2, 5)}
    step = make_combined_train_step(loss_fn, tx)
    for i in range(STEPS):
        full, opt_state, _ = step(full, opt_state, batch, jax.random.key(i))
    frozen_after, weights_after = split(full)
    assert bit_identical(frozen_after, params)
    assert float(jnp.abs(weights_after["head"]["lora_B"]).max()) > 0.0


def test_optax_masked_alone_drifts_frozen_weights(setup):
    """The trap this library avoids: masked() passes the frozen leaves' raw gradients through."""
    model, params, adapter, batch = setup
    loss_fn = combined_loss(model)
    full = combine(params, adapter)
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
