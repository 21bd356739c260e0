"""Pairs loaded once per session from the shared GPT-2 fixtures, through the real loaders."""

from __future__ import annotations

import pytest

from parity import SuiteSettings, load_pair, run_suite


@pytest.fixture(scope="session")
def tiny_pair(tiny_gpt2_dir):
    """The 2-layer, width-32 fixture in both halves (fp32, CPU)."""
    return load_pair(tiny_gpt2_dir)


@pytest.fixture(scope="session")
def alt_pair(alt_gpt2_dir):
    """The 3-layer, width-48, 3-head fixture in both halves (fp32, CPU)."""
    return load_pair(alt_gpt2_dir)


@pytest.fixture(scope="session")
def tiny_report(tiny_pair):
    """The full suite with default settings on the tiny pair (run once, read by several tests)."""
    return run_suite(tiny_pair, SuiteSettings())
