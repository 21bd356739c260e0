"""lora_format.peft_keys against the keys PEFT 0.21 itself writes, and lora_format.all_linear's rule."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

from lora_format.all_linear import expand_all_linear, is_all_linear
from lora_format.peft_keys import EMBEDDING_A, EMBEDDING_B, LORA_A, LORA_B, LORA_MAGNITUDE, module_key, split_key

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 6)
        self.proj = torch.nn.Linear(6, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.proj(self.emb(ids)))


def peft_keys(tmp_path, **options) -> set[str]:
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, lora_alpha=4, **options))
    model.save_pretrained(tmp_path)
    return set(load_file(tmp_path / "adapter_model.safetensors"))


def test_our_keys_are_the_keys_peft_writes(tmp_path):
    dora = peft_keys(tmp_path / "dora", target_modules=["proj"], use_dora=True)
    assert dora == {module_key("proj", part) for part in (LORA_A, LORA_B, LORA_MAGNITUDE)}
    embedding = peft_keys(tmp_path / "emb", target_modules=["emb"])
    assert embedding == {module_key("emb", part) for part in (EMBEDDING_A, EMBEDDING_B)}
    assert {split_key(key) for key in dora | embedding} == {
        ("proj", LORA_A), ("proj", LORA_B), ("proj", LORA_MAGNITUDE), ("emb", EMBEDDING_A), ("emb", EMBEDDING_B)}


@pytest.mark.parametrize("key", ["proj.lora_A.weight", "base_model.model.lora_A.weight",
                                 "base_model.model.proj.lora_C.weight", "base_model.model.proj.lora_A.bias"])
def test_keys_that_are_not_peft_lora_keys_split_to_none(key):
    assert split_key(key) is None


def test_an_unknown_part_is_refused():
    with pytest.raises(ValueError, match="unknown PEFT tensor part 'lora_A'"):
        module_key("proj", "lora_A")


def test_all_linear_is_case_insensitive_and_only_a_string():
    assert is_all_linear("ALL-LINEAR") and not is_all_linear(["all-linear"]) and not is_all_linear("all_linear")


def test_expanding_to_nothing_is_refused():
    with pytest.raises(ValueError, match="found no linear layer besides the output layer"):
        expand_all_linear(["lm_head"], ["lm_head"])
