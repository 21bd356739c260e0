"""End-to-end tests of examples/train_gpt2_optax.py on a tiny embedded-style base built in seconds.

The example runs in-process through ``main(argv)`` (one JAX import for all tests); one test runs
it as a real subprocess to check the exit code a shell sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from lora_jax.training.checkpoint import latest_checkpoint
from example_scripts import EXAMPLES, load_example

SCRIPT = EXAMPLES / "train_gpt2_optax.py"
ADAPTER = Path("adapter") / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def example():
    return load_example("train_gpt2_optax")


def _argv(base_dir: Path, out: Path, *extra: str) -> list[str]:
    # Runs with the same settings reuse the example's cached compiled step, which keeps these tests fast.
    return ["--model", str(base_dir), "--out", str(out), "--steps", "6", "--batch-size", "4", "--seq-len", "16",
            "--rank", "2", "--lr", "1e-2", "--warmup", "1", "--eval-every", "3", "--ckpt-every", "2",
            "--dropout", "0.1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def full_run(example, base_dir, tmp_path_factory) -> Path:
    """One uninterrupted 6-step run with LoRA dropout on, so the dropout RNG path is exercised."""
    out = tmp_path_factory.mktemp("full")
    assert example.main(_argv(base_dir, out)) == 0
    return out


def _adapter(out: Path) -> dict[str, np.ndarray]:
    return load_file(out / ADAPTER)


def test_full_run_adapts_and_writes_every_output(full_run):
    results = json.loads((full_run / "results.json").read_text())
    assert results["final_heldout_loss"] < results["base_heldout_loss"]
    assert results["final_heldout_perplexity"] == pytest.approx(np.exp(results["final_heldout_loss"]), rel=1e-12)
    assert [e[0] for e in results["evals"]] == [0, 3, 6]
    assert set(results["samples"]) == {"before", "after"}
    assert (full_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    config = json.loads((full_run / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 16.0)
    tensors = _adapter(full_run)
    # 1 layer x (attn.c_attn, attn.c_proj, mlp.c_proj) x (A, B)
    assert len(tensors) == 6
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2, 32)
    assert np.abs(tensors["base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight"]).max() > 0


def test_killed_then_resumed_run_gives_the_same_adapter_bit_for_bit(example, base_dir, full_run, tmp_path):
    argv = _argv(base_dir, tmp_path)  # dropout on: the RNG stream must resume exactly too
    assert example.main(argv + ["--stop-after", "3"]) == 0  # "killed" after step 3; newest checkpoint is step 2
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    assert not (tmp_path / ADAPTER).exists()
    assert example.main(argv + ["--resume"]) == 0
    resumed, uninterrupted = _adapter(tmp_path), _adapter(full_run)
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:  # exact equality: same data, RNG and optimizer state from step 2 on
        assert np.array_equal(resumed[name], uninterrupted[name]), name
    assert json.loads((tmp_path / "results.json").read_text())["evals"] == \
        json.loads((full_run / "results.json").read_text())["evals"]


def test_resume_with_other_settings_fails_clearly_and_changes_nothing(example, base_dir, full_run, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in (full_run / "checkpoints").iterdir()}
    code = example.main(_argv(base_dir, full_run, "--rank", "4", "--resume"))
    assert code == example.EXIT_BAD_SETTINGS
    err = capsys.readouterr().err
    assert "rank: checkpoint 2, this run 4" in err and "--out" in err
    assert {p.name: p.stat().st_mtime_ns for p in (full_run / "checkpoints").iterdir()} == before


def test_nan_loss_stops_with_exit_3_and_keeps_last_good_checkpoint(example, base_dir, tmp_path, capsys):
    code = example.main(_argv(base_dir, tmp_path, "--inject-nan-at", "4"))
    assert code == example.EXIT_NON_FINITE
    assert "non-finite training loss at step 4" in capsys.readouterr().err
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    assert not (tmp_path / ADAPTER).exists()


def test_gradient_accumulation_equals_the_big_batch(example, base_dir, tmp_path):
    big, accumulated = tmp_path / "big", tmp_path / "accum"
    common = ["--steps", "3", "--eval-every", "3", "--dropout", "0"]  # masks would differ by micro-batch
    assert example.main(_argv(base_dir, big, *common, "--batch-size", "4")) == 0
    assert example.main(_argv(base_dir, accumulated, *common, "--batch-size", "2", "--grad-accum", "2")) == 0
    a, b = _adapter(big), _adapter(accumulated)
    for name in a:
        # Same 4 windows per step; only the summation order of the mean gradient differs (float32
        # rounding ~1e-7 relative), which Adam's normalised step keeps at that scale.
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert json.loads((big / "results.json").read_text())["final_heldout_loss"] == pytest.approx(
        json.loads((accumulated / "results.json").read_text())["final_heldout_loss"], rel=1e-5)


def test_cli_subprocess_bf16_on_a_text_file_and_a_two_device_mesh(base_dir, tmp_path):
    data = tmp_path / "notes.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    argv = _argv(base_dir, tmp_path / "out", "--data", str(data), "--mesh", "data=2", "--dtype", "bf16", "--steps", "3",
                 "--warmup", "0", "--eval-every", "3")
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["data"] == str(data) and results["devices"] == 2 and results["settings"]["dtype"] == "bf16"
    # A repeated sentence is easy to learn: three steps at lr 1e-2 must already lower the held-out loss.
    assert results["final_heldout_loss"] < results["base_heldout_loss"]


@pytest.mark.parametrize("flag, value, message", [
    ("--grad-accum", "0", "--grad-accum must be >= 1"),
    ("--warmup", "6", "--warmup must be in [0, --steps)"),
])
def test_bad_flags_exit_2_with_the_reason(example, base_dir, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        example.main(_argv(base_dir, tmp_path, flag, value))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
