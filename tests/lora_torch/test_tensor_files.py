"""Atomic writes and safe reads."""

from __future__ import annotations

import pytest
import torch

from lora_torch.tensor_files import atomic_destination, read_json, read_tensors, write_json, write_safetensors


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors({"a": torch.ones(3)}, path)
    old = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_destination(path) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert path.read_bytes() == old
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_round_trip_and_json(tmp_path):
    write_safetensors({"x": torch.arange(6.0).view(2, 3).T}, tmp_path / "t.safetensors")  # non-contiguous input
    assert torch.equal(read_tensors(tmp_path / "t.safetensors")["x"], torch.arange(6.0).view(2, 3).T)
    write_json({"r": 8}, tmp_path / "c.json")
    assert read_json(tmp_path / "c.json") == {"r": 8}


def test_pt_must_hold_only_tensors(tmp_path):
    torch.save({"x": torch.ones(2), "step": 3}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="flat mapping of str -> tensor"):
        read_tensors(tmp_path / "bad.pt")


def test_unknown_suffix_and_non_object_json(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="expected .safetensors"):
        read_tensors(tmp_path / "w.npz")
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_json(tmp_path / "c.json")
