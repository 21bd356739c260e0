"""Fixtures for lora_torch tests: tiny GPT-2 models loaded through ``from_pretrained``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from transformers import GPT2LMHeadModel

from lora_torch import lora_wrappers


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    # TF32 would round matmul inputs to 10 mantissa bits on GPU and break the tolerances below.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def tiny_model(tiny_gpt2_dir) -> GPT2LMHeadModel:
    """A fresh 2-layer GPT-2 (width 32, vocab 101) in eval mode."""
    return GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()


@pytest.fixture
def token_ids() -> torch.Tensor:
    """A (2, 12) batch of token ids valid for both fixture vocabularies."""
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def randomize_lora() -> Callable[[torch.nn.Module, int], None]:
    """Returns a function that sets every LoRA A and B to seeded non-zero values (a merge with B = 0 proves nothing)."""

    def randomize(model: torch.nn.Module, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for wrapper in lora_wrappers(model).values():
                for param in (wrapper.lora.lora_A, wrapper.lora.lora_B):
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))

    return randomize


@pytest.fixture
def snapshot() -> Callable[[torch.nn.Module], dict[str, torch.Tensor]]:
    """Returns a function copying a model's state_dict, to check bit-identity later with torch.equal."""

    def take(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in model.state_dict().items()}

    return take


@pytest.fixture
def assert_same_state() -> Callable[[torch.nn.Module, dict[str, torch.Tensor]], None]:
    """Returns a check that a model's state_dict has the same names and bit-identical tensors as a snapshot."""

    def check(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
        after = model.state_dict()
        assert list(after) == list(before)
        changed = [name for name in before if not torch.equal(after[name], before[name])]
        assert changed == []

    return check
