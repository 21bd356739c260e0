"""Smoke test of examples/compare_implementations.py: one tiny benchmark run, checked through what it writes.

The script runs as a real subprocess (its environment setup happens before JAX is imported, which only a
fresh process shows) on one GPT-2-small-width layer, batch 2 x 32, one warm-up step and one timed round of
``jax_lora`` against ``peft`` and, when qwix is installed, ``qwix``. Timings are not asserted, only their consistency and the report's structure.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from example_scripts import EXAMPLES, load_example

SCRIPT = EXAMPLES / "compare_implementations.py"
BATCH, SEQ = 2, 32
# analytic_flops by hand for 1 layer, width 768, vocab 50257, 2 x 32 tokens, r=16 on c_attn/c_proj/c_fc:
# base 24*768^2 + 4*32*768 + 2*768*50257 = 91_448_832, LoRA 2*16*(3072+1536+3840+3840) = 393_216,
# LoRA step (2*base + 3*LoRA) * 64 tokens.
FLOPS_PER_STEP = 11_780_947_968
# r=16 x (c_attn 768+2304, attn.c_proj 768+768, c_fc 768+3072, mlp.c_proj 3072+768) in one layer.
PEFT_TRAINABLE = 196_608
QWIX = importlib.util.find_spec("qwix") is not None
IMPLS = ["jax_lora", "peft"] + (["qwix"] if QWIX else [])


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    prefix = tmp_path_factory.mktemp("bench") / "bench"
    argv = [sys.executable, str(SCRIPT), "--steps", "1", "--warmup", "1", "--layers", "1", "--batch", str(BATCH),
            "--seq", str(SEQ), "--threads", "2", "--impls", *IMPLS, "--no-memory-table", "--out", str(prefix)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, prefix


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """The results table's cells by implementation name (first column)."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[1] in ("lora", "full"):
            rows[cells[0]] = cells
    return rows


def test_writes_exactly_the_three_reports(bench):
    proc, prefix = bench
    expected = [prefix.with_suffix(ext) for ext in (".json", ".md", ".png")]
    assert [line.removeprefix("wrote ") for line in proc.stdout.splitlines() if line.startswith("wrote ")] == \
        [str(p) for p in expected]
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["bench.json", "bench.md", "bench.png"]  # no temp files
    assert prefix.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_holds_both_implementations_with_consistent_rates(bench):
    _, prefix = bench
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert (report["steps"], report["warmup"], report["machine"]["threads"]) == (1, 1, 2)
    assert "--impls " + " ".join(IMPLS) in report["command"]
    [config] = report["configs"]
    assert (config["preset"], config["skipped"], config["memory_table"]) == ("small", [], [])
    workload = config["workload"]
    assert (workload["n_layer"], workload["n_embd"], workload["batch"], workload["seq"]) == (1, 768, BATCH, SEQ)
    rows = {r["name"]: r for r in config["results"]}
    assert list(rows) == IMPLS
    assert [(r["framework"], r["training"]) for r in rows.values()][:2] == [("jax", "lora"), ("torch", "lora")]
    peaks = config["matmul_peaks"]["float32"]
    for row in rows.values():  # each row's share of its own framework's roof, measured in the same run
        own = peaks["torch_gflops" if row["framework"] == "torch" else "jax_gflops"]
        assert row["utilisation_vs_own_roof"] == pytest.approx(row["achieved_gflops"] / own, rel=1e-12)
    for row in rows.values():
        assert len(row["step_s_all"]) == 1 and row["step_s_median"] == row["step_s_all"][0]
        assert math.isfinite(row["tokens_per_s_median"]) and row["tokens_per_s_median"] > 0
        # One timed round: median, min and max are the same tokens / seconds (float division, so 1e-12).
        for key in ("tokens_per_s_median", "tokens_per_s_min", "tokens_per_s_max"):
            assert row[key] == pytest.approx(BATCH * SEQ / row["step_s_median"], rel=1e-12)
        assert row["flops_per_step"] == FLOPS_PER_STEP
        assert row["peak_rss_mb"] > 0 and row["warmup_s"] > 0
    assert rows["peft"]["trainable_params"] == PEFT_TRAINABLE
    assert rows["jax_lora"]["xla_peak_mb"] > 0


@pytest.mark.skipif(not QWIX, reason="qwix is not installed")
def test_qwix_row_starts_from_jax_lora_weights(bench):
    _, prefix = bench
    rows = {r["name"]: r for r in json.loads(prefix.with_suffix(".json").read_text())["configs"][0]["results"]}
    assert rows["qwix"]["framework"] == "jax" and rows["qwix"]["flops_per_step"] == FLOPS_PER_STEP
    # Same base weights, A, B, loss and batch: the first losses agree to float32 rounding of one program (1e-6 rel).
    assert rows["qwix"]["first_loss"] == pytest.approx(rows["jax_lora"]["first_loss"], rel=1e-6)
    assert "first-step loss" in prefix.with_suffix(".md").read_text()


def test_markdown_ratio_column_is_relative_to_peft(bench):
    _, prefix = bench
    markdown = prefix.with_suffix(".md").read_text()
    assert f"## GPT-2 small (1 layers, width 768), batch {BATCH} x {SEQ}, float32" in markdown
    assert "XLA memory analysis" not in markdown  # --no-memory-table
    rows = _table_rows(markdown)
    assert list(rows) == IMPLS
    assert rows["peft"][4] == "1.00"  # the "x PEFT eager" column
    results = {r["name"]: r for r in json.loads(prefix.with_suffix(".json").read_text())["configs"][0]["results"]}
    ratio = results["jax_lora"]["tokens_per_s_median"] / results["peft"]["tokens_per_s_median"]
    assert rows["jax_lora"][4] == f"{ratio:.2f}"
    assert rows["jax_lora"][5].startswith("12 (")  # 11.78 analytic GFLOP/step, rounded


def test_unknown_implementation_is_refused_before_any_work(capsys):
    example = load_example("compare_implementations")
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--impls", "jax_lora", "jax_lora_typo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'jax_lora_typo'" in err and "peft_compile" in err


def test_non_positive_counts_are_refused_with_every_reason(capsys):
    example = load_example("compare_implementations")
    with pytest.raises(SystemExit) as exit_info:
        example.parse_args(["--steps", "0", "--chunk-size", "-1", "--layers", "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # --layers 0 used to mean "the preset's depth" (a falsy override); now it is refused like the others.
    assert "--steps must be >= 1, got 0; --chunk-size must be >= 1, got -1; --layers must be >= 1, got 0" in err


def test_benchmark_chunk_size_is_lora_jax_default():
    # benchmark_steps repeats the constant so that it can be imported before jax; the two must not drift apart.
    from lora_jax.training.chunked_loss import DEFAULT_CHUNK_SIZE

    assert load_example("profile_cpu_step").CHUNK_SIZE == DEFAULT_CHUNK_SIZE == 256  # from benchmark_steps
