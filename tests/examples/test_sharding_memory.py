"""Argument checks of examples/sharding_memory.py (its compile-only run is too slow for the suite)."""

from __future__ import annotations

import pytest

from example_scripts import load_example


def test_non_positive_sizes_are_refused_with_every_reason(capsys):
    example = load_example("sharding_memory")
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--devices", "0", "--layers", "0"])
    assert exit_info.value.code == 2
    # --layers 0 used to mean "all 48 layers" (a falsy override); now it is refused.
    assert "--devices must be >= 1, got 0; --layers must be >= 1, got 0" in capsys.readouterr().err
