"""Smoke test of examples/benchmark_mixed_batch.py: one ``--tiny`` run, checked through what it writes.

The script runs as a real subprocess (its thread settings must precede the first jax import) on a one-layer,
width-64 GPT-2, batch 5 x 16, two timed rounds. Timings are never asserted, only their consistency with
the ratios and the report's structure. The mixed-batch alternatives are also checked in process against
lora_jax's gather, on their own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from example_scripts import EXAMPLES, load_example
from lora_jax.mixed_batch import mixed_dense_branch

SCRIPT = EXAMPLES / "benchmark_mixed_batch.py"
ROUNDS = 2
MODEL_ROWS = [("jax_single", "forward", "single"), ("jax_mixed", "forward", "mixed"),
              ("jax_mixed_onehot", "forward", "mixed"), ("jax_mixed_ragged_dot", "forward", "mixed"),
              ("jax_single", "train", "single"), ("jax_mixed", "train", "mixed"),
              ("torch_single", "forward", "single"), ("torch_mixed", "forward", "mixed"),
              ("peft_single", "forward", "single"), ("peft_mixed", "forward", "mixed"),
              ("torch_single", "train", "single"), ("torch_mixed", "train", "mixed"),
              ("peft_single", "train", "single")]  # PEFT refuses adapter_names in training: no peft_mixed train
MODULES = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
METHODS = ["base_matmul", "single", "gather", "onehot", "ragged_dot"]
# fp32: the alternatives sum the same products in another order (or add exact zeros); differences of a
# few ulp of the largest value, ~1e-7 relative seen. 1e-5 is the script's own ALTERNATIVE_RTOL.
RTOL = 1e-5


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("mixed")
    argv = [sys.executable, str(SCRIPT), "--tiny", "--repeats", str(ROUNDS), "--steps", "1", "--warmup", "0",
            "--threads", "2", "--out-dir", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, out


@pytest.fixture(scope="module")
def report(bench) -> dict:
    return json.loads((bench[1] / "benchmark_mixed_batch.json").read_text())


def test_writes_json_and_markdown_only(bench):
    proc, out = bench
    expected = [str(out / "benchmark_mixed_batch.json"), str(out / "benchmark_mixed_batch.md")]
    assert [line.removeprefix("wrote ") for line in proc.stdout.splitlines() if line.startswith("wrote ")] == expected
    assert sorted(p.name for p in out.iterdir()) == ["benchmark_mixed_batch.json", "benchmark_mixed_batch.md"]


def test_json_rows_workload_and_load(report):
    assert report["shape"] == dict(n_embd=64, n_layer=1, n_head=2, vocab=512, batch=5, seq=16)
    assert report["names"] == ["default", "a1", "a2", "a3", "__base__"]  # every adapter and the base appear
    assert (report["repeats"], report["steps"], report["warmup"], report["machine"]["threads"]) == (ROUNDS, 1, 0, 2)
    assert len(report["load_average_start"]) == 3 and len(report["load_average_end"]) == 3
    rows = [(r["name"], r["kind"], r["batch"]) for r in report["results"]]
    assert rows == MODEL_ROWS + [(f"{m}:{k}", k, "mixed") for m in MODULES for k in METHODS]
    assert all(len(r["s_all"]) == ROUNDS for r in report["results"])
    by = {(r["name"], r["kind"]): r for r in report["results"]}
    # The whole-model alternatives really run their own branch (a cached gather trace would give equal FLOPs):
    # onehot and ragged_dot compute all K + 1 slots on every token row.
    gather_flops = by[("jax_mixed", "forward")]["xla_flops"]
    assert by[("jax_mixed_onehot", "forward")]["xla_flops"] > 1.3 * gather_flops
    assert by[("jax_mixed_ragged_dot", "forward")]["xla_flops"] > 1.3 * gather_flops


def test_alternatives_agree_with_gather(report):
    checks = report["checks"]
    assert list(checks) == ["jax_mixed_onehot", "jax_mixed_ragged_dot"] + [
        f"{m}:{k}" for m in MODULES for k in ("onehot", "ragged_dot")]
    for name, check in checks.items():
        assert check["rel_to_max"] <= RTOL, name
        assert check["max_abs_diff"] == pytest.approx(check["rel_to_max"] * check["reference_max_abs"], rel=1e-12)
    # The adapters (non-zero B) move the logits by far more than the tolerance: the agreement means something.
    assert min(checks[n]["adapters_move_logits_by"] for n in ("jax_mixed_onehot", "jax_mixed_ragged_dot")) > 0.05


def test_ratios_follow_from_the_times(report):
    by = {(r["name"], r["kind"]): r for r in report["results"]}
    ratios = report["ratios"]
    assert list(ratios["mixed_cost_over_single"]) == ["jax forward", "jax train", "torch forward", "torch train",
                                                      "peft forward"]
    jax_fwd = ratios["mixed_cost_over_single"]["jax forward"]
    mixed, single = by[("jax_mixed", "forward")], by[("jax_single", "forward")]
    assert jax_fwd["median_ratio"] == pytest.approx(mixed["s_median"] / single["s_median"], rel=1e-12)
    per_round = [m / s for m, s in zip(mixed["s_all"], single["s_all"])]
    assert (jax_fwd["round_min"], jax_fwd["round_max"]) == (min(per_round), max(per_round))
    speed = ratios["jax_mixed_speed_over_peft_mixed"]
    assert speed["median_ratio"] == pytest.approx(by[("peft_mixed", "forward")]["s_median"] / mixed["s_median"])
    goals = ratios["goals"]
    assert goals["jax_mixed_at_least_2x_peft_mixed"] == (speed["median_ratio"] >= 2.0)
    assert goals["mixed_at_most_1.25x_single"] == (
        max(ratios["mixed_cost_over_single"][f"jax {k}"]["median_ratio"] for k in ("forward", "train")) <= 1.25)
    assert set(ratios["branch_layer_s"]) == set(METHODS)
    assert ratios["branch_layer_s"]["gather"] == pytest.approx(sum(by[(f"{m}:gather", "gather")]["s_median"]
                                                                   for m in MODULES))
    assert ratios["fastest"]["branch"] in ("gather", "onehot", "ragged_dot")


def test_markdown_command_goals_and_tables(bench, report):
    markdown = (bench[1] / "benchmark_mixed_batch.md").read_text()
    assert "Command: `python " in markdown
    assert "benchmark_mixed_batch.py --tiny --repeats 2 --steps 1 --warmup 0 --threads 2 --out-dir " in markdown
    assert "Load average (1 / 5 / 15 min, `os.getloadavg()`): " in markdown
    goals = report["ratios"]["goals"]
    verdict = lambda met: "met" if met else "not met"  # noqa: E731
    assert (f"- Mixed batch costs at most 1.25x the single-adapter batch (lora_jax): "
            f"**{verdict(goals['mixed_at_most_1.25x_single'])}**") in markdown
    assert (f"- lora_jax's mixed forward at least 2x PEFT's mixed forward: "
            f"**{verdict(goals['jax_mixed_at_least_2x_peft_mixed'])}**") in markdown
    table = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| row")
             and not line.startswith("| module")]
    assert len(table) == len(MODEL_ROWS) + len(MODULES) * len(METHODS)
    assert "| peft_mixed | forward | mixed |" in markdown and "| peft_mixed | train |" not in markdown


def test_report_rerenders_byte_for_byte(bench, report, tmp_path):
    paths = load_example("benchmark_mixed_batch").write(report, str(tmp_path))
    assert [Path(p).read_bytes() for p in paths] == [
        (bench[1] / name).read_bytes() for name in ("benchmark_mixed_batch.json", "benchmark_mixed_batch.md")]


@pytest.mark.parametrize("x_shape", [(5, 7, 12), (5, 12), (6, 2, 3, 12)])
def test_alternatives_equal_gather_per_module(x_shape):
    """Per-example routing with distinct scales, an adapter without examples, and the zero base slot."""
    script = load_example("benchmark_mixed_batch")
    keys = jax.random.split(jax.random.key(0), 3)
    k, rank, out = 4, 3, 10
    x = jax.random.normal(keys[0], x_shape)
    a = jax.random.normal(keys[1], (k + 1, 12, rank)).at[k].set(0)
    b = jax.random.normal(keys[2], (k + 1, rank, out)).at[k].set(0)
    scaling = jnp.asarray([2.0, 1.5, 1.0, 0.5, 0.0])
    ids = jnp.asarray([3, 4, 0, 3, 1, 0][: x_shape[0]], jnp.int32)  # adapter 2 has no example
    reference = mixed_dense_branch(x, ids, a, b, scaling, dtype=jnp.float32)
    for name in ("onehot_branch", "ragged_branch"):
        value = getattr(script, name)(x, ids, a, b, scaling, dtype=jnp.float32)
        assert value.shape == reference.shape
        assert script.disagreements({name: script._max_rel_diff(value, reference)}) == []
    assert float(jnp.abs(reference[1]).max()) == 0.0  # the base example gets nothing
    misrouted = mixed_dense_branch(x, ids.at[0].set(1), a, b, scaling, dtype=jnp.float32)
    # A planted bug (example 0 routed to adapter 1) is caught by the same check.
    assert [d.split()[0] for d in script.disagreements({"bug": script._max_rel_diff(misrouted, reference)})] == ["bug"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0", "--batch", "4"], "--steps must be >= 1, got 0; --batch must be >= 5, got 4 (one example "
                                           "per adapter and the base)"),
        (["--seq", "2048"], "--seq must be <= 1024 (GPT-2's n_positions), got 2048"),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--out-dir", "/nonexistent_mixed_dir"], "--out-dir '/nonexistent_mixed_dir' does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(argv, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()  # one line: no usage block, no traceback
    assert line.startswith("benchmark_mixed_batch.py: error: ") and message in line
