"""``target_modules="all-linear"`` selects the modules PEFT 0.21 selects: every Linear/Conv1D but the output layer."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2LMHeadModel, GPT2Model

from lora_torch import inject_lora, load_adapter, lora_module_names, save_adapter
from lora_torch.inject import all_linear_targets

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

GPT2_LINEAR = [f"transformer.h.{i}.{name}" for i in (0, 1) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                         "mlp.c_proj")]


def _peft_selection(model: nn.Module, target_modules: str = "all-linear") -> tuple[list[str], list[str]]:
    """``(adapted module names, target_modules written to the config)`` of PEFT's own "all-linear"."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=target_modules, fan_in_fan_out=isinstance(
        model, (GPT2Model, GPT2LMHeadModel)))  # GPT-2 is Conv1D: PEFT warns unless told
    wrapped = peft.get_peft_model(model, config)
    adapted = [name for name, module in wrapped.base_model.model.named_modules()
               if isinstance(module, peft.tuners.lora.LoraLayer)]
    return sorted(adapted), sorted(wrapped.peft_config["default"].target_modules)


@pytest.mark.parametrize("spelling", ["all-linear", "ALL-Linear"])
def test_gpt2_selection_equals_peft_and_leaves_out_lm_head(tiny_gpt2_dir, spelling):
    ours = inject_lora(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), spelling, rank=2, verbose=False)
    adapted, config_targets = _peft_selection(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), spelling)
    assert sorted(lora_module_names(ours)) == adapted == config_targets == sorted(GPT2_LINEAR)
    assert type(ours.lm_head) is nn.Linear  # the tied output layer stays plain
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_a_model_without_output_layer_keeps_every_linear():
    def build() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 2)))

    ours = inject_lora(build(), "all-linear", rank=2, verbose=False)
    adapted, _ = _peft_selection(build())
    assert sorted(lora_module_names(ours)) == adapted == ["0", "2.0", "2.1"]


def test_a_transformers_model_whose_output_embeddings_are_none_keeps_every_linear(tiny_gpt2_dir):
    base = GPT2Model.from_pretrained(tiny_gpt2_dir)  # no head: get_output_embeddings() returns None
    assert base.get_output_embeddings() is None
    expected = sorted(name.removeprefix("transformer.") for name in GPT2_LINEAR)
    assert sorted(all_linear_targets(base)) == expected
    assert _peft_selection(GPT2Model.from_pretrained(tiny_gpt2_dir))[0] == expected


def test_saved_all_linear_adapter_loads_in_peft_on_the_same_modules(tiny_gpt2_dir, token_ids, randomize_lora,
                                                                   tmp_path):
    ours = inject_lora(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval(), "all-linear", rank=2, verbose=False)
    randomize_lora(ours)
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "c_attn", "c_fc", "c_proj"]  # the shortest description; lm_head is not a suffix match of these
    theirs = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval(), tmp_path).eval()
    adapted = sorted(name for name, module in theirs.base_model.model.named_modules()
                     if isinstance(module, peft.tuners.lora.LoraLayer))
    assert adapted == sorted(GPT2_LINEAR)
    with torch.no_grad():
        # fp32, same tolerance and reason as test_peft_adapter.ATOL (observed ~1e-7).
        assert (theirs(token_ids).logits - ours(token_ids).logits).abs().max().item() < 1e-5


def test_a_config_carrying_all_linear_loads_the_same_modules(tiny_model, tiny_gpt2_dir, randomize_lora, tmp_path):
    inject_lora(tiny_model, "all-linear", rank=2, verbose=False)
    randomize_lora(tiny_model)
    save_adapter(tiny_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    # A hand-written config with the shorthand (PEFT itself writes the expanded names); the weights are
    # re-saved without the config digest, as PEFT saves them.
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "target_modules": "All-Linear"}))
    weights = tmp_path / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})
    loaded = load_adapter(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), tmp_path)
    assert sorted(lora_module_names(loaded)) == sorted(GPT2_LINEAR)
    assert type(loaded.lm_head) is nn.Linear


def test_all_linear_with_layers_to_transform_is_refused(tiny_model):
    # PEFT expands to full names, which it never filters by layer: the setting would be silently ignored.
    with pytest.raises(ValueError, match=r"layers_to_transform does not apply to target_modules='all-linear'"):
        inject_lora(tiny_model, "all-linear", layers_to_transform=[0], verbose=False)
    assert lora_module_names(tiny_model) == []


def test_all_linear_with_only_an_output_layer_is_refused():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(3, 3)

        def get_output_embeddings(self) -> nn.Module:
            return self.out

    with pytest.raises(ValueError, match="found no linear layer besides the output layer"):
        inject_lora(Head(), "all-linear", verbose=False)
