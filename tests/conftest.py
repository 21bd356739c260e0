"""Shared fixtures: small GPT-2 checkpoint directories loaded through the real path."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).parent))  # after the repo root, so tests/parity never shadows parity

from gpt2_fixtures import ALT, TINY, save_gpt2  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer, width-32, 4-head GPT-2 saved with ``save_pretrained``."""
    return save_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), seed=0, **TINY)


@pytest.fixture(scope="session")
def alt_gpt2_dir(tmp_path_factory) -> Path:
    """A 3-layer, width-48, 3-head GPT-2 (head size 16, vocab 97)."""
    return save_gpt2(tmp_path_factory.mktemp("alt_gpt2"), seed=1, **ALT)
