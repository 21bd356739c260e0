"""examples/benchmark_report.py renders the committed CPU benchmark exactly as it was committed."""

from __future__ import annotations

import json
from pathlib import Path

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
