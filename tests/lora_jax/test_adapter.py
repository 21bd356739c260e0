"""The adapter value: a pytree whose leaves are the LoRA arrays and whose config is static."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_jax.adapter import Adapter, checked_modules
from lora_jax.config import LoraConfig
from lora_jax.initialize import init_lora
from tests.lora_jax.encoder_model import Encoder, init_encoder

CONFIG = LoraConfig(rank=2, alpha=6.0, target_modules=["query", "head"])


@pytest.fixture(scope="module")
def adapter():
    return init_lora(init_encoder(Encoder()), CONFIG, jax.random.key(0))


def test_leaves_are_the_arrays_and_the_config_is_static(adapter):
    leaves, treedef = jax.tree_util.tree_flatten(adapter)
    assert len(leaves) == 2 * 3  # query in 2 layers, plus head; A and B each
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, Adapter) and rebuilt.config is CONFIG
    # Two adapters with different configs have different tree structures, so jit retraces and
    # optax refuses to mix their states instead of silently reusing one config for the other.
    other = Adapter(adapter.weights, LoraConfig(rank=2, alpha=12.0, target_modules=["query", "head"]))
    assert jax.tree_util.tree_structure(other) != treedef


def test_jit_grad_and_optax_keep_the_config(adapter):
    def loss(a: Adapter) -> jax.Array:
        return sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(a)) * a.config.scaling

    grads = jax.jit(jax.grad(loss))(adapter)
    assert isinstance(grads, Adapter) and grads.config is CONFIG
    a = adapter.weights["head"]["lora_A"]
    np.testing.assert_allclose(grads.weights["head"]["lora_A"], 2 * 3.0 * a, rtol=1e-6)  # d/da (s a^2), s = 3
    tx = optax.sgd(0.5)
    updates, _ = tx.update(grads, tx.init(adapter), adapter)
    stepped = optax.apply_updates(adapter, updates)
    assert stepped.config is CONFIG
    np.testing.assert_allclose(stepped.weights["head"]["lora_A"], a - 0.5 * 6.0 * a, rtol=1e-6)


def test_modules_scaling_and_rank(adapter):
    paths = list(adapter.modules())
    assert paths[-1] == ("head",) and len(paths) == 3
    assert adapter.scaling(("head",)) == 3.0 and adapter.rank(("head",)) == 2


def test_checked_modules_refuses_bare_trees_and_wrong_ranks(adapter):
    with pytest.raises(TypeError, match=r"wrap it as lora_jax.Adapter\(weights, config\)"):
        checked_modules(adapter.weights)
    with pytest.raises(TypeError, match="got LoraConfig"):
        checked_modules(CONFIG)
    with pytest.raises(ValueError, match="'head' has A \\(16, 2\\) and B \\(2, 5\\), but its config says rank 4"):
        checked_modules(Adapter({"head": adapter.weights["head"]}, LoraConfig(rank=4, target_modules=["head"])))


PATTERNED = LoraConfig(rank=2, alpha=6.0, target_modules=["query", "head"], rank_pattern={"layers.1.query": 3},
                       alpha_pattern={"head": 1.5})


def test_rank_and_scaling_are_per_module_with_patterns():
    adapter = init_lora(init_encoder(Encoder()), PATTERNED, jax.random.key(0))
    got = {".".join(path): (a.shape[1], b.shape[0], adapter.rank(path), adapter.scaling(path))
           for path, (a, b) in adapter.modules().items()}
    assert got == {"encoder.layers.0.query": (2, 2, 2, 3.0), "encoder.layers.1.query": (3, 3, 3, 2.0),
                   "head": (2, 2, 2, 0.75)}


def test_a_module_whose_shape_disagrees_with_its_pattern_rank_is_refused():
    adapter = init_lora(init_encoder(Encoder()), PATTERNED, jax.random.key(0))
    uniform = Adapter(adapter.weights, LoraConfig(rank=2, alpha=6.0, target_modules=["query", "head"]))
    with pytest.raises(ValueError, match=r"LoRA module 'encoder\.layers\.1\.query' has A \(\d+, 3\) and B \(3, \d+\), but its "
                                         r"config says rank 2"):
        checked_modules(uniform)
