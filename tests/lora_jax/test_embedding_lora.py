"""LoRA on GPT-2's token embedding ``wte`` in lora_jax, proven against PEFT 0.21 on a tiny GPT-2.

What PEFT does with the tied head (read in peft/tuners/lora/layer.py ``Embedding`` and checked here):
the unmerged ``PeftModel`` adds ``s A[ids] B`` to the input lookup only; ``lm_head`` keeps using the
base table (it is the same ``Parameter`` as ``wte.base_layer.weight``). ``merge_and_unload`` writes
``E + s A B`` into that shared table, so after merging the head changes too and the merged logits
differ from the unmerged ones. lora_jax does the same: only ``nn.Embed.__call__`` is intercepted,
never ``attend``, and ``merge`` changes the one table both use.

Numerics: float32, highest matmul precision; logits agree to ~3e-7, checked at 1e-5, while adapting
the head as well (or not adapting the lookup) moves them by more than 1e-2 (asserted).
"""

from __future__ import annotations

import dataclasses
import logging

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
from lora_jax.lora_tree import EMBEDDING_A, EMBEDDING_B, get_module
from lora_jax.loraplus import loraplus_labels

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TARGETS = ["wte", "c_attn"]
LOGITS_ATOL = 1e-5  # module docstring
WTE = ("transformer", "wte")


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return flax_gpt2(tiny_gpt2_dir)


def jax_logits(gpt2, adapter, params=None) -> np.ndarray:
    return shared_jax_logits(gpt2, adapter, IDS, params)


@pytest.fixture(scope="module", params=[(1, False), (4, True)], ids=["r1", "r4_rslora"])
def peft_saved(request, tiny_gpt2_dir, tmp_path_factory):
    rank, use_rslora = request.param
    torch.manual_seed(3)
    # init_lora_weights=False: embedding A and B both N(0, 1), c_attn's B random; scaled down to keep logits O(1).
    config = peft.LoraConfig(r=rank, lora_alpha=rank + 1, target_modules=TARGETS, use_rslora=use_rslora,
                             init_lora_weights=False)
    model = peft.get_peft_model(base_model(tiny_gpt2_dir), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_embedding" in name:
                param.mul_(0.3)
    directory = tmp_path_factory.mktemp("peft_wte")
    model.save_pretrained(directory)
    return directory, model


def test_peft_embedding_adapter_loads_and_gives_peft_logits(gpt2, peft_saved, tiny_gpt2_dir):
    directory, model = peft_saved
    adapter = lora_jax.load_adapter(directory, gpt2[1])
    assert adapter.embeddings() == (WTE,)
    module = get_module(adapter.weights, WTE)
    assert sorted(module) == [EMBEDDING_A, EMBEDDING_B] and module[EMBEDDING_A].shape[0] == 101
    ours = jax_logits(gpt2, adapter)
    assert max_error(ours, torch_logits(base_model(tiny_gpt2_dir))) > 1e-2
    np.testing.assert_allclose(ours, torch_logits(model), atol=LOGITS_ATOL, rtol=0)


def test_the_tied_head_is_not_adapted_before_merging(gpt2, peft_saved):
    # Adapting the head as well (E + s A B in the lookup and in the head, i.e. wte merged) gives other logits
    # than PEFT's unmerged model, so the check above fails if lora_jax adapted attend too.
    directory, model = peft_saved
    adapter = lora_jax.load_adapter(directory, gpt2[1])
    config = dataclasses.replace(adapter.config, target_modules=["wte"])
    head_too = lora_jax.merge(gpt2[1], lora_jax.Adapter({"transformer": {"wte": get_module(adapter.weights, WTE)}},
                                                        config))
    rest = {"transformer": {"h": adapter.weights["transformer"]["h"]}}
    attn_only = lora_jax.Adapter(rest, dataclasses.replace(adapter.config, target_modules=["c_attn"]))
    assert max_error(jax_logits(gpt2, attn_only, head_too), torch_logits(model)) > 1e-2


def test_merge_changes_the_tied_head_as_peft_does_and_warns(gpt2, peft_saved, tiny_gpt2_dir, caplog):
    directory, model = peft_saved
    adapter = lora_jax.load_adapter(directory, gpt2[1])
    with caplog.at_level(logging.WARNING, logger="lora_jax.merge"), jax.default_matmul_precision("highest"):
        merged = lora_jax.merge(gpt2[1], adapter)
    assert "transformer.wte" in caplog.text and "tied" in caplog.text
    peft_merged = peft.PeftModel.from_pretrained(base_model(tiny_gpt2_dir), directory).merge_and_unload()
    ours_merged = jax_logits(gpt2, None, merged)
    np.testing.assert_allclose(ours_merged, torch_logits(peft_merged), atol=LOGITS_ATOL, rtol=0)
    assert max_error(ours_merged, jax_logits(gpt2, adapter)) > 1e-2  # merging changed the model (the head)
    restored = lora_jax.unmerge(merged, adapter)
    np.testing.assert_allclose(np.asarray(restored["transformer"]["wte"]["embedding"]),
                               np.asarray(gpt2[1]["transformer"]["wte"]["embedding"]), atol=1e-6, rtol=0)


def test_an_embedding_adapter_saved_here_loads_in_peft(gpt2, tiny_gpt2_dir, tmp_path):
    config = lora_jax.LoraConfig(rank=2, alpha=3.0, target_modules=TARGETS, init_lora_weights=False)
    adapter = lora_jax.init_lora(gpt2[1], config, jax.random.key(4))
    adapter = jax.tree_util.tree_map(lambda x: 0.3 * x, adapter)
    lora_jax.save_adapter(tmp_path, adapter)
    theirs = peft.PeftModel.from_pretrained(base_model(tiny_gpt2_dir), tmp_path).eval()
    assert isinstance(theirs.base_model.model.transformer.wte, peft.tuners.lora.Embedding)
    ours = jax_logits(gpt2, adapter)
    assert max_error(ours, torch_logits(base_model(tiny_gpt2_dir))) > 1e-2
    np.testing.assert_allclose(torch_logits(theirs), ours, atol=LOGITS_ATOL, rtol=0)


def test_gradients_of_the_embedding_factors_match_peft(gpt2, peft_saved):
    directory, model = peft_saved
    adapter = lora_jax.load_adapter(directory, gpt2[1])
    model.zero_grad()
    ids = torch.as_tensor(IDS)
    model(ids, labels=ids).loss.backward()
    wte = model.base_model.model.transformer.wte
    theirs = {EMBEDDING_A: wte.lora_embedding_A["default"].grad.numpy().T,
              EMBEDDING_B: wte.lora_embedding_B["default"].grad.numpy().T}
    with jax.default_matmul_precision("highest"):
        grads = jax.grad(lora_jax.lm_loss(gpt2[0]))(adapter, gpt2[1], lora_jax.Batch(jnp.asarray(IDS)), None)
    for leaf, grad in theirs.items():
        scale = float(np.max(np.abs(grad)))
        assert scale > 0
        # float32 backward through two programs: observed ~1e-6 of the largest entry.
        np.testing.assert_allclose(np.asarray(get_module(grads.weights, WTE)[leaf]), grad, atol=2e-5 * scale, rtol=0)


def test_a_fresh_embedding_adapter_is_the_identity_with_peft_init(gpt2):
    adapter = lora_jax.init_lora(gpt2[1], lora_jax.LoraConfig(rank=4, target_modules=["wte"]), jax.random.key(0))
    module = get_module(adapter.weights, WTE)
    assert float(jnp.abs(module[EMBEDDING_A]).max()) == 0.0  # PEFT: A = 0, B ~ N(0, 1)
    assert 0.7 < float(jnp.std(module[EMBEDDING_B])) < 1.3  # 128 draws: std within 30% of 1
    np.testing.assert_array_equal(jax_logits(gpt2, adapter), jax_logits(gpt2, None))


def test_loraplus_gives_embedding_lora_its_own_rate(gpt2):
    config = lora_jax.LoraConfig(rank=2, target_modules=TARGETS, init_lora_weights=False)
    adapter = lora_jax.init_lora(gpt2[1], config, jax.random.key(0))
    labels = loraplus_labels(adapter)
    assert get_module(labels.weights, WTE) == {EMBEDDING_A: "embedding", EMBEDDING_B: "embedding"}
    tx = lora_jax.loraplus_optimizer(optax.sgd, 0.1, ratio=16.0, embedding_lr=1e-3)
    ones = jax.tree_util.tree_map(jnp.ones_like, adapter)
    updates, _ = tx.update(ones, tx.init(adapter), adapter)
    steps = {leaf: float(value.ravel()[0]) for leaf, value in get_module(updates.weights, WTE).items()}
    assert steps == pytest.approx({EMBEDDING_A: -1e-3, EMBEDDING_B: -1e-3})
    attn = get_module(updates.weights, ("transformer", "h", "0", "attn", "c_attn"))
    assert (float(attn["lora_A"][0, 0]), float(attn["lora_B"][0, 0])) == pytest.approx((-0.1, -1.6))


def test_dora_on_an_embedding_is_refused(gpt2):
    with pytest.raises(ValueError, match=r"use_dora is supported on dense layers only.*\['transformer\.wte'\]"):
        lora_jax.init_lora(gpt2[1], lora_jax.LoraConfig(rank=2, target_modules=TARGETS, use_dora=True),
                           jax.random.key(0))
