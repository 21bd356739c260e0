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
    names = ["bench.json", "bench.md", "bench.png", "bench_scaling.png"]  # the committed run has the --scaling table
    assert paths == [str(tmp_path / name) for name in names]
    assert sorted(p.name for p in tmp_path.iterdir()) == names  # no temp files
    assert Path(paths[0]).read_bytes() == committed.read_bytes()
    assert Path(paths[1]).read_bytes() == (DOCS / "benchmark_cpu.md").read_bytes()
    assert all(Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in paths[2:])



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


def _result(name: str, seconds: list[float], framework: str = "torch", dtype: str = "float32", **extra) -> dict:
    tokens = 512
    median = sorted(seconds)[len(seconds) // 2]
    return {"name": name, "framework": framework, "training": "lora", "dtype": dtype, "step_s_median": median,
            "step_s_all": seconds, "tokens_per_s_median": tokens / median, "tokens_per_s_min": tokens / max(seconds),
            "tokens_per_s_max": tokens / min(seconds), "flops_per_step": 265e9, "warmup_s": 1.0, **extra}


def _peak(dtype: str, jax_gflops: float, torch_gflops: float) -> dict:
    return {"gflops": max(jax_gflops, torch_gflops), "jax_gflops": jax_gflops, "torch_gflops": torch_gflops,
            "shape": [1024, 1024, 1024], "dtype": dtype}


def _issue13_report() -> dict:
    machine = {"cpu": "Test CPU", "logical_cores": 2, "threads": 2, "torch_threads": 2, "platform": "linux",
               "python": "3.11", "versions": {"jax": "0"},
               "cpu_bf16": {"avx512_bf16": False, "amx_bf16": False, "amx_tile": False, "avx512f": False,
                            "avx_vnni": False, "avx2": True}}
    workload = {"n_layer": 12, "n_embd": 768, "batch": 4, "seq": 128, "dtype": "float32"}
    # Rounds: jax_lora 2.0 s, the best peer qwix 2.5 s (x1.25); round ratios 2.4/2.0=1.2 .. 2.6/2.0=1.3.
    results = [_result("jax_lora", [2.0, 2.0, 2.0], "jax", utilisation_vs_own_roof=0.5, first_loss=10.8),
               _result("peft", [4.0, 4.0, 4.0]),
               _result("qwix", [2.4, 2.5, 2.6], "jax", first_loss=10.8)]
    bf16 = {"workload": {"n_layer": 1, "batch": 2, "seq": 32}, "skipped": [],
            "matmul_peaks": {"float32": _peak("float32", 100.0, 80.0), "bfloat16": _peak("bfloat16", 20.0, 0.25)},
            "results": [_result("jax_lora", [1.0], "jax"), _result("jax_lora_bf16", [2.0], "jax", "bfloat16"),
                        _result("peft", [2.0]), _result("peft_bf16", [80.0], dtype="bfloat16")]}
    scaling = [{"batch": b, "seq": t, "skipped": [],
                "results": [_result("jax_lora", [s], "jax"), _result("peft", [2 * s])]}
               for b, t, s in ((4, 128, 1.0), (2, 512, 2.0))]
    return {"command": "python x", "machine": machine, "steps": 3, "warmup": 1, "bf16": bf16, "scaling": scaling,
            "configs": [{"preset": "small", "workload": workload, "matmul_peak": _peak("float32", 136.0, 117.0),
                         "matmul_peaks": {"float32": _peak("float32", 136.0, 117.0)}, "results": results,
                         "skipped": [], "memory_table": []}]}


def test_issue13_sections_render_goals_roofs_qwix_bf16_and_scaling(tmp_path):
    report_module = load_example("benchmark_report")
    report = _issue13_report()
    assert report_module.best_peer_ratio(report["configs"][0]["results"]) == {
        "peer": "qwix", "median_ratio": pytest.approx(1.25), "round_min": pytest.approx(1.2),
        "round_max": pytest.approx(1.3)}
    paths = report_module.write_report(report, str(tmp_path / "bench"))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["bench.json", "bench.md", "bench.png", "bench_scaling.png"]
    assert (tmp_path / "bench_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "bench.md").read_text()
    assert ("Matmul roofs measured in this run, GFLOP/s, best of 10: float32 (1024x1024x1024) XLA 136, torch 117 "
            "(XLA / torch 1.16).") in md
    assert ("the best is qwix; jax_lora is 1.25x it (round by round [1.20, 1.30]), **met**. jax_lora >= 60% of "
            "the XLA float32 roof: 50%, **not met**.") in md
    assert "first-step loss 10.800000 vs jax_lora 10.800000 (|difference| 0.0e+00)" in md
    assert "no native bf16 instructions (neither avx512_bf16 nor amx_bf16; present: avx2)" in md
    assert "| jax_lora_bf16 | bfloat16 | 256.0 [256.0, 256.0] | 0.50 | - |" in md  # 512 tokens / 2 s; 1 s in fp32
    assert "| peft_bf16 | bfloat16 | 6.4 [6.4, 6.4] | 0.03 | - |" in md  # 80 s vs 2 s in fp32
    assert "| batch x seq | jax_lora | peft | jax_lora / peft |" in md
    assert "| 2 x 512 | 256 [256, 256] | 128 [128, 128] | 2.00 |" in md
