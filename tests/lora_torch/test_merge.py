"""Merging folds s * A @ B into the base weight; unmerging restores it bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_torch import inject_lora, lora_module_names, merge_lora_weights, unmerge_lora_weights

TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merged_logits_match_unmerged(tiny_model, token_ids, randomize_lora, use_rslora):
    inject_lora(tiny_model, TARGETS, rank=4, lora_alpha=8.0, use_rslora=use_rslora, verbose=False)
    randomize_lora(tiny_model)  # non-zero B: with B = 0 a merge proves nothing
    with torch.no_grad():
        lora_logits = tiny_model(token_ids).logits
        merge_lora_weights(tiny_model)
        merged_logits = tiny_model(token_ids).logits
    assert lora_module_names(tiny_model) == []
    assert type(tiny_model.transformer.h[0].attn.c_attn) is Conv1D
    # fp32; x W0 + x s A B versus x (W0 + s A B) differ only in summation order: 1e-5 absolute
    # is ~100x the observed error (~1.5e-7) on logits of magnitude ~0.5.
    torch.testing.assert_close(merged_logits, lora_logits, rtol=0, atol=1e-5)
    assert (merged_logits - lora_logits).abs().max().item() < 1e-5


def test_merged_weight_formula_conv1d(tiny_model, randomize_lora):
    inject_lora(tiny_model, ["c_attn"], rank=2, lora_alpha=6.0, verbose=False)
    randomize_lora(tiny_model)
    wrapper = tiny_model.transformer.h[0].attn.c_attn
    expected = wrapper.base_layer.weight + 3.0 * (wrapper.lora.lora_A @ wrapper.lora.lora_B)
    merge_lora_weights(tiny_model)
    assert torch.equal(tiny_model.transformer.h[0].attn.c_attn.weight, expected)


def test_merged_weight_formula_linear_is_transposed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    inject_lora(model, ["0", "2"], rank=2, lora_alpha=2.0, verbose=False)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.lora.lora_B.normal_()
    expected = model[0].base_layer.weight + (model[0].lora.lora_A @ model[0].lora.lora_B).T
    x = torch.randn(5, 6)
    with torch.no_grad():
        lora_out = model(x)
        merge_lora_weights(model)
        merged_out = model(x)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, expected)
    torch.testing.assert_close(merged_out, lora_out, rtol=0, atol=1e-6)  # tiny fp32 sums


def test_unmerge_restores_base_exactly(tiny_model, token_ids, randomize_lora, snapshot, assert_same_state):
    inject_lora(tiny_model, TARGETS, rank=4, verbose=False)
    randomize_lora(tiny_model)
    before = snapshot(tiny_model)
    with torch.no_grad():
        lora_logits = tiny_model(token_ids).logits
        merge_lora_weights(tiny_model)
        assert not torch.equal(tiny_model.transformer.h[0].mlp.c_fc.weight,
                               before["transformer.h.0.mlp.c_fc.base_layer.weight"])
        unmerge_lora_weights(tiny_model)
        unmerged_logits = tiny_model(token_ids).logits
    assert_same_state(tiny_model, before)  # W0, A and B all bit-identical to before the merge
    assert torch.equal(unmerged_logits, lora_logits)


def test_merged_state_dict_is_plain(tiny_model, tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel
    plain_keys = list(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).state_dict())
    inject_lora(tiny_model, TARGETS, rank=4, verbose=False)
    merge_lora_weights(tiny_model)
    # The wrapper kept for unmerge is not a registered submodule: save_pretrained sees plain GPT-2.
    assert list(tiny_model.state_dict()) == plain_keys


def test_merge_in_place_has_no_way_back(tiny_model, randomize_lora):
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    randomize_lora(tiny_model)
    merge_lora_weights(tiny_model, keep_for_unmerge=False)
    with pytest.raises(ValueError, match="nothing to unmerge"):
        unmerge_lora_weights(tiny_model)


def test_merge_without_lora_raises(tiny_model):
    with pytest.raises(ValueError, match="inject_lora"):
        merge_lora_weights(tiny_model)


def test_unmerge_twice_says_the_model_is_not_merged(tiny_model):
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    unmerge_lora_weights(merge_lora_weights(tiny_model))
    with pytest.raises(ValueError, match=r"the model is not merged: its LoRA layers are live .* Call "
                                         r"merge_lora_weights\(model\) first"):
        unmerge_lora_weights(tiny_model)
    assert len(lora_module_names(tiny_model)) == 2


def test_unmerge_refuses_while_new_lora_is_live(tiny_model):
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    merge_lora_weights(tiny_model)
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)  # a second adapter on the merged model
    with pytest.raises(ValueError, match="injected after the merge"):
        unmerge_lora_weights(tiny_model)
    assert len(lora_module_names(tiny_model)) == 2
