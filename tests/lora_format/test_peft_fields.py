"""lora_format.peft_fields: one table of adapter_config.json rules, checked against the installed peft and
applied alike by lora_torch.parse_adapter_config and lora_jax.config_from_adapter_dict."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import peft
import pytest
import safetensors.numpy
from transformers import GPT2LMHeadModel

import lora_jax.peft_format
import lora_torch
from lora_format.peft_fields import FIELDS, Kind, is_neutral, read_adapter_config
from lora_jax.gpt2.loading import load_gpt2
from lora_jax.peft_format import config_from_adapter_dict
from lora_torch.peft_config import parse_adapter_config

REPO = Path(__file__).resolve().parents[2]
PEFT_FIELDS = [field.name for field in dataclasses.fields(peft.LoraConfig)]
BASE = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]}

REFUSED = sorted(name for name, rule in FIELDS.items() if rule.kind is Kind.REFUSED)
ACCEPTED = sorted(name for name, rule in FIELDS.items() if rule.kind is not Kind.REFUSED)

# A realistic non-neutral value per refused field; a field added to FIELDS later falls back to _non_neutral.
SAMPLES = {
    "exclude_modules": ["c_fc"],
    "bias": "lora_only",
    "modules_to_save": ["lm_head"],
    "init_lora_weights": "pissa",
    "megatron_config": {"tensor_model_parallel_size": 2},
    "trainable_token_indices": [1, 2],
    "velora_config": {"num_groups": 4},
    "alora_invocation_tokens": [1, 2],
    "use_qalora": True,
    "monteclora_config": {},  # PEFT builds a MontecloraConfig with defaults from {}: MonteCLoRA is on
    "layer_replication": [[0, 2], [1, 2]],
    "lora_bias": True,
    "target_parameters": ["attn.c_attn.weight"],
    "use_bdlora": {"nblocks": 2},
    "arrow_config": {"top_k": 2},
    "kasa_config": {},  # likewise: KaSA with default settings
    "ensure_weight_tying": True,
}
# Values that keep the adapter plain LoRA but are not neutral: the base-changing init methods.
EXTRA_REFUSED = [("init_lora_weights", value) for value in ("pissa_niter_4", "olora", "corda", "loftq", "lora_ga")]

# Changes to BASE that exercise each supported or ignored field with a non-default value.
ACCEPTED_CHANGES = {
    "peft_type": {"peft_type": "LORA"},
    "task_type": {"task_type": "SEQ_2_SEQ_LM"},
    "auto_mapping": {"auto_mapping": {"base_model_class": "GPT2LMHeadModel", "parent_library": "transformers"}},
    "peft_version": {"peft_version": "0.21.2"},
    "base_model_name_or_path": {"base_model_name_or_path": "gpt2"},
    "revision": {"revision": "main"},
    "inference_mode": {"inference_mode": False},
    "r": {"r": 16},
    "lora_alpha": {"lora_alpha": 3.5},
    "lora_dropout": {"lora_dropout": 0.1},
    "target_modules": {"target_modules": r".*\.attn\.c_attn"},
    "use_rslora": {"use_rslora": True},
    "layers_to_transform": {"layers_to_transform": 1},
    "layers_pattern": {"layers_pattern": ["h"], "layers_to_transform": [0, 1]},
    "fan_in_fan_out": {"fan_in_fan_out": True},
    "rank_pattern": {"rank_pattern": {"h.0.attn.c_attn": 2, "c_attn": 8}},
    "use_dora": {"use_dora": True},
    "alpha_pattern": {"alpha_pattern": {"c_attn": 32, "h.1.attn.c_attn": 3.5}},
    "megatron_core": {"megatron_core": "megatron.core"},
    "loftq_config": {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}},
    "eva_config": {"eva_config": {"rho": 2.0}},
    "corda_config": {"corda_config": {"corda_method": "kpm"}},
    "lora_ga_config": {"lora_ga_config": {"direction": "ArB2r"}},
    "qalora_group_size": {"qalora_group_size": 32},
    "runtime_config": {"runtime_config": {"ephemeral_gpu_offload": True}},
}


def _non_neutral(name: str):
    if name in SAMPLES:
        return SAMPLES[name]
    return next(value for value in (True, {"x": 1}, ["x"], "x") if not is_neutral(FIELDS[name], value))


def _read_both(meta: dict) -> tuple[tuple, tuple]:
    """What each half made of ``meta``, as comparable tuples."""
    spec = parse_adapter_config(meta, "f.json")
    config = config_from_adapter_dict(meta, "f.json")
    return (
        (spec.rank, spec.lora_alpha, spec.dropout, spec.use_rslora, spec.target_modules, spec.layers_to_transform,
         spec.layers_pattern, spec.rank_pattern, spec.alpha_pattern, spec.use_dora),
        (config.rank, config.alpha, config.dropout, config.use_rslora, config.target_modules,
         config.layers_to_transform, config.layers_pattern, config.rank_pattern, config.alpha_pattern,
         config.use_dora),
    )


def _refused_by_both(meta: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_adapter_config(meta, "f.json")
    with pytest.raises(ValueError, match=match):
        config_from_adapter_dict(meta)


@pytest.mark.parametrize("name", PEFT_FIELDS)
def test_table_classifies_every_peft_field(name):
    assert name in FIELDS, (
        f"peft {peft.__version__}'s LoraConfig has a field {name!r} that lora_format.peft_fields.FIELDS does not "
        "classify: read what it does in peft/tuners/lora/config.py and add it as SUPPORTED, IGNORED or REFUSED "
        "(with its neutral values and a reason)."
    )


def test_table_holds_only_peft_fields():
    assert sorted(set(FIELDS) - set(PEFT_FIELDS)) == []


def test_every_refused_rule_has_neutral_values_and_a_reason():
    assert [name for name in REFUSED if not FIELDS[name].neutral or not FIELDS[name].reason] == []
    assert [name for name in ACCEPTED if FIELDS[name].neutral] == []


def test_a_config_saved_by_peft_is_read_without_warnings(tmp_path, caplog):
    peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM").save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="lora_format.peft_fields"):
        torch_view, jax_view = _read_both(meta)
    assert torch_view == jax_view == (4, 8.0, 0.0, False, ("c_attn",), None, None, (), (), False)
    assert caplog.records == []


@pytest.mark.parametrize(("name", "value"), [(name, _non_neutral(name)) for name in REFUSED] + EXTRA_REFUSED)
def test_both_halves_refuse_a_refused_field(name, value):
    assert not is_neutral(FIELDS[name], value)
    _refused_by_both({**BASE, name: value}, rf"{name}=.*: {re.escape(FIELDS[name].reason[:20])}")


def test_all_refused_fields_are_listed_in_one_error():
    meta = {**BASE, "lora_bias": True, "modules_to_save": ["lm_head"], "alora_invocation_tokens": [1, 2]}
    with pytest.raises(ValueError) as caught:
        read_adapter_config(meta, "f.json")
    message = str(caught.value)
    assert message.startswith("f.json uses PEFT features")
    assert [line.split("=")[0].strip(" -") for line in message.splitlines() if line.startswith("  - ")] == [
        "modules_to_save", "alora_invocation_tokens", "lora_bias"]
    assert "peft.PeftModel.from_pretrained" in message


@pytest.mark.parametrize(("name", "value"), [(name, value) for name in REFUSED for value in FIELDS[name].neutral])
def test_both_halves_accept_a_refused_field_at_a_neutral_value(name, value):
    torch_view, jax_view = _read_both({**BASE, name: value})
    assert torch_view == jax_view == _read_both(BASE)[0]


@pytest.mark.parametrize("name", ACCEPTED)
def test_both_halves_accept_supported_and_ignored_fields_alike(name):
    assert name in ACCEPTED_CHANGES or FIELDS[name].kind is Kind.IGNORED, f"add a sample value for {name!r}"
    changes = ACCEPTED_CHANGES.get(name, {name: "x"})
    torch_view, jax_view = _read_both({**BASE, **changes})
    assert torch_view == jax_view
    if FIELDS[name].kind is Kind.IGNORED:
        assert torch_view == _read_both(BASE)[0]


@pytest.mark.parametrize("name", ["r", "lora_alpha", "target_modules"])
@pytest.mark.parametrize("absent", ["missing", "null"])
def test_a_missing_required_field_names_the_file_and_the_field(name, absent):
    meta = {key: value for key, value in BASE.items() if key != name}
    if absent == "null":
        meta[name] = None
    with pytest.raises(ValueError, match=rf"f\.json has no '{name}'"):
        parse_adapter_config(meta, "f.json")
    with pytest.raises(ValueError, match=rf"f\.json has no '{name}'"):
        config_from_adapter_dict(meta, "f.json")
    with pytest.raises(ValueError, match=rf"adapter_config\.json has no '{name}'"):
        config_from_adapter_dict(meta)


@pytest.mark.parametrize(("name", "value"), [
    ("r", True), ("r", 0), ("r", 2.0), ("r", "4"),
    ("lora_alpha", float("inf")), ("lora_alpha", float("nan")), ("lora_alpha", 0), ("lora_alpha", True),
    ("lora_alpha", "8"),
    ("lora_dropout", 1.0), ("lora_dropout", -0.1), ("lora_dropout", None),
    ("use_rslora", "yes"), ("use_rslora", None), ("fan_in_fan_out", 1), ("use_dora", 1), ("use_dora", "true"),
    ("target_modules", []), ("target_modules", "(c_attn"), ("target_modules", [""]),
    ("layers_to_transform", [-1]), ("layers_to_transform", [True]), ("layers_pattern", 7),
    ("rank_pattern", {"c_attn": 0}), ("rank_pattern", {"c_attn": 2.0}), ("rank_pattern", {"c_attn": True}),
    ("rank_pattern", {"(c_attn": 2}), ("rank_pattern", ["c_attn"]), ("rank_pattern", "c_attn"),
    ("alpha_pattern", {"c_attn": float("inf")}), ("alpha_pattern", {"c_attn": -1}), ("alpha_pattern", {"c_attn": "8"}),
    ("alpha_pattern", {"": 8}), ("alpha_pattern", {"(?i)c_attn": 8}),
    ("peft_type", "IA3"), ("peft_type", None),
])
def test_both_halves_refuse_a_bad_value(name, value):
    _refused_by_both({**BASE, name: value}, name)


def test_json_infinity_and_nan_are_refused():
    for literal in ("Infinity", "-Infinity", "NaN"):
        meta = json.loads(f'{{"peft_type": "LORA", "r": 4, "lora_alpha": {literal}, "target_modules": ["c_attn"]}}')
        _refused_by_both(meta, "lora_alpha must be a finite number")


@pytest.mark.parametrize("changes", [
    {"target_modules": ".*c_attn", "layers_to_transform": [0]},
    {"target_modules": ".*c_attn", "layers_pattern": "h"},
    {"layers_pattern": "h"},
])
def test_layer_settings_peft_refuses_are_refused(changes):
    _refused_by_both({**BASE, **changes}, "layers_")


def test_a_non_object_is_refused():
    _refused_by_both(["r", 4], "must hold a JSON object")


def test_unknown_keys_are_logged_and_ignored(caplog):
    with caplog.at_level(logging.WARNING, logger="lora_format.peft_fields"):
        torch_view, jax_view = _read_both({**BASE, "merge_weights": False, "enable_lora": None})
    assert torch_view == jax_view == _read_both(BASE)[0]
    assert [record.getMessage() for record in caplog.records] == [
        "f.json: ignoring keys that are not fields of PEFT's LoraConfig: ['enable_lora', 'merge_weights']"] * 2


def test_supported_names_are_neither_refused_nor_warned_about(caplog):
    meta = {**BASE, "lora_bias": True, "digest": "abc"}
    with caplog.at_level(logging.WARNING, logger="lora_format.peft_fields"):
        fields = read_adapter_config(meta, "f.json", supported={"lora_bias", "digest"})
    assert (fields.rank, fields.raw["lora_bias"], fields.raw["digest"]) == (4, True, "abc")
    assert caplog.records == []


def test_normalised_values():
    fields = read_adapter_config({**BASE, "r": 2, "lora_alpha": 4, "layers_to_transform": 1, "layers_pattern": "",
                                  "use_rslora": True, "fan_in_fan_out": True}, "f.json")
    assert (fields.rank, fields.alpha, fields.dropout, fields.use_rslora, fields.target_modules,
            fields.layers_to_transform, fields.layers_pattern, fields.fan_in_fan_out) == (
        2, 4.0, 0.0, True, ("c_attn",), (1,), None, True)
    assert type(fields.alpha) is float


@pytest.mark.parametrize("absent", [None, {}])
def test_an_empty_pattern_is_no_pattern(absent):
    torch_view, jax_view = _read_both({**BASE, "rank_pattern": absent, "alpha_pattern": absent})
    assert torch_view == jax_view == _read_both(BASE)[0]


def test_patterns_keep_the_files_key_order():
    # The first matching key wins, so the order is part of the value (json.loads keeps the file's order).
    meta = json.loads('{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], '
                      '"rank_pattern": {"h.0.attn.c_attn": 2, "c_attn": 5}, "alpha_pattern": {"c_attn": 3}}')
    fields = read_adapter_config(meta, "f.json")
    assert fields.rank_pattern == (("h.0.attn.c_attn", 2), ("c_attn", 5))
    assert fields.alpha_pattern == (("c_attn", 3.0),) and type(fields.alpha_pattern[0][1]) is float
    assert hash(fields.rank_pattern) == hash((("h.0.attn.c_attn", 2), ("c_attn", 5)))


def test_importing_the_table_imports_no_framework():
    code = ("import sys, lora_format.peft_fields, lora_format.patterns; "
            "print([m for m in ('torch', 'jax', 'flax', 'numpy') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _write_adapter(directory: Path, **config_changes) -> Path:
    """A PEFT adapter for the tiny GPT-2's c_attn (width 32, 2 layers, rank 2), written by hand."""
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in (0, 1):
        stem = f"base_model.model.transformer.h.{layer}.attn.c_attn"
        tensors[f"{stem}.lora_A.weight"] = rng.normal(size=(2, 32)).astype(np.float32)  # A.T (r, in)
        tensors[f"{stem}.lora_B.weight"] = rng.normal(size=(96, 2)).astype(np.float32)  # B.T (out, r)
    directory.mkdir()
    safetensors.numpy.save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {**BASE, "r": 2, "task_type": "CAUSAL_LM", "fan_in_fan_out": True, **config_changes}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_an_alora_adapter_is_refused_end_to_end(tiny_gpt2_dir, tmp_path):
    _, params = load_gpt2(tiny_gpt2_dir)
    plain = _write_adapter(tmp_path / "plain")
    lora_jax.peft_format.load_adapter(plain, params)  # the same files without aLoRA load in both halves
    assert len(lora_torch.lora_module_names(lora_torch.load_adapter(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir),
                                                                     plain))) == 2  # c_attn in 2 layers
    alora = _write_adapter(tmp_path / "alora", alora_invocation_tokens=[1, 2])
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    with pytest.raises(ValueError, match=r"adapter_config\.json uses PEFT features(.|\n)*alora_invocation_tokens"):
        lora_torch.load_adapter(model, alora)
    assert lora_torch.lora_module_names(model) == []
    with pytest.raises(ValueError, match=r"adapter_config\.json uses PEFT features(.|\n)*alora_invocation_tokens"):
        lora_jax.peft_format.load_adapter(alora, params)
