"""The interception forward on a non-GPT-2 model and on GPT-2: values, factorisation, remat, bf16, dropout."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.adapter import Adapter
from lora_jax.config import LoraConfig
from lora_jax.forward import lora_apply, lora_branch, lora_interception
from lora_jax.gpt2.model import GPT2, GPT2Config, init_gpt2_params
from lora_jax.initialize import init_lora
from lora_jax.merge import merge
from tests.lora_jax.encoder_model import Encoder, init_encoder, random_ids, with_random_b

CONFIG = LoraConfig(rank=4, alpha=8.0, target_modules=["query", "value", "ffn_out", "head"])


@pytest.fixture(scope="module")
def setup():
    model = Encoder()
    params = init_encoder(model)
    lora = with_random_b(init_lora(params, CONFIG, jax.random.key(1)))
    return model, params, lora, random_ids(0)


def test_zero_b_is_the_base_model(setup):
    model, params, _, ids = setup
    fresh = init_lora(params, CONFIG, jax.random.key(1))
    # Op by op the zero branch is added exactly: bit-identical.
    with jax.disable_jit():
        eager = lora_apply(model.apply)(params, fresh, ids[:1, :3])
        assert bool(jnp.array_equal(eager, model.apply({"params": params}, ids[:1, :3])))
    # Jitted, the two programs may fuse differently: within a few fp32 ulps of outputs of order 1.
    adapted = jax.jit(lora_apply(model.apply))(params, fresh, ids)
    np.testing.assert_allclose(adapted, jax.jit(model.apply)({"params": params}, ids), atol=1e-6, rtol=0)


def test_equals_the_merged_model(setup):
    model, params, lora, ids = setup
    with jax.default_matmul_precision("highest"):
        adapted = jax.jit(lora_apply(model.apply))(params, lora, ids)
        merged = jax.jit(model.apply)({"params": merge(params, lora)}, ids)
        base = jax.jit(model.apply)({"params": params}, ids)
    # fp32 through 2 layers with outputs of order 1: reassociating x(W0+sAB) vs xW0 + s(xA)B
    # differs by a few ulps per op, so 1e-5 absolute is ample while the LoRA effect is ~1e-1.
    assert float(jnp.abs(adapted - merged).max()) < 1e-5
    assert float(jnp.abs(adapted - base).max()) > 1e-2


def test_branch_added_only_to_targeted_dense_layers(setup):
    model, params, lora, ids = setup
    only_head = Adapter({"head": lora.weights["head"]}, CONFIG)

    @jax.jit
    def adapted(p, lo, i):
        # The context is entered inside the jitted function, so it is part of the trace.
        with lora_interception(lo):
            return model.apply({"params": p}, i)

    out = adapted(params, only_head, ids)
    # Expected: the base output plus s (h A) B on the head, with h the encoder's output.
    capture = jax.jit(lambda p, i: model.apply({"params": p}, i, capture_intermediates=True, mutable=["intermediates"]))
    base, state = capture(params, ids)
    h = state["intermediates"]["encoder"]["__call__"][0]
    a, b = only_head.weights["head"]["lora_A"], only_head.weights["head"]["lora_B"]
    expected = base + lora_branch(h, a, b, CONFIG.scaling, dtype=jnp.float32)
    np.testing.assert_allclose(out, expected, atol=1e-6, rtol=0)  # fp32, one addition reordered


def dot_output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Output shapes of every dot_general in a jaxpr, sub-jaxprs (jit, remat, scan) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else [value]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes.extend(dot_output_shapes(inner))
    return shapes


@pytest.mark.parametrize("remat", [False, True])
def test_training_graph_never_builds_a_kernel_sized_product(setup, remat):
    _, params, lora, ids = setup
    forward = lora_apply(Encoder(remat=remat).apply)
    loss = lambda lo: jnp.mean(forward(params, lo, ids) ** 2)
    shapes = dot_output_shapes(jax.make_jaxpr(jax.grad(loss))(lora).jaxpr)
    # Kernels are (16,16), (16,32), (32,16), (16,5): no 2-D product of those shapes (W0 + sAB or dW0) exists.
    kernel_shapes = {(16, 16), (16, 32), (32, 16), (16, 5)}
    assert not kernel_shapes & set(shapes)
    assert (16, 4) in shapes and (4, 16) in shapes  # the dA and dB products do exist


def test_dropout_is_keyed_per_call_and_per_module(setup):
    model, params, lora, ids = setup
    config = LoraConfig(rank=4, alpha=8.0, target_modules=CONFIG.target_modules, dropout=0.5)
    forward = jax.jit(lora_apply(model.apply))
    lora = Adapter(lora.weights, config)
    plain = forward(params, lora, ids)
    first = forward(params, lora, ids, dropout_rng=jax.random.key(3))
    assert bool(jnp.array_equal(first, forward(params, lora, ids, dropout_rng=jax.random.key(3))))
    assert not bool(jnp.array_equal(first, forward(params, lora, ids, dropout_rng=jax.random.key(4))))
    assert not bool(jnp.array_equal(first, plain))


def test_dropout_scales_kept_inputs():
    x = jnp.ones((1000, 2))
    out = lora_branch(x, jnp.eye(2), jnp.eye(2), 1.0, dtype=jnp.float32, dropout=0.25, rng=jax.random.key(0))
    values = set(np.unique(np.asarray(out)).tolist())
    assert len(values) == 2 and min(values) == 0.0
    assert max(values) == pytest.approx(1 / 0.75, rel=1e-6)  # inverted dropout: kept inputs scaled by 1/(1-p)
    assert abs(float((out == 0).mean()) - 0.25) < 0.05  # 2000 Bernoulli draws: 5 sigma is about 0.05


def test_strict_mode_reports_lora_modules_the_model_never_called(setup):
    model, params, lora, ids = setup
    stray = Adapter({"decoder": lora.weights["head"], **lora.weights}, CONFIG)
    # The check runs while tracing, so eval_shape (trace only, no compile) exercises it.
    with pytest.raises(ValueError, match=r"\['decoder'\] were never called"):
        jax.eval_shape(lora_apply(model.apply), params, stray, ids)
    out = jax.eval_shape(lora_apply(model.apply, strict=False), params, stray, ids)
    assert out.shape == (2, 6, 5)


@pytest.fixture(scope="module")
def gpt2_setup():
    gpt = GPT2Config(vocab_size=31, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    params = init_gpt2_params(gpt, jax.random.key(0))
    config = LoraConfig(rank=2, alpha=4.0, target_modules=["c_attn", "c_proj", "c_fc"])
    lora = with_random_b(init_lora(params, config, jax.random.key(1)), scale=1.0)
    return gpt, params, config, lora, random_ids(5, batch=2, length=8, vocab=31)


def gpt2_loss(gpt, config, ids, **model_kwargs):
    forward = lora_apply(GPT2(gpt, **model_kwargs).apply)

    def loss(lora, params):
        logits = forward(params, lora, ids)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def test_gpt2_remat_and_bf16(gpt2_setup):
    gpt, params, config, lora, ids = gpt2_setup
    branch_dtypes = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name == "c_fc":
            branch_dtypes.append(out.dtype)
        return out

    with jax.default_matmul_precision("highest"):
        (value, logits), grads = gpt2_loss(gpt, config, ids)(lora, params)
        (value_r, logits_r), grads_r = gpt2_loss(gpt, config, ids, remat=True)(lora, params)
        with nn.intercept_methods(record):  # outermost: sees c_fc's output after LoRA added its branch
            (value_h, logits_h), grads_h = gpt2_loss(gpt, config, ids, dtype=jnp.bfloat16)(lora, params)
        base = jax.jit(lambda p: GPT2(gpt).apply({"params": p}, ids))(params)
    assert float(jnp.abs(logits - base).max()) > 1e-3  # the branches are active (GPT-2 init weights are small)
    # remat replays the same fp32 ops: equal up to fusion-level rounding.
    np.testing.assert_allclose(logits_r, logits, atol=1e-6, rtol=0)
    jax.tree_util.tree_map(lambda g, gr: np.testing.assert_allclose(gr, g, atol=1e-6, rtol=1e-5), grads, grads_r)
    # bf16 compute: the branch runs in bf16, LoRA gradients come back fp32, logits within bf16
    # rounding (8 mantissa bits, ~1e-2 here).
    assert branch_dtypes == [jnp.dtype(jnp.bfloat16)]
    assert {g.dtype for g in jax.tree_util.tree_leaves(grads_h)} == {jnp.dtype(jnp.float32)}
    assert float(jnp.abs(logits_h - logits).max()) < 5e-2



def test_adapter_carries_its_scale_and_none_runs_the_base(setup):
    model, params, lora, ids = setup
    forward = jax.jit(lora_apply(model.apply))
    base = jax.jit(model.apply)({"params": params}, ids)
    # Two jitted programs of the same ops may fuse differently: a few fp32 ulps on outputs of order 1.
    np.testing.assert_allclose(forward(params, None, ids), base, atol=1e-6, rtol=0)
    # On the output layer alone the branch adds linearly: the same weights under a config with
    # twice the alpha add exactly twice the change. The scale comes from the adapter; no call
    # site can pass another one.
    head = {"head": lora.weights["head"]}
    single = Adapter(head, CONFIG)
    doubled = Adapter(head, LoraConfig(rank=4, alpha=16.0, target_modules=CONFIG.target_modules))
    with jax.default_matmul_precision("highest"):
        delta = forward(params, single, ids) - base
        delta2 = forward(params, doubled, ids) - base
    np.testing.assert_allclose(delta2, 2 * delta, atol=1e-5, rtol=0)  # fp32, outputs of order 1
    assert float(jnp.abs(delta).max()) > 1e-2


def test_a_bare_tree_or_a_wrong_rank_is_refused(setup):
    model, params, lora, ids = setup
    forward = lora_apply(model.apply)
    with pytest.raises(TypeError, match=r"lora_jax.Adapter\(weights, config\)"):
        forward(params, lora.weights, ids)
    wrong_rank = Adapter(lora.weights, LoraConfig(rank=2, alpha=8.0, target_modules=CONFIG.target_modules))
    with pytest.raises(ValueError, match="says rank 2"):
        jax.eval_shape(forward, params, wrong_rank, ids)
    with pytest.raises(TypeError, match="lora_apply"):
        lora_apply(CONFIG)
