"""``--quantize nf4``: the quantization stage is exact on the tiny GPT-2, catches four planted quantizer bugs,
the QLoRA merge matches PEFT's re-quantizing merge, and ``--dump`` gives PEFT's logits on transformers' 4-bit model.

Every bug is planted in the JAX quantizer path (``lora_jax.nf4`` internals, or the call ``lora_jax.qlora``
makes), then the JAX base is quantized again with it; the torch bases and the reference stay real bitsandbytes.
"""

from __future__ import annotations

import dataclasses

import jax
import lora_jax.nf4 as nf4
import lora_jax.qlora as qlora
import numpy as np
import pytest
import torch

from parity import SuiteSettings, load_pair, run_check, run_suite
from parity.cli import main
from parity.quantized import load_transformers_4bit, quantize_jax

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CODES = "NF4 codes (packed bytes) JAX vs lora_torch.quantize_base"
STATS = "absmax codes, nested absmax, offset JAX vs lora_torch.quantize_base"
DEQUANTIZED = "dequantized kernels JAX vs lora_torch.quantize_base"
PROBE_CODES = "NF4 codes JAX vs bitsandbytes, edge probe"


@pytest.fixture(scope="module")
def q_pair(tiny_gpt2_dir):
    return load_pair(tiny_gpt2_dir, quantize="nf4")


@pytest.fixture(scope="module")
def float_params(tiny_gpt2_dir):
    from lora_jax.gpt2.loading import load_gpt2

    return load_gpt2(tiny_gpt2_dir)[1]


def _row(report, part: str):
    matches = [row for row in report.rows if part in row.name]
    assert matches, f"no row named like {part!r}"
    return matches[0]


def test_quantization_stage_is_exact_on_the_tiny_gpt2(q_pair):
    result = run_check(q_pair, "quantization")
    # 4 rows per bitsandbytes base (quantize_base, transformers' loading) + 3 for the edge probe, all exact (abs 0).
    assert len(result.rows) == 11 and all(row.passed and row.max_abs == 0.0 for row in result.rows)
    assert _row(result, CODES).detail == "8 layers, 12,288 values identical"  # 2 layers x (3072+1024+4096+4096)/2
    assert _row(result, "quantized layers JAX vs transformers 4-bit").detail == "8 identical"


def _swap_nibbles(monkeypatch):
    monkeypatch.setattr(nf4, "_pack", lambda q: ((q[1::2] << 4) | q[0::2]).astype(np.uint8))


def _argmin_rounding(monkeypatch):  # qwix's rule: the nearest NF4 value, not bitsandbytes' midpoint count
    monkeypatch.setattr(nf4, "_bucket", lambda scaled: np.abs(
        scaled[:, None] - nf4.NF4_VALUES[None, :]).argmin(axis=-1).astype(np.uint8))


def _no_offset(monkeypatch):
    monkeypatch.setattr(nf4, "_absmax_offset", lambda absmax: np.float32(0))


def _block_128(monkeypatch):
    real = nf4.quantize_nf4
    monkeypatch.setattr(qlora, "quantize_nf4", lambda x, *, block_size=64, double_quant=True: real(
        x, block_size=128, double_quant=double_quant))


# bug -> (rows that must fail, rows that must still pass). Failing everywhere: codes or statistics, and the
# base logits (a quantization error reaches the forward). argmin differs from midpoint bucketing only at a
# midpoint, where no tiny-GPT-2 weight sits: only the edge probe sees it.
BUGS = {
    "swapped_nibbles": (_swap_nibbles, [CODES, DEQUANTIZED, PROBE_CODES, "logits torch vs JAX"], [STATS]),
    "argmin_rounding": (_argmin_rounding, [PROBE_CODES, "dequantized JAX vs bitsandbytes, edge probe"],
                        [CODES, STATS, DEQUANTIZED, "logits torch vs JAX"]),
    "double_quant_without_offset": (_no_offset, [STATS, DEQUANTIZED, "logits torch vs JAX"], [CODES]),
    "block_size_128": (_block_128, [CODES, STATS, DEQUANTIZED, PROBE_CODES, "logits torch vs JAX"], []),
}


@pytest.mark.parametrize("bug", BUGS)
def test_planted_quantizer_bug_is_caught_by_the_quantization_stage(bug, q_pair, float_params, monkeypatch):
    plant, failing, passing = BUGS[bug]
    plant(monkeypatch)
    jax.clear_caches()
    # The JAX base quantized again with the bug; the torch bases and the reference are bitsandbytes' own.
    broken = dataclasses.replace(q_pair, jax_params=quantize_jax(float_params), compile_cache={})
    report = run_suite(broken, SuiteSettings(quantize="nf4", checks=("quantization", "base_forward")))
    assert not report.passed
    for part in failing:
        assert not _row(report, part).passed, part
    for part in passing:
        assert _row(report, part).passed, part


def test_qlora_merge_matches_peft_merge_and_unload(q_pair):
    result = run_check(q_pair, "merge", SuiteSettings(quantize="nf4"))
    assert all(row.passed for row in result.rows), [row for row in result.rows if not row.passed]
    # The dense merges are bit-identical (same products, same order), so PEFT's re-quantized bytes are
    # quantize_nf4 of JAX's merged kernels exactly; the unmerged 4-bit bytes come back exactly.
    assert _row(result, "merged weights peft").max_abs == 0.0
    assert _row(result, "re-quantized merge").max_abs == 0.0
    assert _row(result, "torch unmerge restores the 4-bit base").max_abs == 0.0
    # Re-quantizing moves the logits well beyond float noise: the dense merge is the lossless one.
    assert "re-quantizing moved JAX's merged logits by max" in _row(result, "merged logits peft").detail


def _peft_adapter(model_dir, out_dir):
    """A PEFT-made adapter (random non-zero A and B) on the float tiny GPT-2, saved as PEFT saves it."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], init_lora_weights=False,
                             fan_in_fan_out=True)
    peft.get_peft_model(GPT2LMHeadModel.from_pretrained(model_dir), config).save_pretrained(out_dir)
    return out_dir


def test_dumped_jax_lora_logits_match_peft_on_transformers_4bit(tiny_gpt2_dir, tmp_path):
    adapter = _peft_adapter(tiny_gpt2_dir, tmp_path / "adapter")
    dump = tmp_path / "dump"
    assert main(["--model", str(tiny_gpt2_dir), "--quantize", "nf4", "--adapter", str(adapter),
                 "--checks", "quantization,forward_delta", "--dump", str(dump)]) == 0
    ids = np.load(dump / "input_ids.npy")
    model = peft.PeftModel.from_pretrained(load_transformers_4bit(tiny_gpt2_dir), str(adapter)).eval()
    with torch.no_grad():
        expected = model(torch.as_tensor(ids)).logits.numpy()
        with model.disable_adapter():
            base = model(torch.as_tensor(ids)).logits.numpy()
    jax_logits = np.load(dump / "jax_lora_logits.npy")
    # The bound: fp32 compute on CPU over bit-identical dequantized weights; measured ~1e-7.
    assert jax_logits.shape == expected.shape and np.abs(jax_logits - expected).max() < 1e-4
    assert np.abs(expected - base).max() > 1e-2  # the adapter moves the logits: the comparison means something
