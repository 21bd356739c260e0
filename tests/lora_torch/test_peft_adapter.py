"""PEFT adapter directories, checked against the real ``peft`` package in both directions."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel

from lora_torch import inject_lora, load_adapter, lora_module_names, lora_wrappers, save_adapter

# peft's PeftModel calls a transformers method deprecated in 5.x; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

# fp32 on width-32 models: the same products summed in a different order (PEFT runs lora_B(lora_A(x))
# as two Linear layers) differ by float rounding only, observed ~1e-7; 1e-5 leaves 100x headroom.
ATOL = 1e-5

CASES = [
    pytest.param(rank, rslora, targets, id=f"r{rank}-{'rs' if rslora else 'std'}-{'+'.join(targets)}")
    for rank in (1, 8) for rslora in (False, True) for targets in (["c_attn", "mlp.c_fc"], ["c_attn", "c_proj"])
]


def _load(path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(path).eval()


def _logits(model, token_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(token_ids).logits


@pytest.mark.parametrize(("rank", "use_rslora", "targets"), CASES)
def test_saved_here_loads_in_peft(tiny_gpt2_dir, token_ids, randomize_lora, tmp_path, rank, use_rslora, targets):
    ours = inject_lora(_load(tiny_gpt2_dir), targets, rank=rank, lora_alpha=16.0, use_rslora=use_rslora, verbose=False)
    randomize_lora(ours, seed=rank)
    save_adapter(ours, tmp_path, base_model_name_or_path=str(tiny_gpt2_dir))
    theirs = peft.PeftModel.from_pretrained(_load(tiny_gpt2_dir), tmp_path).eval()
    expected = _logits(ours, token_ids)
    assert (expected - _logits(_load(tiny_gpt2_dir), token_ids)).abs().max().item() > 1e-2  # the adapter acts
    torch.testing.assert_close(_logits(theirs, token_ids), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize(("rank", "use_rslora", "targets"), CASES)
def test_saved_by_peft_loads_here(tiny_gpt2_dir, token_ids, tmp_path, rank, use_rslora, targets):
    torch.manual_seed(rank)
    config = peft.LoraConfig(r=rank, lora_alpha=16, target_modules=targets, fan_in_fan_out=True,
                             use_rslora=use_rslora, lora_dropout=0.0, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(_load(tiny_gpt2_dir), config).eval()
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                module.lora_B["default"].weight.normal_(0.0, 0.1)  # non-zero B
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(_load(tiny_gpt2_dir), tmp_path)
    assert len(lora_module_names(ours)) == 2 * len(targets) + (2 if "c_proj" in targets else 0)
    torch.testing.assert_close(_logits(ours, token_ids), _logits(theirs, token_ids), rtol=0, atol=ATOL)


def test_config_describes_targets_minimally(tiny_model, tmp_path):
    inject_lora(tiny_model, ["attn.c_proj"], rank=2, lora_alpha=4.0, layers_to_transform=[1], verbose=False)
    save_adapter(tiny_model, tmp_path, base_model_name_or_path="gpt2")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["target_modules"], config["layers_to_transform"]) == (["attn.c_proj"], [1])
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 2, 4.0)
    assert (config["fan_in_fan_out"], config["use_rslora"], config["bias"]) == (True, False, "none")
    assert config["base_model_name_or_path"] == "gpt2"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.transformer.h.1.attn.c_proj.lora_A.weight": (2, 32),
        "base_model.model.transformer.h.1.attn.c_proj.lora_B.weight": (32, 2),
    }
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_load_into_compatible_injected_model(tiny_model, tiny_gpt2_dir, randomize_lora, tmp_path):
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    randomize_lora(tiny_model, seed=3)
    save_adapter(tiny_model, tmp_path)
    other = inject_lora(_load(tiny_gpt2_dir), ["c_attn"], rank=2, verbose=False)
    load_adapter(other, tmp_path)
    for name, wrapper in lora_wrappers(other).items():
        assert torch.equal(wrapper.lora.lora_B, lora_wrappers(tiny_model)[name].lora.lora_B)


@pytest.fixture
def adapter_dir(tiny_model, randomize_lora, tmp_path):
    inject_lora(tiny_model, ["c_attn", "c_fc"], rank=2, verbose=False)
    randomize_lora(tiny_model)
    return save_adapter(tiny_model, tmp_path / "adapter")


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory, edit):
    path = directory / "adapter_model.safetensors"
    save_file(edit(load_file(path)), path)


@pytest.mark.parametrize(("corrupt", "error", "message"), [
    (lambda d: _edit_tensors(d, lambda t: {k: v for k, v in t.items() if ".h.1.mlp" not in k}), ValueError,
     "missing 2 tensors"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:300]),
     ValueError, "truncated or corrupt"),
    (lambda d: (d / "adapter_config.json").write_text('{"peft_type": "LO'), ValueError, "not valid JSON"),
    (lambda d: _edit_config(d, use_dora=True), ValueError, "use_dora"),
    (lambda d: _edit_config(d, peft_type="IA3"), ValueError, "peft_type"),
    (lambda d: _edit_config(d, r=4), ValueError, r"shape \(2, 32\), the model needs \(4, 32\)"),
    (lambda d: _edit_config(d, layers_to_transform=[0], layers_pattern=7), ValueError, "layers_pattern must be None"),
    (lambda d: _edit_config(d, target_modules=["attn"]), TypeError, "unsupported type"),
    (lambda d: _edit_config(d, target_modules=["q_proj"]), ValueError, "matched no module"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError, "adapter_model.safetensors"),
])
def test_bad_adapter_leaves_model_untouched(adapter_dir, tiny_gpt2_dir, corrupt, error, message, snapshot,
                                            assert_same_state):
    corrupt(adapter_dir)
    model = _load(tiny_gpt2_dir)
    before = snapshot(model)
    with pytest.raises(error, match=message):
        load_adapter(model, adapter_dir)
    assert_same_state(model, before)
    assert lora_module_names(model) == []


def test_wrong_base_model_is_refused(adapter_dir, alt_gpt2_dir, snapshot, assert_same_state):
    model = _load(alt_gpt2_dir)  # width 48, 3 layers: the width-32 adapter cannot fit
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"does not fit this model.*needs \(2, 48\)"):
        load_adapter(model, adapter_dir)
    assert_same_state(model, before)


def test_incompatible_existing_lora_is_refused(adapter_dir, tiny_gpt2_dir, snapshot, assert_same_state):
    model = inject_lora(_load(tiny_gpt2_dir), ["c_attn", "c_fc"], rank=4, verbose=False)  # saved rank is 2
    before = snapshot(model)
    with pytest.raises(ValueError, match="does not match the LoRA already in the model"):
        load_adapter(model, adapter_dir)
    assert_same_state(model, before)


def test_save_without_lora_and_mixed_ranks_raise(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="inject_lora"):
        save_adapter(tiny_model, tmp_path)
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    inject_lora(tiny_model, ["c_fc"], rank=4, verbose=False)
    with pytest.raises(ValueError, match="different rank"):
        save_adapter(tiny_model, tmp_path)
    assert list(tmp_path.iterdir()) == []
