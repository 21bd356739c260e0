"""Many adapters in lora_jax - switching, mixed batches, weighted combinations, PEFT's multi-adapter layout -
proven against PEFT 0.21 on a tiny GPT-2, and combinations against the dense float64 sum.

Three PEFT adapters differ in rank (2, 4, 1), alpha, rsLoRA (on for "b") and targets ("c" adapts c_fc only);
every B is drawn N(0, 0.3), so each adapter moves the logits by more than 0.1.

Numerics: float32, highest matmul precision. Logits agree with PEFT's to ~5e-7 (summation order; the issue
asks 2e-5, checked at 1e-5); a mixed batch that sends an example to another adapter, or to none, moves
its logits by more than 0.1 (asserted). Gradients are compared relative to each tensor's largest entry at
2e-5 (two float32 backward programs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

import lora_jax
from peft_compare import flax_gpt2, max_error
from peft_compare import hf_gpt2 as base_model
from peft_compare import jax_logits as shared_jax_logits
from peft_compare import torch_logits as shared_torch_logits
from lora_jax import BASE_NAME
from lora_jax.lora_tree import get_module
from lora_jax.targets import dotted_name

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

CONFIGS = {
    "default": dict(r=2, lora_alpha=5, target_modules=["c_attn", "c_proj"]),
    "b": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_rslora=True),
    "c": dict(r=1, lora_alpha=3, target_modules=["c_fc"]),
}
IDS = np.array([[5, 17, 99, 3, 42, 0, 7, 64], [1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 8, 7, 6, 5, 4, 3],
                [11, 12, 13, 14, 15, 16, 17, 18], [60, 50, 40, 30, 20, 10, 0, 1]])
MIXED = ["b", "default", BASE_NAME, "c", "b"]
LOGITS_ATOL = 1e-5
GRAD_RTOL = 2e-5


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return flax_gpt2(tiny_gpt2_dir)


@pytest.fixture(scope="module")
def peft_multi(tiny_gpt2_dir, tmp_path_factory):
    """A PeftModel holding the three adapters, B ~ N(0, 0.3), saved with save_pretrained (PEFT's layout)."""
    torch.manual_seed(0)
    model = peft.get_peft_model(base_model(tiny_gpt2_dir), peft.LoraConfig(**CONFIGS["default"]))
    for name in ("b", "c"):
        model.add_adapter(name, peft.LoraConfig(**CONFIGS[name]))
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key:
                param.normal_(0.0, 0.3)
    directory = tmp_path_factory.mktemp("peft_multi")
    model.save_pretrained(directory)
    return directory, model.eval()


@pytest.fixture(scope="module")
def adapters(gpt2, peft_multi):
    return lora_jax.load_adapters(peft_multi[0], gpt2[1])


def jax_logits(gpt2, adapter, ids=IDS, **kwargs) -> np.ndarray:
    return shared_jax_logits(gpt2, adapter, ids, **kwargs)


def torch_logits(model, ids=IDS, **kwargs) -> np.ndarray:
    return shared_torch_logits(model, ids, **kwargs)


def test_peft_multi_adapter_layout_loads_every_adapter(adapters, peft_multi):
    assert adapters.names == ("default", "b", "c") and adapters.active == ("default",)
    assert sorted(p.name for p in peft_multi[0].iterdir() if p.is_dir()) == ["b", "c"]
    assert [adapters.adapters[n].config.rank for n in adapters.names] == [2, 4, 1]
    assert adapters.adapters["b"].config.use_rslora


@pytest.mark.parametrize("name", ["default", "b", "c"])
def test_switching_matches_peft_set_adapter(gpt2, adapters, peft_multi, name):
    _, model = peft_multi
    model.set_adapter(name)
    ours = jax_logits(gpt2, adapters.with_active(name))
    assert max_error(ours, jax_logits(gpt2, None)) > 0.1
    np.testing.assert_allclose(ours, torch_logits(model), atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_array_equal(jax_logits(gpt2, adapters.with_active()), jax_logits(gpt2, None))
    model.set_adapter("default")


def test_mixed_batch_matches_peft_adapter_names(gpt2, adapters, peft_multi):
    _, model = peft_multi
    ours = jax_logits(gpt2, adapters, adapter_names=MIXED)
    np.testing.assert_allclose(ours, torch_logits(model, adapter_names=MIXED), atol=LOGITS_ATOL, rtol=0)
    for row, name in enumerate(MIXED):  # each row is its own adapter's (or the base model's) output
        alone = jax_logits(gpt2, adapters.with_active(*([] if name == BASE_NAME else [name])), IDS[row:row + 1])
        np.testing.assert_allclose(ours[row:row + 1], alone, atol=LOGITS_ATOL, rtol=0)
    routed_wrong = jax_logits(gpt2, adapters, adapter_names=["default", "b", "c", BASE_NAME, "c"])
    assert max_error(routed_wrong[0], ours[0]) > 0.1 and max_error(routed_wrong[3], ours[3]) > 0.1


def test_mixed_batch_ids_work_under_jit(gpt2, adapters):
    model, params = gpt2
    forward = jax.jit(lora_jax.lora_apply(model.apply))
    ids = adapters.example_ids(MIXED)
    with jax.default_matmul_precision("highest"):
        jitted = np.asarray(forward(params, adapters, jnp.asarray(IDS), adapter_names=ids))
    np.testing.assert_allclose(jitted, jax_logits(gpt2, adapters, adapter_names=MIXED), atol=1e-6, rtol=0)


def _peft_grads(model) -> dict[tuple[str, str, str], np.ndarray]:
    model.zero_grad()
    for key, param in model.named_parameters():
        param.requires_grad_(".lora_" in key)  # PEFT makes only the active adapter trainable
    ids = torch.as_tensor(IDS)
    model(ids, labels=ids, adapter_names=MIXED).loss.backward()
    grads = {}
    for key, param in model.named_parameters():
        if param.grad is not None and ".lora_" in key:
            module, rest = key.removeprefix("base_model.model.").split(".lora_")
            leaf, adapter = rest.split(".")[:2]
            grads[(adapter, module, f"lora_{leaf}")] = param.grad.numpy().T
    return grads


def test_mixed_batch_gradients_match_peft(gpt2, adapters, peft_multi):
    _, model = peft_multi
    theirs = _peft_grads(model)  # in eval mode: PEFT refuses adapter_names in training mode; no dropout here anyway
    batch = lora_jax.Batch(jnp.asarray(IDS), adapter_ids=adapters.example_ids(MIXED))
    with jax.default_matmul_precision("highest"):
        grads = jax.grad(lora_jax.lm_loss(gpt2[0]))(adapters, gpt2[1], batch, None)
    ours = {}
    for name, adapter in grads.adapters.items():
        for path in adapter.modules():
            for leaf, value in get_module(adapter.weights, path).items():
                ours[(name, dotted_name(path), leaf)] = np.asarray(value)
    assert sorted(ours) == sorted(theirs) and len(ours) == 24
    for key, grad in theirs.items():
        scale = float(np.max(np.abs(grad)))
        assert scale > 0, key
        np.testing.assert_allclose(ours[key], grad, atol=GRAD_RTOL * scale, rtol=0, err_msg=str(key))


def test_a_mixed_batch_trains_each_adapter_on_its_own_examples_only(gpt2, adapters):
    # "c" gets no example: SGD leaves it bit for bit; the others move.
    names = ["b", "default", BASE_NAME, "b", "default"]
    tx = optax.sgd(1e-2)
    step = lora_jax.make_train_step(lora_jax.lm_loss(gpt2[0]), tx, donate=False)
    batch = lora_jax.Batch(jnp.asarray(IDS), adapter_ids=adapters.example_ids(names))
    new, _, _ = step(adapters, tx.init(adapters), gpt2[1], batch, None)
    for name in adapters.names:
        before, after = jax.tree_util.tree_leaves(adapters.adapters[name]), jax.tree_util.tree_leaves(new.adapters[name])
        changed = any(not np.array_equal(x, y) for x, y in zip(before, after))
        assert changed == (name != "c"), name


def test_mixed_generation_equals_each_adapter_alone(gpt2, adapters):
    model, params = gpt2
    forward = lora_jax.lora_apply(model.apply)
    prompts = jnp.asarray(IDS[:, :4])
    ids = adapters.example_ids(MIXED)

    def mixed(p, tokens, cache):
        return forward(p[0], p[1], tokens, cache=cache, adapter_names=p[2])

    out = lora_jax.generate(model, (params, adapters, ids), prompts, max_new_tokens=4, apply_fn=mixed)
    for row, name in enumerate(MIXED):
        single = adapters.with_active(*([] if name == BASE_NAME else [name]))

        def alone(p, tokens, cache, single=single):
            return forward(p, single, tokens, cache=cache)

        want = lora_jax.generate(model, params, prompts[row:row + 1], max_new_tokens=4, apply_fn=alone)
        np.testing.assert_array_equal(out[row:row + 1], want)


def test_a_mixed_batch_costs_one_branch_per_example_not_k(gpt2, adapters):
    # XLA's own FLOP count of the compiled forward: 3 adapters + base in one batch against one adapter.
    model, params = gpt2
    forward = lora_jax.lora_apply(model.apply)
    tokens = jnp.asarray(IDS)
    single = adapters.with_active("b")
    flops_single = jax.jit(forward).lower(params, single, tokens).compile().cost_analysis()["flops"]
    flops_mixed = jax.jit(forward).lower(params, adapters, tokens, adapter_names=adapters.example_ids(MIXED)
                                         ).compile().cost_analysis()["flops"]
    # Every rank is padded to the module's largest (4, as "b"), so the mixed batch does one rank-4 branch per example.
    assert flops_mixed < 1.2 * flops_single


def test_combinations_are_exact_where_peft_is_and_stay_exact_with_rslora(adapters, peft_multi):
    _, model = peft_multi
    combined = lora_jax.add_weighted_adapter(adapters, ["default", "b", "c"], [0.7, -0.4, 1.3], "cat", "cat")
    cat = combined.adapters["cat"]
    assert cat.config.rank == 7 and cat.scaling(("transformer", "h", "0", "mlp", "c_fc")) == 1.0
    for path, (a, b) in cat.modules().items():
        want = sum(w * np.asarray(adapters.adapters[n].modules()[path][0], np.float64)
                   @ np.asarray(adapters.adapters[n].modules()[path][1], np.float64) * adapters.adapters[n].scaling(path)
                   for n, w in zip(["default", "b", "c"], [0.7, -0.4, 1.3]) if path in adapters.adapters[n].modules())
        got = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
        # float32 factors of a float64 exact result: relative error ~1e-7.
        np.testing.assert_allclose(got, want, atol=1e-6 * np.abs(want).max(), rtol=0)
    # PEFT with the same inputs: its combined adapter has r' = 7, lora_alpha 7 and the first adapter's use_rslora (off
    # here), so it is exact too, and its factors are ours.
    model.add_weighted_adapter(["default", "b", "c"], [0.7, -0.4, 1.3], "cat_peft", combination_type="cat")
    peft_layer = model.base_model.model.transformer.h[0].attn.c_attn
    ours_a, ours_b = cat.modules()[("transformer", "h", "0", "attn", "c_attn")]
    np.testing.assert_allclose(np.asarray(ours_a), peft_layer.lora_A["cat_peft"].weight.detach().numpy().T, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ours_b), peft_layer.lora_B["cat_peft"].weight.detach().numpy().T, atol=1e-6)
    assert peft_layer.scaling["cat_peft"] == 1.0
    model.delete_adapter("cat_peft")


def test_peft_cat_is_off_by_sqrt_rank_when_the_first_adapter_uses_rslora(adapters, peft_multi):
    _, model = peft_multi
    ours = lora_jax.add_weighted_adapter(adapters, ["b", "default"], [1.0, 1.0], "cat", "cat").adapters["cat"]
    model.add_weighted_adapter(["b", "default"], [1.0, 1.0], "cat_rs", combination_type="cat")
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    assert layer.scaling["cat_rs"] == pytest.approx(np.sqrt(6))  # r' = 6, alpha 6, rsLoRA from "b": 6 / sqrt(6)
    assert ours.scaling(("transformer", "h", "0", "attn", "c_attn")) == 1.0
    model.delete_adapter("cat_rs")


def test_removing_or_combining_never_changes_the_others(gpt2, adapters):
    before = jax.tree_util.tree_map(np.array, adapters)
    params_before = jax.tree_util.tree_map(np.array, gpt2[1])
    lora_jax.add_weighted_adapter(adapters, ["default", "c"], [1.0, 2.0], "new", "svd", svd_rank=2)
    adapters.remove("b")
    for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(adapters)):
        assert np.array_equal(x, y)
    for x, y in zip(jax.tree_util.tree_leaves(params_before), jax.tree_util.tree_leaves(gpt2[1])):
        assert np.array_equal(x, y)


def test_a_set_saved_here_loads_in_peft_adapter_by_adapter(gpt2, adapters, tiny_gpt2_dir, tmp_path):
    lora_jax.save_adapters(tmp_path, adapters)
    theirs = peft.PeftModel.from_pretrained(base_model(tiny_gpt2_dir), tmp_path)
    for name in ("b", "c"):
        theirs.load_adapter(tmp_path / name, adapter_name=name)
    theirs.eval()
    for name in adapters.names:
        theirs.set_adapter(name)
        np.testing.assert_allclose(torch_logits(theirs), jax_logits(gpt2, adapters.with_active(name)),
                                   atol=LOGITS_ATOL, rtol=0)
    assert lora_jax.load_adapters(tmp_path, gpt2[1]).names == ("default", "b", "c")


def test_bad_input_is_refused_with_the_fix(gpt2, adapters):
    with pytest.raises(ValueError, match=r"adapter_names \['zz'\] do not exist; this set holds \['default', 'b', 'c'\]"):
        jax_logits(gpt2, adapters, adapter_names=["zz"] * 5)
    with pytest.raises(ValueError, match="adapter_names has 2 entries for a batch of 5 examples"):
        jax_logits(gpt2, adapters, adapter_names=["b", "c"])
    with pytest.raises(ValueError, match="an adapter named 'b' exists already"):
        adapters.add("b", adapters.adapters["c"])
    with pytest.raises(ValueError, match="needs the same rank"):
        lora_jax.add_weighted_adapter(adapters, ["default", "b"], [1.0, 1.0], "lin", "linear")
    with pytest.raises(ValueError, match="must be finite numbers"):
        lora_jax.add_weighted_adapter(adapters, ["default", "b"], [1.0, float("nan")], "x", "cat")
    with pytest.raises(ValueError, match="repeat one"):
        lora_jax.add_weighted_adapter(adapters, ["b", "b"], [1.0, 1.0], "x", "cat")
    foreign = lora_jax.Adapter({"encoder": {"q": {"lora_A": jnp.zeros((32, 1)), "lora_B": jnp.zeros((1, 32))}}},
                               lora_jax.LoraConfig(rank=1, target_modules=["q"]))
    with pytest.raises(ValueError, match=r"\['encoder.q'\] were never called"):
        jax_logits(gpt2, adapters.add("foreign", foreign), adapter_names=["foreign"] * 5)
