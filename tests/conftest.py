"""Shared fixtures: small GPT-2 checkpoint directories loaded through the real path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).parent))  # after the repo root, so tests/parity never shadows parity

# gpt2_fixtures needs torch and transformers; it is imported inside the fixtures, so the tests of
# lora_jax's core collect and run where torch is absent (tests/test_packaging.py checks it).


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer, width-32, 4-head GPT-2 saved with ``save_pretrained``."""
    from gpt2_fixtures import TINY, save_gpt2

    return save_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), seed=0, **TINY)


@pytest.fixture(scope="session")
def alt_gpt2_dir(tmp_path_factory) -> Path:
    """A 3-layer, width-48, 3-head GPT-2 (head size 16, vocab 97)."""
    from gpt2_fixtures import ALT, save_gpt2

    return save_gpt2(tmp_path_factory.mktemp("alt_gpt2"), seed=1, **ALT)
