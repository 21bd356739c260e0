"""Loading HF GPT-2 checkpoints into the Flax GPT-2, and saving them back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import GPT2LMHeadModel

from lora_jax.gpt2.loading import load_gpt2, save_gpt2
from lora_jax.gpt2.model import GPT2

torch.backends.cuda.matmul.allow_tf32 = False


def _hf_logits(model_dir: Path, ids: np.ndarray) -> np.ndarray:
    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def _flax_logits(model_dir: Path, ids: np.ndarray, dtype=jnp.float32) -> np.ndarray:
    config, params = load_gpt2(model_dir)
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(GPT2(config, dtype=dtype).apply)({"params": params}, jnp.asarray(ids)))


def _ids(vocab_size: int, shape=(2, 13), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, shape)


def _copy_with_tensors(src: Path, dst: Path, tensors: dict[str, np.ndarray]) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("fixture", ["tiny_gpt2_dir", "alt_gpt2_dir"])
def test_fp32_logits_match_transformers(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = _ids(vocab)
    # Same fp32 math in both frameworks, only kernels and summation order differ. Logits here
    # are |x| < 0.5 and the observed gap is ~1.3e-7 (a few fp32 ulps through 2-3 layers);
    # 1e-5 leaves room for other BLAS builds while any layout error moves logits by ~0.1.
    np.testing.assert_allclose(_flax_logits(model_dir, ids), _hf_logits(model_dir, ids), atol=1e-5, rtol=0)


def test_bf16_compute_is_close_to_transformers(alt_gpt2_dir):
    ids = _ids(97)
    bf16 = _flax_logits(alt_gpt2_dir, ids, dtype=jnp.bfloat16)
    reference = _hf_logits(alt_gpt2_dir, ids)
    # bf16 keeps 8 mantissa bits (relative 4e-3 per rounding). Logits here are |x| < 0.4 and the
    # observed gap is ~3e-3 after 3 layers; 1.5e-2 is 5x that, still far below a layout error (~0.1).
    assert np.abs(bf16 - reference).max() < 1.5e-2
    assert (bf16.argmax(-1) == reference.argmax(-1)).mean() > 0.9


def test_keys_without_prefix_and_with_tied_head_load(tiny_gpt2_dir, tmp_path):
    raw = load_file(str(tiny_gpt2_dir / "model.safetensors"))
    tensors = {k.removeprefix("transformer."): v for k, v in raw.items()}
    tensors["lm_head.weight"] = tensors["wte.weight"]
    tensors["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # old-style mask buffer
    _, params = load_gpt2(_copy_with_tensors(tiny_gpt2_dir, tmp_path / "bare", tensors))
    _, reference = load_gpt2(tiny_gpt2_dir)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), params, reference))


def test_pytorch_bin_loads_with_weights_only(tiny_gpt2_dir, tmp_path):
    state = {k: torch.from_numpy(v) for k, v in load_file(str(tiny_gpt2_dir / "model.safetensors")).items()}
    (tmp_path / "bin").mkdir()
    shutil.copy(tiny_gpt2_dir / "config.json", tmp_path / "bin" / "config.json")
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    _, params = load_gpt2(tmp_path / "bin")
    expected = state["transformer.h.1.mlp.c_fc.weight"].numpy()
    np.testing.assert_array_equal(params["transformer"]["h"]["1"]["mlp"]["c_fc"]["kernel"], expected)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), "missing h.1.mlp.c_fc.bias"),
        (lambda t: t.update({"transformer.h.9.ln_1.weight": np.ones(32, np.float32)}), "unexpected h.9.ln_1.weight"),
        (
            lambda t: t.update({"transformer.h.0.attn.c_attn.weight": np.ones((96, 32), np.float32)}),
            r"h.0.attn.c_attn.weight has shape \(96, 32\), expected \(32, 96\)",
        ),
        (lambda t: t.update({"lm_head.weight": np.zeros((101, 32), np.float32)}), "tied output head"),
    ],
)
def test_bad_checkpoints_name_the_key(tiny_gpt2_dir, tmp_path, edit, message):
    tensors = load_file(str(tiny_gpt2_dir / "model.safetensors"))
    edit(tensors)
    with pytest.raises(ValueError, match=message):
        load_gpt2(_copy_with_tensors(tiny_gpt2_dir, tmp_path / "bad", tensors))


def test_missing_files_raise_file_not_found(tiny_gpt2_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    shutil.copy(tiny_gpt2_dir / "config.json", tmp_path / "empty" / "config.json")
    with pytest.raises(FileNotFoundError, match="No weights"):
        load_gpt2(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_gpt2(tmp_path / "does_not_exist")


def test_save_round_trips_through_transformers(alt_gpt2_dir, tmp_path):
    config, params = load_gpt2(alt_gpt2_dir)
    out = save_gpt2(params, config, tmp_path / "saved", extra_config={"bos_token_id": 5})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == 5
    ids = _ids(97, seed=3)
    # Bit-identical weights in both directories, so transformers' outputs must match exactly.
    np.testing.assert_array_equal(_hf_logits(out, ids), _hf_logits(alt_gpt2_dir, ids))
    _, reloaded = load_gpt2(out)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), params, reloaded))


def test_save_rejects_a_tree_that_does_not_fit_the_config(tiny_gpt2_dir, alt_gpt2_dir, tmp_path):
    config, _ = load_gpt2(tiny_gpt2_dir)
    _, other = load_gpt2(alt_gpt2_dir)
    with pytest.raises(ValueError, match="wte.embedding has shape"):
        save_gpt2(other, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
