"""Input validation of checkpoint and adapter directories, before any model is built."""

from __future__ import annotations

import json

import pytest

from parity.checkpoint import module_shapes, read_gpt2_config, resolve_checkpoint, validate_adapter


def test_fixture_directory_is_a_gpt2_checkpoint(tiny_gpt2_dir):
    assert resolve_checkpoint(tiny_gpt2_dir) == tiny_gpt2_dir
    assert read_gpt2_config(tiny_gpt2_dir)["n_embd"] == 32


def test_directory_without_weights_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(FileNotFoundError, match="no weights: expected one of model.safetensors"):
        read_gpt2_config(tmp_path)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        read_gpt2_config(tmp_path)


def test_malformed_config_is_rejected_naming_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"')  # truncated
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*truncated or corrupt"):
        read_gpt2_config(tmp_path)
    (tmp_path / "config.json").write_text('["gpt2"]')
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object, found list"):
        read_gpt2_config(tmp_path)


def test_relative_path_that_does_not_exist_is_not_taken_for_a_hub_id():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint("./missing/model")


def test_module_shapes_cover_four_projections_per_layer():
    shapes = module_shapes({"n_layer": 2, "n_embd": 8})
    assert len(shapes) == 8 and shapes["transformer.h.1.mlp.c_proj"] == (32, 8)


def _write_adapter(directory, tensors: dict, peft_type="LORA"):
    from safetensors.numpy import save_file

    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type}))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def test_adapter_for_another_architecture_is_rejected(tmp_path):
    import numpy as np

    llama_like = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 32), np.float32)}
    adapter = _write_adapter(tmp_path / "a", llama_like)
    with pytest.raises(ValueError, match="names no LoRA projection of this GPT-2"):
        validate_adapter(adapter, {"n_layer": 2, "n_embd": 32})


def test_non_lora_adapter_is_rejected(tmp_path):
    import numpy as np

    adapter = _write_adapter(tmp_path / "a", {"x": np.zeros(1, np.float32)}, peft_type="IA3")
    with pytest.raises(ValueError, match="is a 'IA3' adapter; parity needs peft_type 'LORA'"):
        validate_adapter(adapter, {"n_layer": 2, "n_embd": 32})


def test_missing_adapter_directory_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="Adapter directory .* does not exist"):
        validate_adapter(tmp_path / "nope", {"n_layer": 2, "n_embd": 32})
