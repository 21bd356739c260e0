"""The tutorial's flat save/load: round trip, and a bad file never changes the model."""

from __future__ import annotations

import logging
import os
import pickle
import stat
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from lora_torch import inject_lora, load_lora_weights, save_lora_weights

TARGETS = ["c_attn", "c_proj"]


@pytest.fixture
def saved(tiny_model, randomize_lora, tmp_path):
    """A trained-looking adapter saved from a tiny GPT-2; returns (path, tensors)."""
    inject_lora(tiny_model, TARGETS, rank=4, verbose=False)
    randomize_lora(tiny_model, seed=1)
    path = tmp_path / "lora.safetensors"
    return path, save_lora_weights(tiny_model, path)


@pytest.fixture
def target(tiny_gpt2_dir, randomize_lora):
    """A second model with the same injection and different LoRA values."""
    from transformers import GPT2LMHeadModel
    model = inject_lora(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval(), TARGETS, rank=4, verbose=False)
    randomize_lora(model, seed=2)
    return model


def test_round_trip_is_bit_exact(saved, target, token_ids, capsys, caplog):
    path, tensors = saved
    assert len(tensors) == 12 and all(name.endswith(("lora.lora_A", "lora.lora_B")) for name in tensors)
    with caplog.at_level(logging.INFO, logger="lora_torch.lora_weights"):
        load_lora_weights(target, path)
    state = target.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in tensors.items())
    assert [r.getMessage() for r in caplog.records] == [f"load_lora_weights: loaded 12 tensors from {path}"]
    assert capsys.readouterr().out == ""  # a library logs, it does not print


def test_save_leaves_no_temp_files(saved):
    path, _ = saved
    assert sorted(p.name for p in path.parent.iterdir()) == ["lora.safetensors"]


def test_saved_file_mode_follows_umask(tiny_model, tmp_path):
    inject_lora(tiny_model, TARGETS, rank=4, verbose=False)
    old = os.umask(0o022)
    try:
        save_lora_weights(tiny_model, tmp_path / "lora.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "lora.safetensors").stat().st_mode) == 0o644  # mkstemp gave 0o600


def test_next_save_removes_temp_of_a_killed_writer(saved, tiny_model):
    path, _ = saved
    child = subprocess.Popen(["true"])
    child.wait()  # reaped: its pid is dead, like a SIGKILLed writer's
    leftover = path.parent / f".{path.name}.tmp-{child.pid}-0a1b2c3d"
    leftover.write_bytes(b"half a file")
    save_lora_weights(tiny_model, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["lora.safetensors"]


def _with_values(tensors, name, values):
    return {**tensors, name: values}


def test_nan_values_are_refused_unless_allowed(saved, target, tmp_path, snapshot, assert_same_state):
    _, tensors = saved
    key = "transformer.h.1.attn.c_proj.lora.lora_B"
    poisoned = tensors[key].clone()
    poisoned[0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    bad = tmp_path / "nan.safetensors"
    save_file(_with_values(tensors, key, poisoned), bad)
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"{key} holds 3 NaN or inf values \(of 128\).*allow_nonfinite=True"):
        load_lora_weights(target, bad)
    assert_same_state(target, before)
    load_lora_weights(target, bad, allow_nonfinite=True)
    assert torch.isnan(target.transformer.h[1].attn.c_proj.lora.lora_B).sum().item() == 1


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_non_float_tensors_are_refused(saved, target, tmp_path, dtype, snapshot, assert_same_state):
    _, tensors = saved
    key = "transformer.h.0.attn.c_attn.lora.lora_A"
    bad = tmp_path / "int.safetensors"
    save_file(_with_values(tensors, key, tensors[key].to(dtype)), bad)
    before = snapshot(target)
    with pytest.raises(ValueError, match=rf"{key} has dtype {dtype}\. LoRA weights are floating point"):
        load_lora_weights(target, bad)
    assert_same_state(target, before)


def test_pt_file_loads_through_weights_only(saved, target, tmp_path):
    _, tensors = saved
    torch.save(tensors, tmp_path / "lora.pt")
    load_lora_weights(target, tmp_path / "lora.pt")
    assert torch.equal(target.transformer.h[1].attn.c_proj.lora.lora_B, tensors["transformer.h.1.attn.c_proj.lora.lora_B"])


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def _truncate(path, _tensors, tmp_path):
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    return bad


def _garbage(_path, _tensors, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    return bad


def _drop_one(_path, tensors, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.startswith("transformer.h.1.attn.c_attn")}, bad)
    return bad


def _extra_key(_path, tensors, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({**tensors, "transformer.h.0.mlp.c_fc.lora.lora_A": torch.zeros(32, 4)}, bad)
    return bad


def _wrong_shape(_path, tensors, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({**tensors, "transformer.h.0.attn.c_attn.lora.lora_A": torch.zeros(32, 8)}, bad)
    return bad


def _pickled_code(_path, _tensors, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(pickle.dumps({"x": _Payload()}, protocol=2))
    return bad


@pytest.mark.parametrize(("make_bad", "message"), [
    (_truncate, "truncated or corrupt"),
    (_garbage, "truncated or corrupt"),
    (_drop_one, r"missing 2 tensors"),
    (_extra_key, r"1 unknown tensors"),
    (_wrong_shape, r"shape \(32, 8\), the model needs \(32, 4\)"),
    (_pickled_code, "weights_only=True"),
])
def test_bad_file_raises_and_leaves_model_untouched(saved, target, tmp_path, make_bad, message, snapshot,
                                                    assert_same_state, capsys):
    path, tensors = saved
    bad = make_bad(path, tensors, tmp_path)
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        load_lora_weights(target, bad)
    assert_same_state(target, before)
    assert "pickled code ran" not in capsys.readouterr().out


def test_missing_file_and_model_without_lora(tiny_gpt2_dir, saved, tmp_path):
    from transformers import GPT2LMHeadModel
    path, _ = saved
    plain = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(ValueError, match="inject_lora"):
        load_lora_weights(plain, path)
    with pytest.raises(ValueError, match="inject_lora"):
        save_lora_weights(plain, tmp_path / "x.safetensors")
    model = inject_lora(plain, TARGETS, rank=4, verbose=False)
    with pytest.raises(FileNotFoundError):
        load_lora_weights(model, tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", ["lora.pt", "lora.npz", "lora"])
def test_save_refuses_a_name_load_would_not_read(tiny_model, tmp_path, name):
    inject_lora(tiny_model, TARGETS, rank=4, verbose=False)
    with pytest.raises(ValueError, match=r"writes safetensors; name the file \*\.safetensors"):
        save_lora_weights(tiny_model, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
