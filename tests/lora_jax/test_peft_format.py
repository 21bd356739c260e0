"""PEFT adapter directories, checked against the real peft + transformers on a saved tiny GPT-2."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.numpy
import torch
from transformers import GPT2LMHeadModel

from lora_jax.config import LoraConfig
from lora_jax.forward import lora_apply
from lora_jax.gpt2.loading import load_gpt2
from lora_jax.gpt2.model import GPT2
from lora_jax.initialize import init_lora
from lora_jax.peft_format import CONFIG_FILE, WEIGHTS_FILE, load_adapter, save_adapter
from lora_jax.targets import dotted_name, resolve_targets
from tests.lora_jax.encoder_model import with_random_b

TARGETS = ["c_attn", "c_proj", "c_fc"]
IDS = np.array([[5, 17, 99, 3, 42, 0, 7, 64], [1, 2, 3, 4, 5, 6, 7, 8]])
# fp32 on both sides, highest matmul precision, logits of order 1 after 2 layers: observed max
# differences are ~1e-6; 1e-5 leaves room for different summation orders, while a wrong
# scaling, a missing transpose or a dropped module changes logits by more than 1e-2.
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    # Only matters on GPU (CPU never uses TF32); keeps the 1e-5 tolerance honest there.
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    config, params = load_gpt2(tiny_gpt2_dir)
    return GPT2(config), params


def jax_logits(model, params, adapter):
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(lora_apply(model.apply))(params, adapter, jnp.asarray(IDS)))


def torch_logits(model):
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.numpy()


@pytest.mark.parametrize(("rank", "rslora"), [(1, False), (8, True)])
def test_adapter_saved_here_loads_in_peft(gpt2, tiny_gpt2_dir, tmp_path, rank, rslora):
    model, params = gpt2
    config = LoraConfig(rank=rank, alpha=16.0, target_modules=TARGETS, use_rslora=rslora)
    lora = with_random_b(init_lora(params, config, jax.random.key(rank)), scale=0.3)
    save_adapter(tmp_path, lora, base_model_name_or_path=str(tiny_gpt2_dir))
    base = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    plain = torch_logits(base)
    adapted = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    ours = jax_logits(model, params, lora)
    np.testing.assert_allclose(torch_logits(adapted), ours, atol=ATOL, rtol=0)
    assert np.abs(ours - plain).max() > 1e-2  # the adapter really changes the logits
    # And our own loader returns the very same numbers.
    back = load_adapter(tmp_path, params)
    assert back.config == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, lora)


def peft_adapter(directory, base_dir, rank, rslora, **extra):
    torch.manual_seed(rank)
    base = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    peft_config = peft.LoraConfig(
        r=rank, lora_alpha=12, target_modules=TARGETS, fan_in_fan_out=True, use_rslora=rslora, lora_dropout=0.0, **extra
    )
    model = peft.get_peft_model(base, peft_config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)  # PEFT initialises B to zero; make the check meaningful
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize(("rank", "rslora"), [(8, False), (1, True)])
def test_adapter_made_by_peft_loads_here(gpt2, tiny_gpt2_dir, tmp_path, rank, rslora):
    model, params = gpt2
    peft_model = peft_adapter(tmp_path, tiny_gpt2_dir, rank, rslora)
    adapter = load_adapter(tmp_path, params)
    config = adapter.config
    assert (config.rank, config.alpha, config.use_rslora) == (rank, 12, rslora)
    np.testing.assert_allclose(jax_logits(model, params, adapter), torch_logits(peft_model), atol=ATOL, rtol=0)


@pytest.mark.parametrize("pattern", [{}, {"layers_pattern": "h"}])
def test_peft_layers_to_transform_selects_the_same_modules(gpt2, tiny_gpt2_dir, tmp_path, pattern):
    _, params = gpt2
    peft_adapter(tmp_path, tiny_gpt2_dir, 2, False, layers_to_transform=[1], **pattern)
    adapter = load_adapter(tmp_path, params)
    assert adapter.config.layers_to_transform == (1,)
    assert list(adapter.weights["transformer"]["h"]) == ["1"]
    assert sorted(adapter.weights["transformer"]["h"]["1"]) == ["attn", "mlp"]


@pytest.fixture()
def saved(gpt2, tmp_path):
    _, params = gpt2
    config = LoraConfig(rank=2, target_modules=["c_attn"])
    save_adapter(tmp_path, init_lora(params, config, jax.random.key(0)))
    return tmp_path


def test_format_on_disk(saved):
    meta = json.loads((saved / CONFIG_FILE).read_text())
    assert {k: meta[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "fan_in_fan_out", "target_modules", "bias")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 16.0, "fan_in_fan_out": True,
        "target_modules": ["c_attn"], "bias": "none",
    }
    tensors = safetensors.numpy.load_file(saved / WEIGHTS_FILE)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2, 32)  # A.T (r, in)
    assert tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"].shape == (96, 2)  # B.T (out, r)
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float32)}
    assert [p.name for p in saved.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_wrong_model_is_refused(saved, alt_gpt2_dir):
    _, alt_params = load_gpt2(alt_gpt2_dir)
    with pytest.raises(ValueError, match="shapes do not fit these params|do not match these params"):
        load_adapter(saved, alt_params)


def test_missing_tensor_is_refused(gpt2, saved):
    tensors = safetensors.numpy.load_file(saved / WEIGHTS_FILE)
    del tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    safetensors.numpy.save_file(tensors, saved / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"missing \['base_model.model.transformer.h.1.attn.c_attn.lora_B.weight'\]"):
        load_adapter(saved, gpt2[1])


def test_truncated_file_is_refused(gpt2, saved):
    data = (saved / WEIGHTS_FILE).read_bytes()
    (saved / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        load_adapter(saved, gpt2[1])


def edit_config(saved, **changes):
    """Rewrites the config by hand, and the weights as PEFT writes them (no digest of our config)."""
    meta = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps({**meta, **changes}))
    tensors = safetensors.numpy.load_file(saved / WEIGHTS_FILE)
    safetensors.numpy.save_file(tensors, saved / WEIGHTS_FILE, metadata={"format": "pt"})


def test_a_config_from_another_save_is_refused(gpt2, saved):
    # The weights record the digest of their config: new weights beside an old config (a torn
    # save, or a hand edit) are refused instead of loading with the wrong scaling.
    meta = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps({**meta, "lora_alpha": 4.0}))
    with pytest.raises(ValueError, match="different saves"):
        load_adapter(saved, gpt2[1])


def test_unsupported_peft_features_are_refused(gpt2, saved):
    edit_config(saved, lora_bias=True, modules_to_save=["lm_head"])
    # lora_format.peft_fields lists every refused field, one line each, in the table's order.
    with pytest.raises(ValueError, match=r"adapter_config\.json uses PEFT features(.|\n)*modules_to_save=(.|\n)*lora_bias=True"):
        load_adapter(saved, gpt2[1])


def test_missing_directory(gpt2, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere does not exist; expected an adapter directory"):
        load_adapter(tmp_path / "nowhere", gpt2[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        load_adapter(tmp_path / "empty", gpt2[1])


def test_full_names_escape_layers_to_transform_as_in_peft(gpt2, tiny_gpt2_dir):
    # PEFT filters only suffix matches by layer; a module named in full is adapted whatever its layer.
    _, params = gpt2
    targets, layers = ["transformer.h.0.attn.c_attn", "c_fc"], [1]
    base = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=targets, layers_to_transform=layers,
                                                           fan_in_fan_out=True))
    peft_names = sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A"))
    jax_names = sorted(dotted_name(p) for p in resolve_targets(
        params, LoraConfig(rank=2, target_modules=targets, layers_to_transform=layers)))
    assert jax_names == peft_names == ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]


def test_integer_tensors_are_refused_not_cast(gpt2, saved):
    # Before, an int32 tensor was cast to float: ids of 1e9 became LoRA weights of 1e9.
    tensors = safetensors.numpy.load_file(saved / WEIGHTS_FILE)
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    tensors[key] = np.full(tensors[key].shape, 10**9, np.int32)
    safetensors.numpy.save_file(tensors, saved / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"non-float tensors: \['base_model.model.transformer.h.0.attn.c_attn.lora_A.weight \(I32\)'\]"):
        load_adapter(saved, gpt2[1])


def test_nonfinite_values_are_refused_unless_allowed(gpt2, saved):
    tensors = safetensors.numpy.load_file(saved / WEIGHTS_FILE)
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    tensors[key][:3, 0] = [np.nan, np.inf, -np.inf]  # B.T is (out, r) = (96, 2)
    safetensors.numpy.save_file(tensors, saved / WEIGHTS_FILE)
    with pytest.raises(ValueError, match=r"non-finite values: base_model.model.transformer.h.1.attn.c_attn.lora_B.weight \(3 of 192\)"):
        load_adapter(saved, gpt2[1])
    loaded = load_adapter(saved, gpt2[1], allow_nonfinite=True)
    assert int(np.isnan(np.asarray(loaded.weights["transformer"]["h"]["1"]["attn"]["c_attn"]["lora_B"])).sum()) == 1


PATTERNED = LoraConfig(rank=4, alpha=8.0, target_modules=TARGETS, rank_pattern={"h.0.attn.c_attn": 2, "c_fc": 6},
                       alpha_pattern={"mlp.c_proj": 3})


def test_patterns_are_written_and_read_back(gpt2, tmp_path):
    _, params = gpt2
    adapter = with_random_b(init_lora(params, PATTERNED, jax.random.key(0)))
    save_adapter(tmp_path, adapter)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert (meta["r"], meta["lora_alpha"], meta["rank_pattern"], meta["alpha_pattern"]) == (
        4, 8.0, {"c_fc": 6, "h.0.attn.c_attn": 2}, {"mlp.c_proj": 3.0})
    tensors = safetensors.numpy.load_file(tmp_path / WEIGHTS_FILE)
    stem = "base_model.model.transformer.h"
    assert [tensors[f"{stem}.{name}.lora_A.weight"].shape for name in ("0.attn.c_attn", "1.attn.c_attn", "0.mlp.c_fc",
                                                                      "1.mlp.c_proj")] == [(2, 32), (4, 32), (6, 32),
                                                                                           (4, 128)]
    back = load_adapter(tmp_path, params)
    # The file holds the keys sorted (as PEFT's does); these keys are disjoint, so the meaning is the same.
    assert back.config == dataclasses.replace(PATTERNED, rank_pattern={"c_fc": 6, "h.0.attn.c_attn": 2})
    assert {p: (back.rank(p), back.scaling(p)) for p in back.modules()} == {
        p: (adapter.rank(p), adapter.scaling(p)) for p in adapter.modules()}
    jax.tree_util.tree_map(np.testing.assert_array_equal, back.weights, adapter.weights)


def test_patterns_whose_order_matters_are_not_saved(gpt2, tmp_path):
    _, params = gpt2
    config = LoraConfig(rank=4, target_modules=["c_attn"], rank_pattern={"h.0.attn.c_attn": 2, "c_attn": 5})
    adapter = init_lora(params, config, jax.random.key(0))
    assert [adapter.rank(p) for p in adapter.modules()] == [2, 5]
    with pytest.raises(ValueError, match=r"stores them sorted .* would give transformer\.h\.0\.attn\.c_attn rank 5"):
        save_adapter(tmp_path / "out", adapter)
    assert not (tmp_path / "out").exists()


def test_a_rank_pattern_that_does_not_fit_the_tensors_is_refused(gpt2, saved):
    edit_config(saved, rank_pattern={"h.1.attn.c_attn": 3})  # saved at rank 2 everywhere
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_attn\.lora_A\.weight: file \(2, 32\), model "
                                         r"needs \(3, 32\).*r / rank_pattern"):
        load_adapter(saved, gpt2[1])
