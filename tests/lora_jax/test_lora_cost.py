"""The cost benchmark's measurement on a tiny GPT-2: LoRA saves the weight-gradient FLOPs and the state."""

import importlib.util
from pathlib import Path

import pytest

from lora_jax.config import LoraConfig
from lora_jax.gpt2.model import GPT2Config

SPEC = importlib.util.spec_from_file_location("lora_cost", Path(__file__).parents[2] / "benchmarks" / "lora_cost.py")
lora_cost = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lora_cost)


@pytest.fixture(scope="module")
def tiny_cost():
    # Width 128 with 16 tokens keeps attention-score FLOPs (per token ~ T/D) small, as in GPT-2 small.
    gpt = GPT2Config(vocab_size=256, n_positions=16, n_embd=128, n_layer=1, n_head=2)
    config = LoraConfig(rank=4, target_modules=["c_attn", "c_proj", "c_fc"])
    return lora_cost.measure(gpt, config, batch=2, seq=16, combined=True)


def test_lora_step_skips_weight_gradients(tiny_cost):
    ratios = tiny_cost["ratios"]["lora"]
    # Matmul FLOPs go from ~6N to ~4N per token (XLA counts 0.615 here: full fine-tuning also
    # pays AdamW and the embedding-gradient scatter); the bounds bracket 2/3 with room either side.
    assert 0.55 < ratios["flops"] < 0.70
    # Full fine-tuning carries params + 2 moments in and out; LoRA carries the params in once (0.202 here).
    assert ratios["state_bytes"] < 0.25
    assert ratios["peak_bytes"] < 1.0


def test_combined_tree_path_costs_the_same_flops(tiny_cost):
    # set_to_zero discards the base gradients, so XLA does not compute them.
    steps = tiny_cost["steps"]
    assert steps["lora_combined"]["flops"] == pytest.approx(steps["lora"]["flops"], rel=0.01)
