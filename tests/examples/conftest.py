"""Fixtures shared by the example tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_jax.embedded.base import build_base


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    # One layer, 5 pretraining steps: a real base directory with a tokenizer, built in seconds. These tests
    # check the examples' mechanics, not the base model's quality.
    return build_base(tmp_path_factory.mktemp("tiny_base"), n_layer=1, n_embd=32, n_head=2, vocab_size=300,
                      seq_len=32, batch_size=4, steps=5, seed=0, progress=False)
