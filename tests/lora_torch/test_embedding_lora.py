"""LoRA on GPT-2's wte (lora_torch.embedding), checked against the real ``peft`` 0.21, tied head included."""

from __future__ import annotations

import json
import logging
import math

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2LMHeadModel

from lora_torch import (
    EmbeddingLoRALayer,
    EmbeddingWithLoRA,
    create_loraplus_param_groups,
    freeze_base_model,
    inject_lora,
    load_adapter,
    load_lora_weights,
    lora_wrappers,
    merge_lora_weights,
    print_trainable_parameters,
    save_adapter,
    save_lora_weights,
    unmerge_lora_weights,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# fp32 on the width-32 fixture: the same products summed in another order. Observed max |error| 0.0 with
# wte alone and 6e-8 with c_attn too, on logits the adapter moves by 0.38-0.63; 1e-5 as in test_peft_adapter.
ATOL = 1e-5
CASES = [pytest.param(rank, rslora, targets, id=f"r{rank}-{'rs' if rslora else 'std'}-{'+'.join(targets)}")
         for rank, rslora, targets in [(1, False, ["wte"]), (4, False, ["wte", "c_attn"]), (4, True, ["wte"])]]


def _base(path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(path).eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _peft_model(path, rank: int, use_rslora: bool, targets: list[str], seed: int = 0) -> peft.PeftModel:
    """PEFT LoRA with its default init (embedding A = 0, linear B = 0), then those drawn non-zero."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=8, target_modules=targets, fan_in_fan_out=True,
                             use_rslora=use_rslora, task_type="CAUSAL_LM")
    model = peft.get_peft_model(_base(path), config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                for factor in (*module.lora_embedding_A.values(), *(b.weight for b in module.lora_B.values())):
                    factor.copy_(0.05 * torch.randn(factor.shape))
    return model


def _ours(path, rank: int = 4, targets=("wte",), seed: int = 0, **kwargs) -> GPT2LMHeadModel:
    """lora_torch LoRA with A drawn non-zero, and a linear's B too (an embedding's B is already N(0, 1))."""
    model = inject_lora(_base(path), list(targets), rank=rank, lora_alpha=8.0, verbose=False, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wrapper in lora_wrappers(model).values():
            factors = [wrapper.lora.lora_A] if isinstance(wrapper, EmbeddingWithLoRA) else [
                wrapper.lora.lora_A, wrapper.lora.lora_B]
            for factor in factors:
                factor.copy_(0.05 * torch.randn(factor.shape, generator=generator))
    return model


@pytest.mark.parametrize(("rank", "use_rslora", "targets"), CASES)
def test_saved_by_peft_loads_here(tiny_gpt2_dir, token_ids, tmp_path, rank, use_rslora, targets):
    theirs = _peft_model(tiny_gpt2_dir, rank, use_rslora, targets)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(_base(tiny_gpt2_dir), tmp_path)
    assert type(ours.transformer.wte) is EmbeddingWithLoRA
    expected = _logits(theirs, token_ids)
    assert _max_err(expected, _logits(_base(tiny_gpt2_dir), token_ids)) > 0.02  # the adapter acts
    assert _max_err(_logits(ours, token_ids), expected) < ATOL


@pytest.mark.parametrize(("rank", "use_rslora", "targets"), CASES)
def test_saved_here_loads_in_peft(tiny_gpt2_dir, token_ids, tmp_path, rank, use_rslora, targets):
    ours = _ours(tiny_gpt2_dir, rank, targets, use_rslora=use_rslora)
    save_adapter(ours, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tuple(tensors["base_model.model.transformer.wte.lora_embedding_A"].shape) == (rank, 101)
    assert tuple(tensors["base_model.model.transformer.wte.lora_embedding_B"].shape) == (32, rank)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is ("c_attn" in targets)  # wte alone has no (in, out) Conv1D weight
    theirs = peft.PeftModel.from_pretrained(_base(tiny_gpt2_dir), tmp_path).eval()
    expected = _logits(ours, token_ids)
    assert _max_err(expected, _logits(_base(tiny_gpt2_dir), token_ids)) > 0.02
    assert _max_err(_logits(theirs, token_ids), expected) < ATOL


def test_unmerged_head_keeps_the_base_weight(tiny_gpt2_dir, token_ids, tmp_path):
    ours = _ours(tiny_gpt2_dir)
    base_weight = _base(tiny_gpt2_dir).lm_head.weight
    assert ours.lm_head.weight is ours.transformer.wte.base_layer.weight  # still one Parameter
    assert torch.equal(ours.lm_head.weight, base_weight)
    # The logits are the base head applied to adapted hidden states: recompute them by hand.
    with torch.no_grad():
        hidden = ours.transformer(token_ids).last_hidden_state
    assert _max_err(_logits(ours, token_ids), hidden @ base_weight.T) < 1e-6


def test_merge_writes_the_shared_weight_like_peft(tiny_gpt2_dir, token_ids, tmp_path, caplog, snapshot,
                                                 assert_same_state):
    theirs = _peft_model(tiny_gpt2_dir, 4, False, ["wte"], seed=3)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(_base(tiny_gpt2_dir), tmp_path)
    wrapper = ours.transformer.wte
    expected_table = wrapper.base_layer.weight + wrapper.delta_weight()
    unmerged = _logits(ours, token_ids)
    before = snapshot(ours)
    with caplog.at_level(logging.WARNING, logger="lora_torch.merge"):
        merge_lora_weights(ours)
    assert [r.getMessage() for r in caplog.records] == [
        "merge_lora_weights: transformer.wte's weight is tied to lm_head.weight, so the merge writes the merged "
        "weight into that shared Parameter and lm_head changes too. The merged model's logits will differ from the "
        "unmerged one's, which adapts only transformer.wte (PEFT's merge_and_unload does the same). "
        "unmerge_lora_weights restores both."]
    assert type(ours.transformer.wte) is nn.Embedding
    assert ours.lm_head.weight is ours.transformer.wte.weight  # the tie holds
    assert torch.equal(ours.transformer.wte.weight, expected_table)
    merged = _logits(ours, token_ids)
    peft_unmerged = _logits(theirs, token_ids)
    peft_merged = _logits(theirs.merge_and_unload(), token_ids)
    assert _max_err(merged, peft_merged) < ATOL
    # Both halves: merging moves the logits, because the head now uses W0 + s A B as well.
    assert _max_err(merged, unmerged) > 0.01 and _max_err(peft_merged, peft_unmerged) > 0.01
    unmerge_lora_weights(ours)
    assert_same_state(ours, before)  # W0 written back bit for bit
    assert ours.lm_head.weight is ours.transformer.wte.base_layer.weight
    assert torch.equal(_logits(ours, token_ids), unmerged)
    assert "lora_unmerge_wrapper" not in ours.transformer.wte.base_layer.__dict__  # it no longer looks merged


def test_untied_layers_still_merge_into_a_copy(tiny_gpt2_dir, caplog):
    model = _ours(tiny_gpt2_dir, targets=("wpe", "c_attn"))
    wpe_weight = model.transformer.wpe.base_layer.weight
    with caplog.at_level(logging.WARNING, logger="lora_torch.merge"):
        merge_lora_weights(model)
    assert caplog.records == []
    assert model.transformer.wpe.weight is not wpe_weight


def test_dora_on_an_embedding_is_refused(tiny_model, snapshot, assert_same_state):
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match=r"use_dora=True is supported on torch\.nn\.modules\.linear\.Linear, "
                                         r"transformers\.pytorch_utils\.Conv1D only, and target_modules matched "
                                         r"\['transformer\.wte \(Embedding\)'\]"):
        inject_lora(tiny_model, ["wte", "c_attn"], use_dora=True, verbose=False)
    assert_same_state(tiny_model, before)


@pytest.mark.parametrize(("init", "a_std", "b_std"), [(True, 0.0, 1.0), ("gaussian", 0.0, 1.0), (False, 1.0, 1.0)])
def test_init_follows_peft(init, a_std, b_std):
    torch.manual_seed(0)
    branch = EmbeddingLoRALayer(1000, 64, rank=64, init_lora_weights=init)  # A and B hold 64,000 / 4,096 samples
    torch.manual_seed(1)
    config = peft.LoraConfig(r=64, lora_alpha=8, target_modules=["0"], init_lora_weights=init)
    reference = peft.get_peft_model(nn.Sequential(nn.Embedding(1000, 64)), config).base_model.model[0]
    pairs = [(branch.lora_A, reference.lora_embedding_A["default"], a_std),
             (branch.lora_B, reference.lora_embedding_B["default"], b_std)]
    for ours, theirs, std in pairs:
        if std == 0.0:
            assert torch.count_nonzero(ours).item() == torch.count_nonzero(theirs).item() == 0
        else:
            # Sampling error of a std over >= 4,096 samples is ~1.1%; 5% is over 4 standard errors.
            assert abs(ours.std().item() - std) < 0.05 and abs(theirs.std().item() - std) < 0.05


def test_dropout_is_not_applied_to_embeddings(tiny_gpt2_dir, token_ids, tmp_path):
    model = _ours(tiny_gpt2_dir, targets=("wte", "c_attn"), dropout=0.5).train()
    wte = model.transformer.wte
    assert torch.equal(wte(token_ids), wte(token_ids))  # PEFT never drops the embedding branch's input
    c_attn = model.transformer.h[0].attn.c_attn  # B != 0 (_ours), so its dropout shows
    x = torch.randn(3, 32)
    assert not torch.equal(c_attn(x), c_attn(x))  # while the linear branch does
    save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.5


def test_loraplus_embedding_group_matches_peft(tiny_gpt2_dir):
    ours = freeze_base_model(_ours(tiny_gpt2_dir, targets=("wte", "c_attn")))
    groups = create_loraplus_param_groups(ours, lr=1e-3, ratio=16.0, weight_decay=0.01, lr_embedding=2e-6)
    assert [(g["names"][:2], g["lr"]) for g in groups][:2] == [
        (["transformer.h.0.attn.c_attn.lora.lora_A", "transformer.h.1.attn.c_attn.lora.lora_A"], 1e-3),
        (["transformer.wte.lora.lora_A", "transformer.wte.lora.lora_B"], 2e-6)]
    theirs = _peft_model(tiny_gpt2_dir, 4, False, ["wte", "c_attn"])
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                          loraplus_weight_decay=0.01, loraplus_lr_embedding=2e-6)
    # The same (lr, weight decay, parameter count) per non-empty group, in the same order.
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups if g["params"]] == [
        (g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (1e-3, 0.01, 2), (2e-6, 0.01, 2), (0.016, 0.01, 2)]


def test_counts_and_tutorial_file(tiny_gpt2_dir, tmp_path, capsys):
    model = freeze_base_model(_ours(tiny_gpt2_dir, rank=4))
    assert print_trainable_parameters(model)["trainable"] == 4 * (101 + 32) == 532
    saved = save_lora_weights(model, tmp_path / "wte.safetensors")
    assert {name: tuple(t.shape) for name, t in saved.items()} == {
        "transformer.wte.lora.lora_A": (101, 4), "transformer.wte.lora.lora_B": (4, 32)}
    other = _ours(tiny_gpt2_dir, rank=4, seed=5)
    load_lora_weights(other, tmp_path / "wte.safetensors")
    assert torch.equal(other.transformer.wte.lora.lora_A, saved["transformer.wte.lora.lora_A"])


def _peft_embedding(base: nn.Embedding, rank: int) -> nn.Module:
    config = peft.LoraConfig(r=rank, lora_alpha=4, target_modules=["0"], init_lora_weights=False)
    model = peft.get_peft_model(nn.Sequential(base), config)
    return model.base_model.model[0]


def test_padding_idx_and_embed_scale_as_peft():
    class Scaled(nn.Embedding):  # like Gemma's scaled word embedding
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.embed_scale = math.sqrt(8.0)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return super().forward(ids) * self.embed_scale

    torch.manual_seed(0)
    ids = torch.tensor([[0, 3, 5, 0, 9]])
    for base in (nn.Embedding(12, 8, padding_idx=0), Scaled(12, 8, padding_idx=0)):
        ours = EmbeddingWithLoRA(base, rank=2, lora_alpha=4.0, init_lora_weights=False)
        reference = _peft_embedding(type(base)(12, 8, padding_idx=0), rank=2)
        with torch.no_grad():
            reference.base_layer.weight.copy_(base.weight)
            reference.lora_embedding_A["default"].copy_(ours.lora.lora_A.T)
            reference.lora_embedding_B["default"].copy_(ours.lora.lora_B.T)
        out, expected = ours(ids), reference(ids)
        assert _max_err(out, expected) < 1e-6  # fp32 rounding of the same products
        out.sum().backward()
        expected.sum().backward()
        # padding_idx: the padding row of A gets no gradient, in both.
        assert ours.lora.lora_A.grad[0].abs().max().item() == 0.0
        assert reference.lora_embedding_A["default"].grad[:, 0].abs().max().item() == 0.0
        assert _max_err(ours.lora.lora_A.grad, reference.lora_embedding_A["default"].grad.T) < 1e-5
