"""``python -m parity`` on bad input: exit 2 with one line naming the problem and the fix, before any loading.

Every case runs with ``load_pair`` and ``run_suite`` replaced by functions that fail the test, so a
case passes only if the problem is found up front (an unwritable ``--json`` must not cost a suite run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity.cli import main

REPO = Path(__file__).resolve().parents[2]
PREFIX = "python -m parity: error: "


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Makes loading a model or running the suite fail the test."""
    import parity.pair
    import parity.suite

    def refuse(*args, **kwargs):
        raise AssertionError("bad input must be reported before any model is loaded or any check runs")

    monkeypatch.setattr(parity.pair, "load_pair", refuse)
    monkeypatch.setattr(parity.suite, "run_suite", refuse)


def _adapter(directory: Path, *, targets=("c_attn",), rank=4, n_layer=2, width=32, magnitude: int | None = None,
             **config) -> Path:
    """A PEFT LoRA adapter for the tiny GPT-2, written without either half (c_attn is (32, 96)).

    ``magnitude``: also write a DoRA ``lora_magnitude_vector`` of this length per module.
    """
    from safetensors.numpy import save_file

    out = {"c_attn": 3 * width, "c_proj": width}
    tensors = {}
    for i in range(n_layer):
        for name in targets:
            key = f"base_model.model.transformer.h.{i}.attn.{name}"
            tensors[f"{key}.lora_A.weight"] = np.full((rank, width), 0.01, np.float32)
            tensors[f"{key}.lora_B.weight"] = np.full((out[name], rank), 0.02, np.float32)
            if magnitude is not None:
                tensors[f"{key}.lora_magnitude_vector"] = np.ones(magnitude, np.float32)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    fields = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 8.0, "lora_dropout": 0.0,
              "target_modules": list(targets), "fan_in_fan_out": True, "bias": "none", "use_rslora": False,
              "use_dora": False, "layers_to_transform": None, "inference_mode": True}
    fields.update(config)
    (directory / "adapter_config.json").write_text(json.dumps(fields))
    return directory


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _model_copy(tiny_gpt2_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_gpt2_dir, tmp_path / "model"))


def _bad_input(argv: list[str], capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), err
    return lines[0]


# (extra argv, key phrase); the tiny GPT-2 has 2 layers, width 32 and n_positions 64.
FLAG_CASES = {
    "targets_match_nothing": (["--targets", "q_proj"], "--targets q_proj selects no module of this GPT-2"),
    "layer_out_of_range": (["--layers", "99"], "--layers 99: no such layer, this GPT-2 has 2 layers (0-1)"),
    "rank_above_width": (["--rank", "100"],
                         "--rank 100 exceeds min(in, out) = 32 of transformer.h.0.attn.c_attn (32, 96); "
                         "pass --rank 32 or less"),
    "regex_selects_containers": (["--targets", "re:transformer\\.h\\.0\\.attn"],
                                 "which parity cannot adapt in both halves"),
    "seq_len_above_positions": (["--seq-len", "100"], "--seq-len 100 exceeds n_positions = 64"),
    "batch_size_zero": (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    "negative_seed": (["--seed", "-1"], "--seed -1 must be >= 0"),
}


@pytest.mark.parametrize("case", FLAG_CASES)
def test_flags_that_do_not_fit_the_model_exit_2(case, tiny_gpt2_dir, nothing_loaded, capsys):
    extra, phrase = FLAG_CASES[case]
    assert phrase in _bad_input(["--model", str(tiny_gpt2_dir), *extra], capsys)


ADAPTER_CASES = {
    "dora_without_magnitudes": (dict(use_dora=True), "says use_dora=true but adapter_model.safetensors has no "
                                "lora_magnitude_vector for transformer.h.0.attn.c_attn, transformer.h.1.attn.c_attn; "
                                "the file is incomplete"),
    "magnitudes_without_dora": (dict(magnitude=96), "holds DoRA magnitudes (lora_magnitude_vector) for "
                                "transformer.h.0.attn.c_attn, transformer.h.1.attn.c_attn but"),
    "magnitude_per_input_feature": (dict(use_dora=True, magnitude=32), "has shape (32,), but this GPT-2's "
                                    "transformer.h.0.attn.c_attn needs (96,)"),
    "config_targets_differ_from_tensors": (
        dict(target_modules=["c_proj"]),
        "do not match adapter_model.safetensors (selected without tensors: transformer.h.0.attn.c_proj, "
        "transformer.h.0.mlp.c_proj, transformer.h.1.attn.c_proj, transformer.h.1.mlp.c_proj; "
        "tensors not selected: transformer.h.0.attn.c_attn, transformer.h.1.attn.c_attn)"),
    "config_layers_differ_from_tensors": (dict(layers_to_transform=[0]),
                                          "tensors not selected: transformer.h.1.attn.c_attn"),
    "config_rank_differs_from_tensors": (dict(r=8), "says r=8 but its tensors have rank [4]"),
    "rank_pattern_differs_from_tensors": (
        dict(rank_pattern={"h.1.attn.c_attn": 2}),
        "rank_pattern={'h.1.attn.c_attn': 2} but its tensors have rank [4] (1 of 2 modules differ, e.g. "
        "transformer.h.1.attn.c_attn: config r=2, tensors 4/4)"),
}


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_adapter_whose_config_is_refused_or_does_not_describe_its_tensors_exits_2(case, tiny_gpt2_dir, tmp_path,
                                                                                  nothing_loaded, capsys):
    config, phrase = ADAPTER_CASES[case]
    adapter = _adapter(tmp_path / "adapter", **config)
    line = _bad_input(["--model", str(tiny_gpt2_dir), "--adapter", str(adapter)], capsys)
    assert line.startswith(PREFIX + "--adapter: ") and phrase in line


def test_adapter_path_that_is_a_file_is_named_as_a_file(tiny_gpt2_dir, tmp_path, nothing_loaded, capsys):
    adapter = _adapter(tmp_path / "adapter")
    line = _bad_input(["--model", str(tiny_gpt2_dir), "--adapter", str(adapter / "adapter_config.json")], capsys)
    assert "is a file, not an adapter directory" in line and "does not exist" not in line


def test_truncated_adapter_exits_2(tiny_gpt2_dir, tmp_path, nothing_loaded, capsys):
    adapter = _adapter(tmp_path / "adapter")
    _truncate(adapter / "adapter_model.safetensors")
    line = _bad_input(["--model", str(tiny_gpt2_dir), "--adapter", str(adapter)], capsys)
    assert "adapter_model.safetensors is not a readable safetensors file" in line and "truncated or corrupt" in line


def test_truncated_model_exits_2(tiny_gpt2_dir, tmp_path, nothing_loaded, capsys):
    model = _model_copy(tiny_gpt2_dir, tmp_path)
    _truncate(model / "model.safetensors")
    line = _bad_input(["--model", str(model)], capsys)
    assert f"{model / 'model.safetensors'} is not a readable safetensors file" in line


CONFIG_CASES = {
    "invalid_json": ('{"model_type": "gpt2", ', "config.json is not valid JSON"),
    "a_list": ("[]", "config.json must hold a JSON object, found list"),
    "missing_fields": (json.dumps({"model_type": "gpt2", "n_embd": 32}),
                       "config.json lacks positive int n_layer, n_head, n_positions, vocab_size"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_model_config_that_is_not_a_gpt2_object_exits_2_naming_the_file(case, tiny_gpt2_dir, tmp_path,
                                                                         nothing_loaded, capsys):
    text, phrase = CONFIG_CASES[case]
    model = _model_copy(tiny_gpt2_dir, tmp_path)
    (model / "config.json").write_text(text)
    line = _bad_input(["--model", str(model)], capsys)
    assert str(model / "config.json") in line and phrase in line


def _unwritable_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "a_file").write_text("x")
    (tmp / "a_dir").mkdir()
    return {
        "json_is_a_directory": (["--json", str(tmp / "a_dir")], "is a directory; pass a file path"),
        "json_parent_is_a_file": (["--json", str(tmp / "a_file" / "r.json")], "a_file is a file, not a directory"),
        "markdown_is_a_directory": (["--markdown", str(tmp / "a_dir")], "is a directory; pass a file path"),
        "markdown_bad_section": (["--markdown", str(tmp / "p.md"), "--section", "a b"], "Section name 'a b'"),
        "dump_is_a_file": (["--dump", str(tmp / "a_file")], "is a file, not a directory"),
        "dump_below_a_file": (["--dump", str(tmp / "a_file" / "d")], "a_file is a file, not a directory"),
        "json_in_proc": (["--json", "/proc/parity_report.json"], "cannot write in /proc"),
        "json_in_read_only_dir": (["--json", str(tmp / "read_only" / "r.json")], "cannot write in"),
    }


UNWRITABLE = ["json_is_a_directory", "json_parent_is_a_file", "markdown_is_a_directory", "markdown_bad_section",
              "dump_is_a_file", "dump_below_a_file", "json_in_proc", "json_in_read_only_dir"]


@pytest.mark.parametrize("case", UNWRITABLE)
def test_unwritable_output_fails_before_the_suite(case, tiny_gpt2_dir, tmp_path, nothing_loaded, capsys):
    if case == "json_in_proc" and not Path("/proc/self").is_dir():
        pytest.skip("no /proc on this system")
    if case == "json_in_read_only_dir":
        if os.geteuid() == 0:
            pytest.skip("root writes through directory permissions")
        (tmp_path / "read_only").mkdir(mode=0o555)
    extra, phrase = _unwritable_cases(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    line = _bad_input(["--model", str(tiny_gpt2_dir), "--checks", "base_forward", *extra], capsys)
    assert phrase in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # the check created nothing


@pytest.mark.parametrize("damage", ["adapter", "model"])
def test_truncated_files_exit_2_without_a_traceback_in_a_real_process(damage, tiny_gpt2_dir, tmp_path):
    model = _model_copy(tiny_gpt2_dir, tmp_path)
    argv = ["--model", str(model)]
    if damage == "adapter":
        adapter = _adapter(tmp_path / "adapter")
        _truncate(adapter / "adapter_model.safetensors")
        argv += ["--adapter", str(adapter)]
    else:
        _truncate(model / "model.safetensors")
    run = subprocess.run([sys.executable, "-m", "parity", *argv], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(PREFIX) and "is not a readable safetensors file" in last


# --quantize (QLoRA): each refused before any model loads, the message naming the choices or the fix.
QUANTIZE_CASES = {
    "unknown_format": (["--quantize", "fp4"], "--quantize fp4 is not supported; choose from nf4"),
    "bf16_compute": (["--quantize", "nf4", "--dtype", "bf16"], "the QLoRA checks run in float32 compute"),
    "gpu": (["--quantize", "nf4", "--device", "gpu"], "bit-exact against bitsandbytes' CPU kernels only"),
    "embedding_target": (["--quantize", "nf4", "--targets", "wte,c_attn"],
                         "--quantize nf4 with --targets wte,c_attn: LoRA on the token embedding transformer.wte"),
    "quantization_stage_without_quantize": (["--checks", "quantization"],
                                            "The quantization stage compares 4-bit bases; add --quantize nf4"),
}


@pytest.mark.parametrize("case", QUANTIZE_CASES)
def test_quantize_flags_that_cannot_run_exit_2(case, tiny_gpt2_dir, nothing_loaded, capsys):
    extra, phrase = QUANTIZE_CASES[case]
    assert phrase in _bad_input(["--model", str(tiny_gpt2_dir), *extra], capsys)


def test_quantize_with_several_adapters_exits_2(tiny_gpt2_dir, tmp_path, nothing_loaded, capsys):
    a, b = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    line = _bad_input(["--model", str(tiny_gpt2_dir), "--quantize", "nf4", "--adapter", f"a={a}",
                       "--adapter", f"b={b}"], capsys)
    assert "checks one adapter on the 4-bit base" in line


def test_quantize_without_bitsandbytes_names_the_install_command(tiny_gpt2_dir, nothing_loaded, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    line = _bad_input(["--model", str(tiny_gpt2_dir), "--quantize", "nf4"], capsys)
    assert 'pip install "bitsandbytes>=0.45,<0.51"' in line and "--quantize nf4 needs bitsandbytes" in line
