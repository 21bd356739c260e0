"""lora_jax's DoRA, proven against PEFT 0.21's own DoRA on a tiny GPT-2 (never against lora_torch alone).

Every adapter has a non-zero B (PEFT ``init_lora_weights=False``, or lora_jax's own ``False``) and a
magnitude moved away from its initial norm, so the direction, the norm and the magnitude all act.
Ranks 1 and 4 (non-square c_attn (32, 96) and c_fc (32, 128)), rsLoRA on and off.

Numerics: float32, ``jax.default_matmul_precision("highest")``. Logits agree to 2.5e-7 (measured, r=1
and 4, rsLoRA on and off; summation order: PEFT builds ``B A`` through an identity matrix and runs
the branch as two Linear layers); 1e-5 leaves 40x headroom while dropping the magnitude moves the
logits by more than 1e-2 (asserted). Gradients are compared relative to each tensor's largest entry:
measured at most 2.5e-6 (float32 backward through two different programs), checked at 2e-5; a norm
left in the gradient is off by more than 100x that (asserted).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

import lora_jax
from peft_compare import IDS, flax_gpt2, max_error, torch_logits
from peft_compare import hf_gpt2 as base_model
from peft_compare import jax_logits as shared_jax_logits
import lora_jax.dora as dora
from lora_jax.loraplus import loraplus_labels
from lora_jax.lora_tree import LORA_MAGNITUDE, get_module
from lora_jax.targets import dotted_name

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TARGETS = ["c_attn", "c_proj", "c_fc"]
LOGITS_ATOL = 1e-5  # module docstring
GRAD_RTOL = 2e-5  # module docstring


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return flax_gpt2(tiny_gpt2_dir)


def jax_logits(gpt2, adapter, params=None) -> np.ndarray:
    return shared_jax_logits(gpt2, adapter, IDS, params)


def peft_dora(model_dir, rank: int, use_rslora: bool, seed: int = 5) -> peft.PeftModel:
    """PEFT's DoRA with random B (``init_lora_weights=False``) and a magnitude scaled by U(0.5, 1.5)."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank + 1, target_modules=TARGETS, use_dora=True,
                             use_rslora=use_rslora, init_lora_weights=False, fan_in_fan_out=True)
    model = peft.get_peft_model(base_model(model_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand_like(param))
    return model.eval()


@pytest.fixture(scope="module", params=[(1, False), (4, False), (4, True)], ids=["r1", "r4", "r4_rslora"])
def peft_saved(request, tiny_gpt2_dir, tmp_path_factory):
    rank, use_rslora = request.param
    model = peft_dora(tiny_gpt2_dir, rank, use_rslora)
    directory = tmp_path_factory.mktemp("peft_dora")
    model.save_pretrained(directory)
    return directory, model


def test_a_peft_dora_adapter_loads_and_gives_peft_logits(gpt2, peft_saved, tiny_gpt2_dir):
    directory, model = peft_saved
    adapter = lora_jax.load_adapter(directory, gpt2[1])
    assert adapter.config.use_dora and len(adapter.magnitudes()) == 8
    ours = jax_logits(gpt2, adapter)
    assert max_error(ours, torch_logits(base_model(tiny_gpt2_dir))) > 1e-2  # the adapter acts
    np.testing.assert_allclose(ours, torch_logits(model), atol=LOGITS_ATOL, rtol=0)


def test_without_its_magnitude_the_adapter_gives_other_logits(gpt2, peft_saved):
    # The check above can fail: the same A and B as plain LoRA are far from PEFT's DoRA logits.
    directory, model = peft_saved
    adapter = lora_jax.load_adapter(directory, gpt2[1])
    plain = lora_jax.Adapter(_drop_magnitudes(adapter.weights), dataclasses.replace(adapter.config, use_dora=False))
    assert max_error(jax_logits(gpt2, plain), torch_logits(model)) > 1e-2


def _drop_magnitudes(tree):
    if isinstance(tree, dict):
        return {k: _drop_magnitudes(v) for k, v in tree.items() if k != LORA_MAGNITUDE}
    return tree


@pytest.mark.parametrize(("rank", "use_rslora"), [(1, False), (4, True)])
def test_a_lora_jax_dora_adapter_loads_in_peft_with_the_same_logits(gpt2, tiny_gpt2_dir, tmp_path, rank, use_rslora):
    config = lora_jax.LoraConfig(rank=rank, alpha=2.0 * rank + 1, target_modules=TARGETS, use_dora=True,
                                 use_rslora=use_rslora, init_lora_weights=False)
    adapter = lora_jax.init_lora(gpt2[1], config, jax.random.key(2))
    adapter = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 1.3 if path[-1].key == LORA_MAGNITUDE else x, adapter)
    lora_jax.save_adapter(tmp_path, adapter)
    theirs = peft.PeftModel.from_pretrained(base_model(tiny_gpt2_dir), tmp_path).eval()
    ours = jax_logits(gpt2, adapter)
    assert max_error(ours, torch_logits(base_model(tiny_gpt2_dir))) > 1e-2
    np.testing.assert_allclose(torch_logits(theirs), ours, atol=LOGITS_ATOL, rtol=0)


def test_a_fresh_dora_adapter_starts_at_peft_magnitude_and_computes_the_base_model(gpt2, tiny_gpt2_dir):
    torch.manual_seed(0)
    theirs = peft.get_peft_model(base_model(tiny_gpt2_dir), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True, fan_in_fan_out=True))
    adapter = lora_jax.init_lora(gpt2[1], lora_jax.LoraConfig(rank=4, alpha=8, target_modules=TARGETS, use_dora=True),
                                 jax.random.key(0))
    state = theirs.state_dict()
    for path, m in adapter.magnitudes().items():
        peft_m = state[f"base_model.model.{dotted_name(path)}.lora_magnitude_vector.default.weight"].numpy()
        # ||W0|| per output column, float32 norms of 32 to 128 terms: a few ulps apart at most.
        np.testing.assert_allclose(np.asarray(m), peft_m, rtol=1e-6, atol=0)
    np.testing.assert_allclose(jax_logits(gpt2, adapter), torch_logits(base_model(tiny_gpt2_dir)), atol=1e-5, rtol=0)


def _peft_grads(model) -> dict[str, np.ndarray]:
    model.zero_grad()
    ids = torch.as_tensor(IDS)
    model(ids, labels=ids).loss.backward()
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        module = name.removeprefix("base_model.model.").split(".lora_")[0]
        if ".lora_A." in name:
            grads[(module, "lora_A")] = param.grad.numpy().T
        elif ".lora_B." in name:
            grads[(module, "lora_B")] = param.grad.numpy().T
        elif "lora_magnitude_vector" in name:
            grads[(module, LORA_MAGNITUDE)] = param.grad.numpy()
    return grads


def _jax_grads(gpt2, adapter) -> dict[tuple[str, str], np.ndarray]:
    model, params = gpt2
    loss_fn = lora_jax.lm_loss(model)
    with jax.default_matmul_precision("highest"):
        grads = jax.grad(loss_fn)(adapter, params, lora_jax.Batch(jnp.asarray(IDS)), None)
    flat = {}
    for path in grads.modules():
        for leaf, value in get_module(grads.weights, path).items():
            flat[(dotted_name(path), leaf)] = np.asarray(value)
    return flat


def test_gradients_of_a_b_and_magnitude_match_peft(gpt2, peft_saved):
    directory, model = peft_saved
    adapter = lora_jax.load_adapter(directory, gpt2[1])
    theirs, ours = _peft_grads(model), _jax_grads(gpt2, adapter)
    assert sorted(theirs) == sorted(ours) and len(ours) == 24
    for key, grad in theirs.items():
        scale = float(np.max(np.abs(grad)))
        assert scale > 0, key
        np.testing.assert_allclose(ours[key], grad, atol=GRAD_RTOL * scale, rtol=0, err_msg=str(key))


def test_the_weight_norm_is_detached_from_the_gradient(gpt2, peft_saved):
    # A norm that took part in the gradient (a planted bug) gives different A and B gradients: the check above
    # would catch it. Computed here through lora_jax.dora with the stop_gradient removed.
    directory, model = peft_saved
    adapter = lora_jax.load_adapter(directory, gpt2[1])
    theirs = _peft_grads(model)
    original = dora.weight_norm
    try:
        dora.weight_norm = lambda k, a, b, s: jnp.linalg.norm(jnp.asarray(k, jnp.float32) + lora_jax.lora_delta(a, b, s),
                                                              axis=0)
        attached = _jax_grads(gpt2, adapter)
    finally:
        dora.weight_norm = original
    worst = max(max_error(attached[key], grad) / float(np.max(np.abs(grad))) for key, grad in theirs.items())
    assert worst > 100 * GRAD_RTOL, worst


def _kernel(params, name):
    return np.asarray(get_module(params, tuple(name.split(".")))["kernel"])


def test_merge_matches_peft_merge_and_unmerge_restores_the_base(gpt2, peft_saved, tiny_gpt2_dir):
    directory, _ = peft_saved
    adapter = lora_jax.load_adapter(directory, gpt2[1])
    with jax.default_matmul_precision("highest"):
        norms = lora_jax.dora_weight_norms(gpt2[1], adapter)
        merged = lora_jax.merge(gpt2[1], adapter)
        restored = lora_jax.unmerge(merged, adapter, weight_norms=norms)
    peft_merged = peft.PeftModel.from_pretrained(base_model(tiny_gpt2_dir), directory).merge_and_unload()
    state = peft_merged.state_dict()
    for path in adapter.modules():
        name = dotted_name(path)
        # |W| < 1, one norm and one product per entry: float32 rounding, ~1e-7.
        np.testing.assert_allclose(_kernel(merged, name), state[f"{name}.weight"].numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(_kernel(restored, name), _kernel(gpt2[1], name), atol=1e-6, rtol=0)
    np.testing.assert_allclose(jax_logits(gpt2, None, merged), torch_logits(peft_merged), atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_allclose(jax_logits(gpt2, None, merged), jax_logits(gpt2, adapter), atol=LOGITS_ATOL, rtol=0)


def test_unmerging_dora_without_the_norms_is_refused(gpt2, peft_saved):
    adapter = lora_jax.load_adapter(peft_saved[0], gpt2[1])
    merged = lora_jax.merge(gpt2[1], adapter)
    with pytest.raises(ValueError, match=r"needs the weight norms taken before the merge"):
        lora_jax.unmerge(merged, adapter)


def test_a_train_step_moves_the_magnitude_and_loraplus_steps_it_with_b(gpt2):
    model, params = gpt2
    config = lora_jax.LoraConfig(rank=2, alpha=4, target_modules=["c_attn"], use_dora=True, init_lora_weights=False)
    adapter = lora_jax.init_lora(params, config, jax.random.key(1))
    labels = loraplus_labels(adapter)
    assert {leaf for leaf in jax.tree_util.tree_leaves(labels)} == {"A", "B"}
    assert get_module(labels.weights, ("transformer", "h", "0", "attn", "c_attn"))[LORA_MAGNITUDE] == "B"
    tx = lora_jax.loraplus_optimizer(optax.sgd, 1e-2, ratio=4.0)
    step = lora_jax.make_train_step(lora_jax.lm_loss(model), tx, donate=False)
    state = tx.init(adapter)
    new, _, _ = step(adapter, state, params, lora_jax.Batch(jnp.asarray(IDS)), None)
    moved = [float(np.max(np.abs(np.asarray(new.magnitudes()[p]) - np.asarray(m))))
             for p, m in adapter.magnitudes().items()]
    assert min(moved) > 0


def test_dora_shapes_are_checked():
    weights = {"m": {"lora_A": np.zeros((3, 1)), "lora_B": np.zeros((1, 2)), LORA_MAGNITUDE: np.ones(3)}}
    with pytest.raises(ValueError, match=r"DoRA magnitude of 'm' has shape \(3,\), but its B \(1, 2\) needs \(2,\)"):
        lora_jax.adapter.checked_modules(
            lora_jax.Adapter(weights, lora_jax.LoraConfig(rank=1, target_modules=["m"], use_dora=True)))
    with pytest.raises(ValueError, match=r"says use_dora=False"):
        lora_jax.adapter.checked_modules(lora_jax.Adapter(weights, lora_jax.LoraConfig(rank=1, target_modules=["m"])))
    plain = {"m": {"lora_A": np.zeros((3, 1)), "lora_B": np.zeros((1, 2))}}
    with pytest.raises(ValueError, match=r"use_dora=True but LoRA modules \['m'\] have no 'lora_magnitude_vector'"):
        lora_jax.adapter.checked_modules(
            lora_jax.Adapter(plain, lora_jax.LoraConfig(rank=1, target_modules=["m"], use_dora=True)))
