"""End-to-end test of examples/train_gpt2_torch.py on a tiny embedded-style base built in seconds.

The full flow runs as a real subprocess, so the exit code a shell sees is what is checked; the
settings checks run in-process through ``main(argv)``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2LMHeadModel

from lora_torch import load_adapter, lora_module_names
from example_scripts import EXAMPLES, load_example

SCRIPT = EXAMPLES / "train_gpt2_torch.py"


@pytest.fixture(scope="module")
def example():
    return load_example("train_gpt2_torch")


@pytest.fixture(scope="module")
def run(base_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("torch_run")
    argv = [sys.executable, str(SCRIPT), "--model", str(base_dir), "--out", str(out), "--steps", "4",
            "--batch-size", "2", "--seq-len", "16", "--rank", "2", "--sample-tokens", "8", "--lr", "1e-2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env), out


def test_flow_exits_zero_and_merged_greedy_matches(run):
    proc, _ = run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "merged greedy tokens match the LoRA model: True" in proc.stdout
    assert "trainable params: 704 ||" in proc.stdout  # 1 layer x r=2 x ((32+96) + (32+32) + (128+32))
    assert "train: 100%" in proc.stderr  # the tqdm bar, which writes to stderr


def test_outputs_are_written_and_consistent(run, base_dir):
    _, out = run
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    results = json.loads((out / "results.json").read_text())
    assert results["merged_greedy_match"] is True and results["trainable"] == 704
    assert math.isfinite(results["heldout_loss_before"]) and math.isfinite(results["heldout_loss_after"])
    # The PEFT directory and the flat file hold the same trained tensors (A.T in PEFT layout).
    flat = load_file(out / "lora_weights.safetensors")
    model = load_adapter(GPT2LMHeadModel.from_pretrained(base_dir), out / "adapter")
    assert len(lora_module_names(model)) == 3
    a = model.transformer.h[0].mlp.c_proj.lora.lora_A
    assert torch.equal(a, flat["transformer.h.0.mlp.c_proj.lora.lora_A"])
    assert torch.count_nonzero(flat["transformer.h.0.mlp.c_proj.lora.lora_B"]).item() > 0  # training moved B


def test_bad_flags_exit_with_code_2(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--rank", "0", "--steps", "5"])
    assert exit_info.value.code == example.EXIT_BAD_SETTINGS == 2
    assert "--rank must be >= 1" in capsys.readouterr().err


def test_seq_len_beyond_model_positions_exits_with_code_2(example, base_dir, tmp_path, capsys):
    code = example.main(["--model", str(base_dir), "--out", str(tmp_path), "--seq-len", "100000", "--no-progress"])
    assert code == 2
    assert "exceeds the model's n_positions" in capsys.readouterr().err


def test_heldout_loss_in_batches_equals_one_pass(example, base_dir):
    model = GPT2LMHeadModel.from_pretrained(base_dir)
    ids = torch.arange(5 * 16) % 300  # 5 windows of 16 tokens
    one_pass = example.heldout_loss(model, ids, 16, "cpu", batch_size=5)
    batched = example.heldout_loss(model, ids, 16, "cpu", batch_size=2)  # batches of 2, 2, 1 windows
    assert math.isfinite(one_pass)
    assert batched == pytest.approx(one_pass, rel=1e-6)  # a window-weighted mean: equal up to fp32 rounding


@pytest.fixture(scope="module")
def qlora_run(base_dir, tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("torch_qlora_run")
    argv = [sys.executable, str(SCRIPT), "--model", str(base_dir), "--out", str(out), "--steps", "4",
            "--batch-size", "2", "--seq-len", "16", "--rank", "2", "--sample-tokens", "8", "--lr", "1e-2",
            "--quantize", "nf4", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env), out


def test_quantize_nf4_trains_on_a_4bit_base_and_merges_to_full_precision(qlora_run, base_dir):
    proc, out = qlora_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quantize_base: 4 layers to bitsandbytes" in proc.stderr  # c_attn, attn/mlp c_proj, c_fc of 1 block
    assert "trainable params: 704 ||" in proc.stdout  # the same LoRA as without --quantize
    # The merge dequantizes; the dense merged model's greedy tokens equal the QLoRA model's.
    assert "merged greedy tokens match the LoRA model: True" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["quantize"] == "nf4" and results["merged_greedy_match"] is True
    assert math.isfinite(results["heldout_loss_after"])
    # A QLoRA adapter is an ordinary PEFT adapter: it loads onto the full-precision base.
    model = load_adapter(GPT2LMHeadModel.from_pretrained(base_dir), out / "adapter")
    assert len(lora_module_names(model)) == 3
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.lora.lora_B).item() > 0


def test_quantize_other_than_nf4_exits_with_code_2(example, capsys):
    with pytest.raises(SystemExit) as exit_info:
        example.main(["--quantize", "fp4"])
    assert exit_info.value.code == 2
    assert "argument --quantize: invalid choice: 'fp4' (choose from" in capsys.readouterr().err


def test_quantize_without_bitsandbytes_exits_with_code_2(example, base_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    code = example.main(["--model", str(base_dir), "--out", str(tmp_path), "--quantize", "nf4", "--seq-len", "16",
                         "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: --quantize nf4: QLoRA needs bitsandbytes" in err and 'pip install "bitsandbytes>=0.45,<0.51"' in err
    assert not (tmp_path / "results.json").exists()
