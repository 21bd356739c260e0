"""examples/qwix_lora_step.py: qwix's LoRA on the project's GPT-2 is the same model, loss and step as lora_jax's.

A tiny GPT-2 (tests/gpt2_fixtures.TINY, saved by transformers, read by the real loader), r=4 on
c_attn/c_proj/c_fc. The qwix row of compare_implementations.py is only fair if both start from the same
numbers and only qwix's LoRA leaves train; these tests hold it to that.
"""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("qwix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from example_scripts import EXAMPLES  # noqa: E402
from lora_jax import Batch, LoraConfig, init_lora, lm_loss, make_train_step  # noqa: E402
from lora_jax.forward import lora_apply  # noqa: E402
from lora_jax.gpt2.loading import load_gpt2  # noqa: E402
from lora_jax.gpt2.model import GPT2  # noqa: E402

sys.path.insert(0, str(EXAMPLES))
from qwix_lora_step import combine, from_lora_jax, qwix_gpt2, qwix_lm_loss, split_lora  # noqa: E402

TARGETS, RANK, ALPHA = ["c_attn", "c_proj", "c_fc"], 4, 8.0


@pytest.fixture(scope="module")
def setup(tiny_gpt2_dir):
    config, params = load_gpt2(tiny_gpt2_dir)
    model = GPT2(config)
    adapter = init_lora(params, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS), jax.random.key(2))
    # A non-zero B, so the LoRA branch changes the output and a wrong scaling or layout would show.
    adapter = jax.tree_util.tree_map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape), adapter)
    qmodel = qwix_gpt2(model, TARGETS, RANK, ALPHA)
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, config.vocab_size)
    shapes = jax.eval_shape(lambda: qmodel.init(jax.random.key(0), ids))["params"]
    return model, params, adapter, qmodel, from_lora_jax(split_lora(shapes)[0], adapter), Batch(ids)


def test_qwix_adapts_exactly_the_lora_jax_modules(setup):
    _, params, adapter, _, lora, _ = setup
    flat = jax.tree_util.tree_flatten_with_path(lora)[0]
    # 2 layers x 4 modules x (A, B) = 16 leaves, all named like qwix names them.
    assert len(flat) == 16 and all(str(path[-1].key).startswith("kernel_lora_") for path, _ in flat)
    assert sum(x.size for x in jax.tree_util.tree_leaves(lora)) == sum(x.size for x in jax.tree_util.tree_leaves(adapter.weights))


def test_forward_equals_lora_jax_forward(setup):
    model, params, adapter, qmodel, lora, batch = setup
    ours = lora_apply(model.apply)(params, adapter, batch.input_ids)
    theirs = qmodel.apply({"params": combine(lora, params)}, batch.input_ids)
    # Same float32 dots in the same order (x W0 + b, then s (x A) B): 1e-6 absolute leaves room for a
    # different XLA fusion; the LoRA branch itself moves the logits by far more (asserted below).
    assert float(jnp.max(jnp.abs(ours - theirs))) < 1e-6
    base = model.apply({"params": params}, batch.input_ids)
    assert float(jnp.max(jnp.abs(ours - base))) > 1e-3


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_training_matches_lora_jax_and_moves_only_lora_leaves(setup, chunk_size):
    model, params, adapter, qmodel, lora, batch = setup
    tx = optax.adamw(1e-2)
    ours_step = make_train_step(lm_loss(model, chunk_size=chunk_size), tx, donate=False)
    theirs_step = make_train_step(qwix_lm_loss(qmodel, chunk_size=chunk_size), tx, donate=False)
    ours, ours_opt, theirs, theirs_opt = adapter, tx.init(adapter), lora, tx.init(lora)
    rng = jax.random.key(3)
    for i in range(3):
        ours, ours_opt, ours_m = ours_step(ours, ours_opt, params, batch, rng)
        theirs, theirs_opt, theirs_m = theirs_step(theirs, theirs_opt, params, batch, rng)
        # float32 losses of the same program up to fusion order: 1e-5 relative.
        assert float(theirs_m["loss"]) == pytest.approx(float(ours_m["loss"]), rel=1e-5), i
    # Only LoRA leaves are trained (the step's output tree is the LoRA tree) and every one moved.
    assert jax.tree_util.tree_structure(theirs) == jax.tree_util.tree_structure(lora)
    moved = jax.tree_util.tree_map(lambda new, old: bool(jnp.any(new != old)), theirs, lora)
    assert all(jax.tree_util.tree_leaves(moved))
    # After 3 AdamW steps both hold the same A and B (1e-5 absolute: lr 1e-2 steps of float32 updates).
    same = from_lora_jax(lora, ours)
    diffs = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), theirs, same)
    assert max(jax.tree_util.tree_leaves(diffs)) < 1e-5


def test_mismatched_targets_are_refused(setup):
    _, params, _, _, lora, _ = setup
    other = init_lora(params, LoraConfig(rank=RANK, alpha=ALPHA, target_modules=["c_fc"]), jax.random.key(2))
    with pytest.raises(ValueError, match="differently from the lora_jax adapter"):
        from_lora_jax(lora, other)
    with pytest.raises(ValueError, match="no qwix LoRA leaves"):
        split_lora(params)
