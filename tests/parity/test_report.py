"""Rendering: every report states device, dtype, versions; failures are visible in every format."""

from __future__ import annotations

import json

import numpy as np

from parity.environment import describe_environment
from parity.report import ParityReport, render_json, render_markdown, render_table, write_text_atomic
from parity.results import Tolerance, compare_arrays


def _report(passing: bool) -> ParityReport:
    row = compare_arrays("merge", "w | x", np.ones(2), np.ones(2) * (1.0 if passing else 2.0), Tolerance(rtol=1e-6))
    env = describe_environment("cpu", "test cpu", "fp32")
    return ParityReport(rows=(row,), environment=env, settings={"rank": 4}, command="python -m parity --rank 4")


def test_table_states_context_and_verdict():
    text = render_table(_report(False))
    assert text.startswith("device: cpu (test cpu), dtype: fp32\n")
    assert "versions: numpy " in text and "FAIL" in text and text.endswith("FAIL: 1 of 1 rows out of tolerance\n")


def test_markdown_escapes_pipes_and_shows_command():
    text = render_markdown(_report(True), title="T")
    assert "## T" in text and "python -m parity --rank 4" in text and "w \\| x" in text
    assert "**all checks passed**" in text


def test_json_round_trips():
    data = json.loads(render_json(_report(False)))
    assert data["passed"] is False and data["rows"][0]["rtol"] == 1e-6 and data["environment"]["dtype"] == "fp32"
    assert data["rows"][0]["max_rel"] == 0.5


def test_empty_report_does_not_pass():
    assert not ParityReport(rows=(), environment={}).passed


def test_atomic_write_leaves_no_temp_files(tmp_path):
    target = write_text_atomic(tmp_path / "sub" / "r.json", "{}")
    assert target.read_text() == "{}" and [p.name for p in target.parent.iterdir()] == ["r.json"]
