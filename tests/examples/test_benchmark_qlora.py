"""Smoke test of examples/benchmark_qlora.py: one ``--tiny`` run (memory and speed), checked through what it writes.

The script runs as a real subprocess (its thread settings must precede the first jax import) on a 2-layer,
width-64 GPT-2, batch 2 x 16, one warm-up step and two timed rounds. Timings are never asserted; the memory
numbers are, against sizes counted here by hand from the NF4 layout, independently of the script.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from example_scripts import EXAMPLES, load_example

SCRIPT = EXAMPLES / "benchmark_qlora.py"
ROUNDS = 2
D, LAYERS, VOCAB, POSITIONS, RANK = 64, 2, 256, 64, 16
# The four Dense kernels of a block, (in, out): c_attn, attn.c_proj, c_fc, mlp.c_proj.
KERNELS = [(D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)] * LAYERS


def nf4_bytes(n: int) -> int:
    """One double-quantized NF4 kernel of n values: 4-bit codes, a uint8 absmax per 64 values, a float32 absmax
    per 256 blocks and one float32 offset."""
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


QUANTIZED = sum(i * o for i, o in KERNELS)  # 98,304
NF4_BYTES = sum(nf4_bytes(i * o) for i, o in KERNELS)  # 50,752: 0.5 + 1/64 + 4/(64*256) + 4/n per value
# Everything else stays float32: wte, wpe, and per block ln_1, ln_2 (scale, bias) and the four biases; ln_f.
FLOAT_REST = VOCAB * D + POSITIONS * D + LAYERS * (4 * D + 3 * D + D + 4 * D + D) + 2 * D
ADAPTER = RANK * sum(i + o for i, o in KERNELS)  # A (in, r) and B (r, out) per kernel: 32,768
BATCH_BYTES = 2 * 16 * 4  # int32 ids


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("qlora")
    argv = [sys.executable, str(SCRIPT), "--tiny", "--repeats", str(ROUNDS), "--warmup", "1", "--threads", "2",
            "--out-dir", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, out


@pytest.fixture(scope="module")
def report(bench) -> dict:
    return json.loads((bench[1] / "benchmark_qlora.json").read_text())


def test_writes_json_and_markdown_only(bench):
    proc, out = bench
    expected = [str(out / "benchmark_qlora.json"), str(out / "benchmark_qlora.md")]
    assert [line.removeprefix("wrote ") for line in proc.stdout.splitlines() if line.startswith("wrote ")] == expected
    assert sorted(p.name for p in out.iterdir()) == ["benchmark_qlora.json", "benchmark_qlora.md"]  # no temp files


def test_memory_bytes_equal_the_nf4_layout(report):
    [row] = report["memory"]["rows"]
    assert (row["preset"], row["params"], row["quantized_params"]) == ("tiny", QUANTIZED + FLOAT_REST, QUANTIZED)
    assert row["nf4_argument_bytes"] == NF4_BYTES == 50_752
    assert row["bytes_per_quantized_param"] == NF4_BYTES / QUANTIZED  # exact: both are the same two integers
    optimizer = 2 * 4 * ADAPTER + 4  # AdamW's two float32 moments and its int32 count
    assert row["state"] == {"lora": {"base": 4 * (QUANTIZED + FLOAT_REST), "adapter": 4 * ADAPTER, "optimizer": optimizer},
                            "qlora": {"base": NF4_BYTES + 4 * FLOAT_REST, "adapter": 4 * ADAPTER, "optimizer": optimizer}}
    for kind, plan in row["xla"].items():  # XLA's arguments are exactly the state plus the batch (the key is unused)
        assert plan["argument"] == sum(row["state"][kind].values()) + BATCH_BYTES
        assert plan["peak"] == plan["argument"] + plan["output"] + plan["temp"] - plan["alias"]
        assert plan["alias"] == 4 * ADAPTER + optimizer  # the donated adapter and AdamW state
    assert row["argument_ratio"] == row["xla"]["qlora"]["argument"] / row["xla"]["lora"]["argument"]
    goals = report["memory"]["goals"]
    assert goals["bytes_per_quantized_param"] == {"at_most": 0.52, "values": {"tiny": NF4_BYTES / QUANTIZED},
                                                  "met": True}
    assert goals["xl_state_ratio"] == {"at_most": 0.2, "value": None, "met": None}  # XL is not compiled in --tiny


def test_abstract_nf4_tree_is_the_one_quantize_params_makes():
    import jax
    import lora_jax
    from lora_jax.gpt2.model import GPT2Config, init_gpt2_params

    bench = load_example("benchmark_qlora")
    params = init_gpt2_params(GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=D, n_layer=LAYERS, n_head=2),
                              jax.random.key(0))
    real = lora_jax.quantize_params(params)
    abstract = bench.abstract_quantized(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
    assert jax.tree.structure(abstract) == jax.tree.structure(real)  # static shape, dtype and block size included
    assert jax.tree.leaves(jax.tree.map(lambda x: (x.shape, x.dtype), abstract)) == \
        jax.tree.leaves(jax.tree.map(lambda x: (x.shape, x.dtype), real))


def test_speed_rows_and_goals_follow_from_the_step_times(report):
    speed = report["speed"]
    w = speed["workload"]
    assert (w["n_layer"], w["n_embd"], w["batch"], w["seq"], w["dtype"]) == (LAYERS, D, 2, 16, "float32")
    rows = {r["name"]: r for r in speed["results"]}
    assert [(n, r["framework"], r["training"]) for n, r in rows.items()] == [
        ("jax_qlora", "jax", "qlora"), ("peft_qlora", "torch", "qlora"), ("jax_lora", "jax", "lora")]
    assert rows["peft_qlora"]["trainable_params"] == ADAPTER and rows["peft_qlora"]["linear4bit_layers"] == 8
    assert all(len(r["step_s_all"]) == ROUNDS for r in rows.values())
    over, slow = speed["goals"]["qlora_over_peft"], speed["goals"]["qlora_slowdown"]
    assert over["median_ratio"] == rows["jax_qlora"]["tokens_per_s_median"] / rows["peft_qlora"]["tokens_per_s_median"]
    per_round = [p / q for q, p in zip(rows["jax_qlora"]["step_s_all"], rows["peft_qlora"]["step_s_all"])]
    assert (over["round_min"], over["round_max"]) == (min(per_round), max(per_round))
    assert slow["median_ratio"] == rows["jax_lora"]["tokens_per_s_median"] / rows["jax_qlora"]["tokens_per_s_median"]
    assert over["met"] == (over["median_ratio"] >= 1.5) and slow["met"] == (slow["median_ratio"] <= 1.3)


def test_markdown_goal_lines_and_load(bench, report):
    markdown = (bench[1] / "benchmark_qlora.md").read_text()
    assert "Goal bytes per quantized parameter <= 0.52: **met** (tiny 0.51628)." in markdown
    assert "Goal GPT-2 XL whole state (step arguments) QLoRA / fp32 LoRA <= 0.2: not measured." in markdown
    over = report["speed"]["goals"]["qlora_over_peft"]
    assert (f"Goal jax_qlora >= 1.5x peft_qlora: **{'met' if over['met'] else 'not met'}**, "
            f"{over['median_ratio']:.2f}x") in markdown
    assert "Load average (1 / 5 / 15 min, `os.getloadavg()`): " in markdown
    assert ("**Preliminary, measured under load" in markdown) == report["preliminary"] == \
        (report["load_average_start"][0] > 2.5)
    table = [line for line in markdown.splitlines() if line.startswith(("| fp32 LoRA", "| QLoRA", "| jax_", "| peft_"))]
    assert [line.split(" | ")[0] for line in table] == ["| fp32 LoRA", "| QLoRA (NF4 base)", "| jax_qlora",
                                                        "| peft_qlora", "| jax_lora"]


def test_report_rerenders_byte_for_byte(bench, report, tmp_path):
    bench_module = load_example("benchmark_qlora")
    paths = bench_module.write_qlora_report(report, str(tmp_path / "x"))
    assert [Path(p).read_bytes() for p in paths] == [(bench[1] / f"benchmark_qlora{e}").read_bytes()
                                                     for e in (".json", ".md")]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--repeats", "0", "--threads", "-1"], "--threads must be >= 1, got -1; --repeats must be >= 1, got 0"),
        (["--configs", "small,medium"], "--configs 'small,medium': expected a comma-separated list of small, xl"),
        (["--parts", "memory,flops"], "--parts 'memory,flops': expected a comma-separated list of memory, speed"),
        (["--tiny", "--configs", "xl"], "--tiny replaces the memory shapes with one tiny GPT-2"),
        (["--out-dir", "/nonexistent_qlora_dir"], "--out-dir '/nonexistent_qlora_dir' does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()  # one line: no usage block, no traceback
    assert line.startswith("benchmark_qlora.py: error: ") and message in line
