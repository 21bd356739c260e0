"""examples/benchmark_report.py: the committed reports re-render exactly; the DoRA ratios from hand-written rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from example_scripts import load_example

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_committed_cpu_report_rerenders_byte_for_byte(tmp_path):
    report_module = load_example("benchmark_report")
    committed = DOCS / "benchmark_cpu.json"
    paths = report_module.write_report(json.loads(committed.read_text()), str(tmp_path / "bench"))
    assert paths == [str(tmp_path / f"bench{ext}") for ext in (".json", ".md", ".png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md", "bench.png"]  # no temp files
    assert Path(paths[0]).read_bytes() == committed.read_bytes()
    assert Path(paths[1]).read_bytes() == (DOCS / "benchmark_cpu.md").read_bytes()
    assert Path(paths[2]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"



def test_committed_dora_report_rerenders_byte_for_byte(tmp_path):
    report_module = load_example("benchmark_report")
    committed = DOCS / "benchmark_dora.json"
    report = json.loads(committed.read_text())
    assert report["ratios"] == report_module.dora_ratios(report["config"]["results"])  # the ratios follow from the times
    paths = report_module.write_dora_report(report, str(tmp_path / "dora"))
    assert Path(paths[0]).read_bytes() == committed.read_bytes()
    assert Path(paths[1]).read_bytes() == (DOCS / "benchmark_dora.md").read_bytes()

def _row(name: str, seconds: list[float], tokens: int = 512) -> dict:
    return {"name": name, "tokens_per_s_median": tokens / sorted(seconds)[len(seconds) // 2], "step_s_all": seconds}


def test_dora_ratios_of_hand_written_rounds():
    report_module = load_example("benchmark_report")
    # Three rounds each; medians 2.0 s (jax_dora), 1.6 s (jax_lora), 3.0 s (peft_dora).
    rows = [_row("jax_lora", [1.6, 1.5, 1.7]), _row("jax_dora", [2.0, 1.8, 2.4]), _row("peft_dora", [3.0, 3.6, 2.7])]
    ratios = report_module.dora_ratios(rows)
    # Only the jax pair is complete; torch and peft have no plain row here.
    assert list(ratios["dora_over_plain"]) == ["jax_dora"]
    jax = ratios["dora_over_plain"]["jax_dora"]
    assert jax["median_ratio"] == pytest.approx(1.6 / 2.0)
    assert (jax["round_min"], jax["round_max"]) == pytest.approx((1.7 / 2.4, 1.5 / 1.8))  # 0.708, 0.833
    over = ratios["over_peft_dora"]["jax_dora"]
    assert over["median_ratio"] == pytest.approx(3.0 / 2.0)
    assert (over["round_min"], over["round_max"]) == pytest.approx((2.7 / 2.4, 3.6 / 1.8))  # 1.125, 2.0
    assert ratios["goal"] == {"implementation": "jax_dora", "baseline": "peft_dora", "at_least": 1.3,
                              "median_ratio": pytest.approx(1.5), "met": True}


def test_dora_goal_is_unmeasured_without_peft_dora():
    report_module = load_example("benchmark_report")
    ratios = report_module.dora_ratios([_row("jax_lora", [1.0]), _row("jax_dora", [1.1])])
    assert ratios["over_peft_dora"] == {}
    assert (ratios["goal"]["median_ratio"], ratios["goal"]["met"]) == (None, None)
