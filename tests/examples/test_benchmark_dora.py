"""Smoke test of examples/benchmark_dora.py: one tiny run of all six steps, checked through what it writes.

The script runs as a real subprocess (its thread settings must precede the first jax import) on one
GPT-2-small-width layer, batch 2 x 32, one warm-up step and two timed rounds. Timings are never
asserted, only their consistency with the ratios and the report's structure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from example_scripts import EXAMPLES, load_example

SCRIPT = EXAMPLES / "benchmark_dora.py"
BATCH, SEQ, ROUNDS = 2, 32, 2
NAMES = ["jax_lora", "jax_dora", "torch_lora", "torch_dora", "peft", "peft_dora"]
# analytic_flops for 1 layer, width 768, 2 x 32 tokens (test_compare_implementations: 11_780_947_968), plus
# DoRA's per-step A B in the weight norm: 2 r (768*2304 + 768*768 + 768*3072 + 3072*768) = 32 * 7_077_888.
LORA_FLOPS, DORA_FLOPS = 11_780_947_968, 11_780_947_968 + 226_492_416
# r=16 x (in + out) over the layer's four modules (196_608), plus one magnitude per output: 2304+768+3072+768.
LORA_TRAINABLE, DORA_TRAINABLE = 196_608, 196_608 + 6_912


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    prefix = tmp_path_factory.mktemp("dora") / "dora"
    argv = [sys.executable, str(SCRIPT), "--steps", str(ROUNDS), "--warmup", "1", "--layers", "1", "--batch",
            str(BATCH), "--seq", str(SEQ), "--threads", "2", "--out", str(prefix)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, prefix


def _table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) > 2 and cells[2] in ("lora", "dora"):
            rows[cells[0]] = cells
    return rows


def test_writes_json_and_markdown_only(bench):
    proc, prefix = bench
    expected = [str(prefix.with_suffix(ext)) for ext in (".json", ".md")]
    assert [line.removeprefix("wrote ") for line in proc.stdout.splitlines() if line.startswith("wrote ")] == expected
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["dora.json", "dora.md"]  # no temp files


def test_json_rows_flops_and_load(bench):
    _, prefix = bench
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert (report["steps"], report["warmup"], report["machine"]["threads"]) == (ROUNDS, 1, 2)
    assert len(report["load_average_start"]) == 3 and len(report["load_average_end"]) == 3
    config = report["config"]
    assert (config["skipped"], config["memory_table"]) == ([], [])
    w = config["workload"]
    assert (w["n_layer"], w["n_embd"], w["batch"], w["seq"], w["dtype"]) == (1, 768, BATCH, SEQ, "float32")
    rows = {r["name"]: r for r in config["results"]}
    assert list(rows) == NAMES
    assert [(r["framework"], r["training"]) for r in rows.values()] == [
        ("jax", "lora"), ("jax", "dora"), ("torch", "lora"), ("torch", "dora"), ("torch", "lora"), ("torch", "dora")]
    for row in rows.values():
        assert len(row["step_s_all"]) == ROUNDS
        assert row["flops_per_step"] == (DORA_FLOPS if row["training"] == "dora" else LORA_FLOPS)
    # lora_torch's DoRA and PEFT's train the same tensors: A, B and one magnitude per output feature.
    assert [rows[n]["trainable_params"] for n in ("torch_lora", "torch_dora", "peft", "peft_dora")] == \
        [LORA_TRAINABLE, DORA_TRAINABLE, LORA_TRAINABLE, DORA_TRAINABLE]


def test_ratios_follow_from_the_step_times(bench):
    _, prefix = bench
    report = json.loads(prefix.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in report["config"]["results"]}
    ratios = report["ratios"]
    assert list(ratios["dora_over_plain"]) == ["jax_dora", "torch_dora", "peft_dora"]
    for dora, plain in (("jax_dora", "jax_lora"), ("torch_dora", "torch_lora"), ("peft_dora", "peft")):
        ratio = ratios["dora_over_plain"][dora]
        assert ratio["median_ratio"] == pytest.approx(
            rows[dora]["tokens_per_s_median"] / rows[plain]["tokens_per_s_median"], rel=1e-12)
        per_round = [p / d for d, p in zip(rows[dora]["step_s_all"], rows[plain]["step_s_all"])]
        assert (ratio["round_min"], ratio["round_max"]) == (min(per_round), max(per_round))
    over = ratios["over_peft_dora"]
    assert list(over) == NAMES and over["peft_dora"] == {"median_ratio": 1.0, "round_min": 1.0, "round_max": 1.0}
    goal = ratios["goal"]
    assert (goal["implementation"], goal["baseline"], goal["at_least"]) == ("jax_dora", "peft_dora", 1.3)
    assert goal["median_ratio"] == over["jax_dora"]["median_ratio"]
    assert goal["met"] == (goal["median_ratio"] >= 1.3)


def test_markdown_table_and_goal_line(bench):
    _, prefix = bench
    markdown = prefix.with_suffix(".md").read_text()
    report = json.loads(prefix.with_suffix(".json").read_text())
    ratios = report["ratios"]
    assert f"## GPT-2 small (1 layers, width 768, random init), batch {BATCH} x {SEQ}, float32" in markdown
    assert "Load average (1 / 5 / 15 min, `os.getloadavg()`): " in markdown
    rows = _table_rows(markdown)
    assert list(rows) == NAMES
    assert rows["jax_lora"][5] == "-" and rows["peft_dora"][6] == "1.00 [1.00, 1.00]"
    jax = ratios["dora_over_plain"]["jax_dora"]
    assert rows["jax_dora"][5] == f"{jax['median_ratio']:.2f} [{jax['round_min']:.2f}, {jax['round_max']:.2f}]"
    assert rows["jax_dora"][7] == "12.0" and rows["jax_lora"][7] == "11.8"  # GFLOP/step, analytic
    verdict = "met" if ratios["goal"]["met"] else "not met"
    assert f"Goal jax_dora >= 1.3x peft_dora (PEFT DoRA eager): **{verdict}**, " \
           f"{ratios['goal']['median_ratio']:.2f}x" in markdown


def test_report_rerenders_byte_for_byte(bench, tmp_path):
    _, prefix = bench
    report_module = load_example("benchmark_report")
    paths = report_module.write_dora_report(json.loads(prefix.with_suffix(".json").read_text()), str(tmp_path / "x"))
    assert [Path(p).read_bytes() for p in paths] == [prefix.with_suffix(e).read_bytes() for e in (".json", ".md")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0", "--seq", "-3"], "--steps must be >= 1, got 0; --seq must be >= 1, got -3"),
        (["--seq", "2048"], "--seq must be <= 1024 (GPT-2's n_positions), got 2048"),
        (["--impls", "jax_dora", "jax_full"], "argument --impls: invalid choice: 'jax_full'"),
        (["--out", "/nonexistent_dora_dir/bench"], "the folder /nonexistent_dora_dir does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()  # one line: no usage block, no traceback
    assert line.startswith("benchmark_dora.py: error: ") and message in line


def test_compare_implementations_default_keeps_its_nine_rows():
    steps = load_example("compare_implementations")  # it imports benchmark_steps' tables by name
    assert steps.LORA_COMPARISON == ["jax_lora", "jax_lora_logits", "torch_lora", "torch_lora_compile", "peft",
                                     "peft_compile", "jax_full", "torch_full", "qwix"]
    assert [n for n in steps.IMPLEMENTATIONS if n not in steps.LORA_COMPARISON] == ["jax_lora_bf16", "peft_bf16",
                                                                                      "jax_dora", "torch_dora", "peft_dora"]
