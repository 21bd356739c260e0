"""PEFT adapter directories, checked against the real ``peft`` package in both directions."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
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


def _drop_digest(directory):
    """Re-saves the weights with PEFT's metadata only, as if PEFT had saved them: no config digest to check."""
    path = directory / "adapter_model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt"})


def _write_config(directory, text):
    _drop_digest(directory)  # these cases test the config checks, not the digest
    (directory / "adapter_config.json").write_text(text)


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    _write_config(directory, json.dumps({**json.loads(path.read_text()), **changes}))


def _edit_tensors(directory, edit):
    path = directory / "adapter_model.safetensors"
    save_file(edit(load_file(path)), path)


@pytest.mark.parametrize(("corrupt", "error", "message"), [
    (lambda d: _edit_tensors(d, lambda t: {k: v for k, v in t.items() if ".h.1.mlp" not in k}), ValueError,
     "missing 2 tensors"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:300]),
     ValueError, "truncated or corrupt"),
    (lambda d: _write_config(d, '{"peft_type": "LO'), ValueError, "not valid JSON"),
    # A DoRA config needs a magnitude per module; this plain adapter has none.
    (lambda d: _edit_config(d, use_dora=True), ValueError, r"missing 4 tensors, e\.g\. \['base_model\.model\."
                                                           r"transformer\.h\.0\.attn\.c_attn\.lora_magnitude_vector'"),
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


def test_save_without_lora_and_mixed_rslora_raise(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="inject_lora"):
        save_adapter(tiny_model, tmp_path)
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    inject_lora(tiny_model, ["c_fc"], rank=4, use_rslora=True, verbose=False)
    # Ranks and alphas may differ (rank_pattern / alpha_pattern); PEFT has one use_rslora for all modules.
    with pytest.raises(ValueError, match=r"different use_rslora values \[False, True\]"):
        save_adapter(tiny_model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_saved_weights_record_the_digest_of_their_config(adapter_dir):
    config_bytes = (adapter_dir / "adapter_config.json").read_bytes()
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="pt") as weights:
        assert weights.metadata() == {"format": "pt",
                                      "lora_parity.config_sha256": hashlib.sha256(config_bytes).hexdigest()}


def test_config_from_another_save_is_refused(adapter_dir, tiny_gpt2_dir, tmp_path, snapshot, assert_same_state):
    # What a crash between the two renames of the old save left: new weights beside an old config (alpha 4 vs 8).
    other = inject_lora(_load(tiny_gpt2_dir), ["c_attn", "c_fc"], rank=2, lora_alpha=4.0, verbose=False)
    save_adapter(other, tmp_path / "other")
    (adapter_dir / "adapter_config.json").write_bytes((tmp_path / "other" / "adapter_config.json").read_bytes())
    model = _load(tiny_gpt2_dir)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_config.json and adapter_model.safetensors come from different "
                                         r"saves .* Save the adapter again"):
        load_adapter(model, adapter_dir)
    assert_same_state(model, before)


def test_infinite_alpha_in_config_is_refused(adapter_dir, tiny_gpt2_dir, snapshot, assert_same_state):
    # It used to load, and every logit came out NaN.
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    text = json.dumps({**config, "lora_alpha": float("inf")})
    assert '"lora_alpha": Infinity' in text  # what json.dumps writes for float('inf')
    _write_config(adapter_dir, text)
    model = _load(tiny_gpt2_dir)
    before = snapshot(model)
    with pytest.raises(ValueError):  # the message comes from the shared config field table
        load_adapter(model, adapter_dir)
    assert_same_state(model, before)
    assert lora_module_names(model) == []


def test_nan_weights_are_refused_unless_allowed(adapter_dir, tiny_gpt2_dir, snapshot, assert_same_state):
    key = "base_model.model.transformer.h.0.mlp.c_fc.lora_B.weight"
    _edit_tensors(adapter_dir, lambda t: {**t, key: torch.full_like(t[key], float("nan"))})
    model = _load(tiny_gpt2_dir)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{key} holds 256 NaN or inf values \(of 256\)\. .*allow_nonfinite=True"):
        load_adapter(model, adapter_dir)
    assert_same_state(model, before)
    load_adapter(model, adapter_dir, allow_nonfinite=True)
    assert torch.isnan(model.transformer.h[0].mlp.c_fc.lora.lora_B).sum().item() == 256


def test_int32_weights_are_refused(adapter_dir, tiny_gpt2_dir, snapshot, assert_same_state):
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"
    _edit_tensors(adapter_dir, lambda t: {**t, key: t[key].to(torch.int32)})
    model = _load(tiny_gpt2_dir)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{key} has dtype torch.int32\. LoRA weights are floating point"):
        load_adapter(model, adapter_dir)
    assert_same_state(model, before)


def test_saved_modes_follow_umask_and_no_temp_is_left(tiny_model, tmp_path):
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    old = os.umask(0o022)
    try:
        save_adapter(tiny_model, tmp_path / "adapter")
        save_adapter(tiny_model, tmp_path / "adapter")  # the second save replaces the first
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in (tmp_path / "adapter").iterdir()}
    assert modes == {"adapter_config.json": "0o644", "adapter_model.safetensors": "0o644"}
    assert oct(stat.S_IMODE((tmp_path / "adapter").stat().st_mode)) == "0o755"


def test_save_keeps_readme_and_refuses_other_files(tiny_model, tmp_path):
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "README.md").write_text("model card")
    save_adapter(tiny_model, directory)
    assert (directory / "README.md").read_text() == "model card"
    (directory / "optimizer.pt").write_bytes(b"state")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(ValueError, match=r"holds files that are not part of an adapter: \['optimizer.pt'\]\. .*Save "
                                         r"the adapter into its own directory"):
        save_adapter(tiny_model, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def _lora_params(model):
    return [p for name, p in model.named_parameters() if ".lora." in name]


def test_concurrent_saves_and_loads_never_mix(tmp_path):
    # Two writers save different adapters (alpha AND values differ) to one path while a reader loads:
    # the old two-rename save let 17 of 200 such races leave a mixed directory.
    target = tmp_path / "adapter"
    adapters = {}
    for alpha, value in ((8.0, 1.0), (16.0, 2.0)):
        model = inject_lora(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), ["0", "1"], rank=2, lora_alpha=alpha,
                            verbose=False)
        with torch.no_grad():
            for param in _lora_params(model):
                param.fill_(value)
        adapters[alpha] = (model, value)
    save_adapter(adapters[8.0][0], target)
    stop, reads, mixes, errors = threading.Event(), [], [], []

    def write(alpha):
        try:
            for _ in range(40):
                save_adapter(adapters[alpha][0], target)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def read():
        while not stop.is_set():
            try:
                loaded = load_adapter(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), target)
            except Exception as err:  # noqa: BLE001 - a mix shows up as the digest error
                errors.append(err)
                continue
            alpha = loaded[0].lora.lora_alpha
            values = {p.item() for p in torch.cat([t.flatten() for t in _lora_params(loaded)]).unique()}
            reads.append(alpha)
            if values != {adapters[alpha][1]}:
                mixes.append((alpha, values))

    threads = [threading.Thread(target=write, args=(a,)) for a in adapters]
    reader = threading.Thread(target=read)
    reader.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    reader.join()
    assert (errors, mixes) == ([], [])
    assert len(reads) >= 10 and set(reads) <= {8.0, 16.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def _peft_ranks(model) -> dict[str, tuple[int, float]]:
    return {name.removeprefix("base_model.model."): (module.r["default"], module.scaling["default"])
            for name, module in model.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}


def test_mixed_ranks_and_alphas_are_saved_as_patterns_peft_reproduces(tiny_model, tiny_gpt2_dir, token_ids,
                                                                      randomize_lora, tmp_path):
    # Overlapping keys whose order matters in memory; the saved file names each odd module in full instead.
    inject_lora(tiny_model, ["c_attn", "c_fc"], rank=4, lora_alpha=8.0, rank_pattern={"h.0.attn.c_attn": 2, "c_attn": 5},
                alpha_pattern={"h.1.mlp.c_fc": 3}, verbose=False)
    randomize_lora(tiny_model, seed=5)
    save_adapter(tiny_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (
        4, 8.0, {"transformer.h.0.attn.c_attn": 2, "transformer.h.1.attn.c_attn": 5},
        {"transformer.h.1.mlp.c_fc": 3.0})
    theirs = peft.PeftModel.from_pretrained(_load(tiny_gpt2_dir), tmp_path).eval()
    ours = {name: (w.lora.rank, w.lora.scaling) for name, w in lora_wrappers(tiny_model).items()}
    assert _peft_ranks(theirs) == ours == {
        "transformer.h.0.attn.c_attn": (2, 4.0), "transformer.h.0.mlp.c_fc": (4, 2.0),
        "transformer.h.1.attn.c_attn": (5, 1.6), "transformer.h.1.mlp.c_fc": (4, 0.75)}
    torch.testing.assert_close(_logits(theirs, token_ids), _logits(tiny_model, token_ids), rtol=0, atol=ATOL)
    back = load_adapter(_load(tiny_gpt2_dir), tmp_path)
    assert {name: (w.lora.rank, w.lora.scaling) for name, w in lora_wrappers(back).items()} == ours


def test_a_pattern_adapter_loads_into_a_model_with_the_same_per_module_lora(tiny_gpt2_dir, randomize_lora, tmp_path):
    patterns = {"rank_pattern": {"c_fc": 3}, "alpha_pattern": {"h.1.attn.c_attn": 5.0}}
    saved = inject_lora(_load(tiny_gpt2_dir), ["c_attn", "c_fc"], rank=2, verbose=False, **patterns)
    randomize_lora(saved, seed=4)
    save_adapter(saved, tmp_path)
    same = inject_lora(_load(tiny_gpt2_dir), ["c_attn", "c_fc"], rank=2, verbose=False, **patterns)
    load_adapter(same, tmp_path)
    for name, wrapper in lora_wrappers(same).items():
        assert torch.equal(wrapper.lora.lora_B, lora_wrappers(saved)[name].lora.lora_B)
    # Same modules and ranks, but h.1.attn.c_attn's alpha differs: refused.
    other = inject_lora(_load(tiny_gpt2_dir), ["c_attn", "c_fc"], rank=2, rank_pattern={"c_fc": 3}, verbose=False)
    with pytest.raises(ValueError, match="does not match the LoRA already in the model"):
        load_adapter(other, tmp_path)


def test_a_rank_pattern_that_does_not_fit_the_tensors_is_refused(adapter_dir, tiny_gpt2_dir, snapshot,
                                                                 assert_same_state):
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    (adapter_dir / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"h.1.mlp.c_fc": 3}}))
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    save_file(tensors, adapter_dir / "adapter_model.safetensors", metadata={"format": "pt"})  # as PEFT writes it
    model = _load(tiny_gpt2_dir)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.lora_A\.weight has shape \(2, 32\), the model needs "
                                         r"\(3, 32\)"):
        load_adapter(model, adapter_dir)
    assert_same_state(model, before)
    assert lora_module_names(model) == []
