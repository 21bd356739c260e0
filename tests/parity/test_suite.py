"""The full suite passes on correct code, on two GPT-2 shapes, and covers every stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from parity import CHECKS, SuiteSettings, run_check, run_suite


def test_full_suite_passes_on_tiny_fixture(tiny_report):
    failures = [(row.stage, row.name, row.detail) for row in tiny_report.failures]
    assert failures == []
    assert {row.stage for row in tiny_report.rows} == set(CHECKS)
    # 5 target specs x 3 rows in the injection stage, and the main spec (c_attn,c_proj) against PEFT: 3 more.
    assert sum(row.stage == "injection" for row in tiny_report.rows) == 18
    # Every stage after injection holds JAX to peft.PeftModel too.
    assert {row.stage for row in tiny_report.rows if "peft" in row.name or "PEFT" in row.name} == set(CHECKS[1:])


def test_report_carries_dump_arrays_with_promised_shapes(tiny_report):
    arrays = tiny_report.arrays
    assert arrays["input_ids"].shape == (2, 16)
    for name in ("torch_base_logits", "jax_lora_logits", "torch_merged_logits"):
        assert arrays[name].shape == (2, 16, 101) and arrays[name].dtype == np.float32


def test_lora_changes_logits_measurably(tiny_report):
    # A parity run whose LoRA branch does nothing would prove nothing: the delta must be far above noise.
    arrays = tiny_report.arrays
    delta = np.abs(arrays["jax_lora_logits"] - arrays["jax_base_logits"]).max()
    assert delta > 1e-2


def test_training_loss_falls_on_cycled_batches(tiny_report):
    losses = tiny_report.arrays["jax_losses"]
    assert losses.shape == (10,) and losses[-1] < losses[0]


def test_alt_shape_gradients_with_rslora_and_layers(alt_pair):
    # Width 48, 3 heads (head size 16), vocab 97: non-square c_attn/c_fc, non-power-of-two sizes.
    settings = SuiteSettings(targets=("c_attn", "c_fc"), rank=8, alpha=4.0, use_rslora=True,
                             layers_to_transform=(0, 2), checks=("gradients",))
    report = run_suite(alt_pair, settings)
    assert [(row.name, row.detail) for row in report.failures] == []
    assert [row.name for row in report.rows][1:] == ["loss torch vs JAX", "dL/dA, dL/dB torch vs JAX (worst tensor)",
                                                     "loss peft.PeftModel vs JAX",
                                                     "dL/dA, dL/dB peft.PeftModel vs JAX (worst tensor)"]


def test_run_check_rejects_unknown_check(tiny_pair):
    with pytest.raises(ValueError, match="Unknown check 'merged'; choose from base_forward"):
        run_check(tiny_pair, "merged")


def test_suite_settings_validate_before_loading():
    with pytest.raises(ValueError, match="Unknown or no checks"):
        SuiteSettings(checks=("base_forward", "nope"))
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        SuiteSettings(steps=0)


def test_bf16_mode_runs_on_cpu_within_bf16_tolerances(tiny_gpt2_dir):
    from parity import load_pair

    pair = load_pair(tiny_gpt2_dir, dtype="bf16")
    report = run_suite(pair, SuiteSettings(checks=("base_forward", "forward_delta")))
    assert [(row.name, row.max_rel) for row in report.failures] == []
    base = next(row for row in report.rows if row.stage == "base_forward")
    # bf16 really ran: far from fp32 agreement, inside the bf16 bound.
    assert 1e-4 < base.max_rel <= base.tolerance.rtol


def test_suite_checks_a_given_peft_adapter_with_its_own_config(tiny_pair, tmp_path):
    from lora_torch import inject_lora, lora_wrappers, save_adapter

    model = inject_lora(tiny_pair.torch_copy(), ["c_fc"], rank=2, lora_alpha=3.0, verbose=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for wrapper in lora_wrappers(model).values():
            wrapper.lora.lora_B.normal_(0.0, 0.1)  # a "trained" adapter: non-zero B
    save_adapter(model, tmp_path / "adapter")
    report = run_suite(tiny_pair, SuiteSettings(adapter=tmp_path / "adapter",
                                                checks=("injection", "forward_delta", "interchange")))
    assert [(row.name, row.detail) for row in report.failures] == []
    # The adapter's own spec (c_fc, r=2: 2 layers x 2 x (32 + 128)) is checked beside the five standard specs.
    assert any(row.name == "trainable params [c_fc]" and row.detail == "640 vs 640" for row in report.rows)
    assert any("s=1.5" in row.name for row in report.rows)  # alpha / r = 3 / 2 from adapter_config.json
    assert report.settings["rank"] == 2 and report.settings["targets"] == "c_fc"


def test_adapter_is_read_once_per_run(tiny_pair, tmp_path):
    from lora_torch import inject_lora, save_adapter

    adapter = save_adapter(inject_lora(tiny_pair.torch_copy(), ["c_attn"], rank=2, verbose=False), tmp_path / "a")
    loads = []

    def counting_load(adapter_dir, params):
        loads.append(adapter_dir)
        return tiny_pair.impl.jax_load_adapter(adapter_dir, params)

    pair = tiny_pair.with_impl(jax_load_adapter=counting_load)
    report = run_suite(pair, SuiteSettings(adapter=adapter, checks=("injection", "forward_delta")))
    # The injection stage, the adapted pair and the report header all need the adapter's config.
    assert loads == [adapter]
    assert report.settings["targets"] == "c_attn" and report.settings["rank"] == 2
