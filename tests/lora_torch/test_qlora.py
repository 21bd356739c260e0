"""QLoRA in lora_torch: ``quantize_base`` against transformers' 4-bit GPT-2, and LoRA on it against PEFT.

Both sides run the real bitsandbytes (0.50, CPU, float32 compute) on the tiny GPT-2. Forwards that
feed a comparison run in train mode (the fixture has no dropout): in eval mode without grad,
bitsandbytes repacks a ``Linear4bit`` weight in place on AVX512-BF16 CPUs, which PEFT's layers would do
and ours do not. Stored bytes are compared only on layers that no forward has touched.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from transformers import BitsAndBytesConfig, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from lora_torch import (
    BitsandbytesMissingError,
    Linear4bitWithDoRA,
    Linear4bitWithLoRA,
    add_adapter,
    adapter_names,
    disable_adapters,
    freeze_base_model,
    inject_lora,
    load_adapter,
    lora_wrappers,
    merge_lora_weights,
    print_trainable_parameters,
    quantize_base,
    save_adapter,
    set_adapter,
    unmerge_lora_weights,
)
from peft_compare import IDS

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

TARGETS = ["c_attn", "c_proj", "c_fc"]
QUANTIZED = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                  "mlp.c_proj")]
IDS_T = torch.as_tensor(IDS)


def hf_4bit(model_dir) -> GPT2LMHeadModel:
    """transformers' own 4-bit loading, the reference for the bytes."""
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    return GPT2LMHeadModel.from_pretrained(model_dir, quantization_config=config, device_map="cpu")


def ours_4bit(model_dir) -> GPT2LMHeadModel:
    return quantize_base(GPT2LMHeadModel.from_pretrained(model_dir))


def layers_4bit(model) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def logits(model, ids=IDS_T, **kwargs) -> torch.Tensor:
    """Train-mode logits (no dropout in the fixture) without autograd: never the bitsandbytes CPU repack path."""
    model.train()
    with torch.no_grad():
        return model(ids, **kwargs).logits


def copy_lora_into_peft(ours, peft_model, seed: int = 0) -> None:
    """Seeded non-zero A and B (B = 0 would prove nothing) into both models: ours (in, r), PEFT's weight A.T."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, wrapper in lora_wrappers(ours).items():
            lora = wrapper.lora
            lora.lora_A.copy_(0.1 * torch.randn(lora.lora_A.shape, generator=generator))
            lora.lora_B.copy_(0.1 * torch.randn(lora.lora_B.shape, generator=generator))
            module = peft_model.base_model.model.get_submodule(name)
            module.lora_A["default"].weight.copy_(lora.lora_A.T)
            module.lora_B["default"].weight.copy_(lora.lora_B.T)


@pytest.fixture(scope="module")
def pair(tiny_gpt2_dir):
    """(ours, PEFT): LoRA r=4 on c_attn / c_proj / c_fc of the same 4-bit base, with the same A and B."""
    ours = ours_4bit(tiny_gpt2_dir)
    inject_lora(ours, TARGETS, rank=4, lora_alpha=8.0, verbose=False)
    freeze_base_model(ours)
    theirs = peft.get_peft_model(hf_4bit(tiny_gpt2_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    copy_lora_into_peft(ours, theirs)
    return ours, theirs


# -- quantize_base -----------------------------------------------------------------------------------

def test_quantize_base_bytes_equal_transformers_4bit_loading(tiny_gpt2_dir):
    reference = hf_4bit(tiny_gpt2_dir)
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    conv_weight = model.transformer.h[0].attn.c_attn.weight.detach().clone()  # (in, out) = (32, 96)
    assert quantize_base(model) is model and model.is_loaded_in_4bit
    ours, theirs = layers_4bit(model), layers_4bit(reference)
    assert list(ours) == list(theirs) == QUANTIZED  # lm_head (tied to wte), embeddings, LayerNorms stay dense
    for name, layer in ours.items():
        mine, ref = layer.weight.quant_state, theirs[name].weight.quant_state
        assert layer.weight.dtype == torch.uint8 and layer.source_cls is Conv1D and layer.compute_dtype == torch.float32
        assert list(mine.shape) == list(ref.shape) == [layer.out_features, layer.in_features]  # Conv1D transposed
        assert torch.equal(layer.weight.data, theirs[name].weight.data)  # the packed NF4 codes, byte for byte
        assert torch.equal(mine.absmax, ref.absmax) and mine.absmax.dtype == torch.uint8  # double-quantized absmax
        assert torch.equal(mine.state2.absmax, ref.state2.absmax) and torch.equal(mine.offset, ref.offset)
        assert torch.equal(mine.state2.code, ref.state2.code) and mine.blocksize == ref.blocksize == 64
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight is model.transformer.wte.weight
    # The stored codes are NF4 of the transposed Conv1D kernel.
    codes, _ = bnb.functional.quantize_4bit(conv_weight.T.contiguous(), blocksize=64, compress_statistics=True,
                                           quant_type="nf4")
    assert torch.equal(codes, ours["transformer.h.0.attn.c_attn"].weight.data)


def test_base_logits_equal_transformers_4bit(tiny_gpt2_dir):
    dense = logits(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir))
    ours = logits(ours_4bit(tiny_gpt2_dir))
    # Same codes and statistics through the same bitsandbytes kernels: bit-identical logits.
    assert torch.equal(ours, logits(hf_4bit(tiny_gpt2_dir)))
    assert (ours - dense).abs().max().item() > 1e-3  # and quantization did change the model


def test_target_modules_restrict_the_quantized_layers(tiny_gpt2_dir):
    model = quantize_base(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), target_modules=["c_fc"], block_size=128,
                          double_quant=False)
    assert list(layers_4bit(model)) == ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"]
    state = model.transformer.h[0].mlp.c_fc.weight.quant_state
    assert state.blocksize == 128 and not state.nested and state.absmax.dtype == torch.float32
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)


@pytest.mark.parametrize("settings, message", [
    ({"block_size": 100}, r"block_size=100 is not one bitsandbytes accepts; use one of \(32, 64, 128"),
    ({"block_size": 16}, "block_size=16 is not one bitsandbytes accepts"),
    ({"compute_dtype": torch.int8}, "compute_dtype=torch.int8 is not a float dtype"),
    ({"target_modules": ["lm_head"]}, r"selects \['lm_head'\], which transformers' 4-bit loading keeps"),
    ({"target_modules": ["nothing"]}, "found no layer to quantize"),
])
def test_bad_settings_raise_and_leave_the_model_bit_identical(tiny_gpt2_dir, snapshot, assert_same_state, settings,
                                                             message):
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        quantize_base(model, **settings)
    assert_same_state(model, before)
    assert not layers_4bit(model) and not hasattr(model, "is_loaded_in_4bit")


def test_a_quantized_or_lora_model_is_refused(tiny_gpt2_dir, snapshot, assert_same_state):
    with pytest.raises(ValueError, match="is quantized already"):
        quantize_base(hf_4bit(tiny_gpt2_dir))
    model = inject_lora(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), ["c_attn"], rank=2, verbose=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="carries LoRA already .* quantize the base first, then inject_lora"):
        quantize_base(model)
    assert_same_state(model, before)


def test_missing_bitsandbytes_names_the_install_command(tiny_gpt2_dir, monkeypatch, snapshot, assert_same_state):
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    before = snapshot(model)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "bitsandbytes>=0.45,<0.51"') as error:
        quantize_base(model)
    assert isinstance(error.value, BitsandbytesMissingError) and "pip install -e .[qlora]" in str(error.value)
    assert_same_state(model, before)


# -- LoRA on the 4-bit base --------------------------------------------------------------------------

def test_inject_lora_wraps_linear4bit_with_float32_lora_only_trainable(pair):
    ours, _ = pair
    wrappers = lora_wrappers(ours)
    assert list(wrappers) == QUANTIZED and all(type(w) is Linear4bitWithLoRA for w in wrappers.values())
    wrapper = wrappers["transformer.h.0.attn.c_attn"]
    assert isinstance(wrapper.base_layer, bnb.nn.Linear4bit) and wrapper.lora.lora_A.dtype == torch.float32
    assert tuple(wrapper.lora.lora_A.shape) == (32, 4) and tuple(wrapper.lora.lora_B.shape) == (4, 96)
    assert not wrapper.base_layer.support_avx512bf16_for_cpu  # bitsandbytes' lossy, grad-less CPU repack is off
    trainable = [name for name, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora.lora_" in name for name in trainable)
    # "c_proj" matches attn.c_proj and mlp.c_proj: 2 blocks x r4 x ((32+96) + (32+32) + (32+128) + (128+32)).
    assert print_trainable_parameters(ours)["trainable"] == 4096


def test_logits_and_gradients_match_peft_on_the_same_4bit_base(pair):
    ours, theirs = pair
    for model in pair:
        model.train()
        model.zero_grad(set_to_none=True)
    ours_out, peft_out = ours(IDS_T, labels=IDS_T), theirs(IDS_T, labels=IDS_T)
    # The base outputs are the same bitsandbytes kernel on the same bytes; only the LoRA branch's matmul
    # layout differs (x @ A vs linear(x, A.T)): measured 2.1e-7 on logits of size 0.4, held at 1e-5.
    torch.testing.assert_close(ours_out.logits, peft_out.logits, atol=1e-5, rtol=0)
    with disable_adapters(ours):
        assert (ours_out.logits - logits(ours)).abs().max().item() > 1e-2  # the adapter does act
    ours_out.loss.backward()
    peft_out.loss.backward()
    for name, wrapper in lora_wrappers(ours).items():
        module = theirs.base_model.model.get_submodule(name)
        # Gradients of size 5e-2, measured 2.4e-8 apart (float32 summation order), held at 2e-5.
        torch.testing.assert_close(wrapper.lora.lora_A.grad, module.lora_A["default"].weight.grad.T, atol=2e-5, rtol=0)
        torch.testing.assert_close(wrapper.lora.lora_B.grad, module.lora_B["default"].weight.grad.T, atol=2e-5, rtol=0)
        assert wrapper.base_layer.weight.grad is None


# -- merge -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def merged_pair(tiny_gpt2_dir):
    """A fresh pair (the shared one carries gradients), with its unmerged logits."""
    ours = ours_4bit(tiny_gpt2_dir)
    inject_lora(ours, TARGETS, rank=4, lora_alpha=8.0, verbose=False)
    theirs = peft.get_peft_model(hf_4bit(tiny_gpt2_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    copy_lora_into_peft(ours, theirs, seed=1)
    return ours, theirs, logits(ours), logits(theirs)


def test_merge_dequantizes_to_full_precision_and_unmerge_restores_the_4bit_base(merged_pair):
    ours, _, qlora, _ = merged_pair
    wrapper = ours.transformer.h[0].attn.c_attn
    expected = bnb.functional.dequantize_4bit(wrapper.base_layer.weight.data, wrapper.base_layer.weight.quant_state)
    expected = expected + wrapper.lora.scaling * (wrapper.lora.lora_B.T @ wrapper.lora.lora_A.T)  # W + s B A, (out, in)
    merge_lora_weights(ours)
    merged = ours.transformer.h[0].attn.c_attn
    # A Conv1D source merges back into a Conv1D, (in, out), so save_pretrained writes GPT-2's own layout.
    assert type(merged) is Conv1D and merged.weight.dtype == torch.float32 and not layers_4bit(ours)
    torch.testing.assert_close(merged.weight.T, expected, atol=1e-6, rtol=0)  # float32 rounding of s B A
    # The dense merged model computes the QLoRA forward: measured 2.2e-7 apart (summation order), held at 1e-5.
    torch.testing.assert_close(logits(ours), qlora, atol=1e-5, rtol=0)
    unmerge_lora_weights(ours)
    assert ours.transformer.h[0].attn.c_attn is wrapper and list(layers_4bit(ours)) == [
        f"{name}.base_layer" for name in QUANTIZED]
    assert torch.equal(logits(ours), qlora)  # the kept wrapper: the same 4-bit base and adapter


def test_requantized_merge_equals_peft_merge_and_unload(merged_pair):
    ours, theirs, qlora, peft_unmerged = merged_pair
    torch.testing.assert_close(qlora, peft_unmerged, atol=1e-5, rtol=0)
    exact = {name: w.merged_weight() for name, w in lora_wrappers(ours).items()}  # dequantize(W) + s B A, (out, in)
    merge_lora_weights(ours, requantize=True)
    unloaded = theirs.merge_and_unload()  # PEFT merges into a 4-bit layer: dequantize, add s B A, quantize again
    for name in QUANTIZED:
        layer, ref = ours.get_submodule(name), unloaded.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit) and isinstance(ref, bnb.nn.Linear4bit)
        assert torch.equal(layer.weight.data, ref.weight.data)  # same merged weight, same NF4 codes
        assert torch.equal(layer.weight.quant_state.state2.absmax, ref.weight.quant_state.state2.absmax)
        # The re-quantized weight is NF4 of the exact merged weight, nothing else.
        codes, state = bnb.functional.quantize_4bit(exact[name], blocksize=64, compress_statistics=True,
                                                   quant_type="nf4")
        assert torch.equal(layer.weight.data, codes)
    requantized = logits(ours)
    # Same codes, same kernels: measured 0.0; 1e-4 is the bound for merged logits.
    torch.testing.assert_close(requantized, logits(unloaded), atol=1e-4, rtol=0)
    # What re-quantizing costs: measured 5.2e-2 on logits of size 0.5 with these (large, 0.1 * randn) adapters.
    assert (requantized - qlora).abs().max().item() > 1e-3
    unmerge_lora_weights(ours)
    assert torch.equal(logits(ours), qlora)


def test_requantize_without_a_4bit_layer_is_refused(tiny_gpt2_dir, snapshot, assert_same_state):
    model = inject_lora(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), ["c_attn"], rank=2, verbose=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match="requantize=True re-quantizes merged 4-bit"):
        merge_lora_weights(model, requantize=True)
    assert_same_state(model, before)


# -- adapters and variants ---------------------------------------------------------------------------

def test_a_mixed_batch_of_two_adapters_on_the_4bit_base(tiny_gpt2_dir):
    model = ours_4bit(tiny_gpt2_dir)
    inject_lora(model, ["c_attn"], rank=2, init_lora_weights=False, verbose=False)  # B drawn too: acts at once
    add_adapter(model, "b", ["c_fc"], rank=4, init_lora_weights=False, verbose=False)
    ids = torch.as_tensor(np.concatenate([IDS, IDS[:1]]))  # rows: default, b, base
    rows = []
    for name in ("default", "b"):
        set_adapter(model, name)
        rows.append(logits(model, ids))
    with disable_adapters(model):
        rows.append(logits(model, ids))
    with adapter_names(model, ["default", "b", "__base__"]):
        mixed = logits(model, ids)
    for i, expected in enumerate(rows):
        # Row i through its own adapter in a sub-batch: float32 summation order only, so 1e-6.
        torch.testing.assert_close(mixed[i], expected[i], atol=1e-6, rtol=0)
    assert (rows[0][0] - rows[2][0]).abs().max().item() > 1e-3 and (rows[1][1] - rows[2][1]).abs().max() > 1e-3


def test_dora_on_the_4bit_base_matches_peft(tiny_gpt2_dir):
    ours = ours_4bit(tiny_gpt2_dir)
    inject_lora(ours, ["c_attn", "c_fc"], rank=4, lora_alpha=8.0, use_dora=True, verbose=False)
    theirs = peft.get_peft_model(hf_4bit(tiny_gpt2_dir), peft.LoraConfig(r=4, lora_alpha=8,
                                                                          target_modules=["c_attn", "c_fc"],
                                                                          use_dora=True))
    for name, wrapper in lora_wrappers(ours).items():
        assert type(wrapper) is Linear4bitWithDoRA
        # m starts at ||dequantize(W)|| per output feature, as PEFT's: equal bit for bit here.
        assert torch.equal(wrapper.lora.magnitude,
                           theirs.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight)
    copy_lora_into_peft(ours, theirs, seed=2)
    ours_out, peft_out = ours(IDS_T, labels=IDS_T), theirs(IDS_T, labels=IDS_T)
    torch.testing.assert_close(ours_out.logits, peft_out.logits, atol=1e-5, rtol=0)  # measured 6e-8
    ours_out.loss.backward()
    peft_out.loss.backward()
    for name, wrapper in lora_wrappers(ours).items():
        magnitude = theirs.base_model.model.get_submodule(name).lora_magnitude_vector["default"].weight
        torch.testing.assert_close(wrapper.lora.magnitude.grad, magnitude.grad, atol=2e-5, rtol=0)  # measured 2e-9
    merge_lora_weights(ours)  # (m / ||W + s A B||) (W + s A B) of the dequantized W, in full precision
    torch.testing.assert_close(logits(ours), ours_out.logits.detach(), atol=1e-5, rtol=0)  # measured 9e-8


def test_qlora_training_learns_and_leaves_the_4bit_base_unchanged(tiny_gpt2_dir):
    model = ours_4bit(tiny_gpt2_dir)
    before = {name: (layer.weight.data.clone(), layer.weight.quant_state.absmax.clone())
              for name, layer in layers_4bit(model).items()}
    inject_lora(model, TARGETS, rank=4, lora_alpha=8.0, verbose=False)
    freeze_base_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(IDS_T, labels=IDS_T).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05  # measured 4.61 -> 4.40
    for name, (codes, absmax) in before.items():  # train-mode forwards never repack the bytes
        layer = model.get_submodule(name).base_layer
        assert torch.equal(layer.weight.data, codes) and torch.equal(layer.weight.quant_state.absmax, absmax)


def test_a_qlora_adapter_saves_and_loads_through_peft(tiny_gpt2_dir, tmp_path):
    model = ours_4bit(tiny_gpt2_dir)
    inject_lora(model, ["c_attn", "c_fc"], rank=4, init_lora_weights=False, verbose=False)  # B drawn: non-zero
    expected = logits(model)
    save_adapter(model, tmp_path / "adapter")
    again = load_adapter(ours_4bit(tiny_gpt2_dir), tmp_path / "adapter")
    assert type(again.transformer.h[0].attn.c_attn) is Linear4bitWithLoRA
    assert torch.equal(logits(again), expected)  # the same 4-bit base and tensors: bit-identical
    theirs = peft.PeftModel.from_pretrained(hf_4bit(tiny_gpt2_dir), tmp_path / "adapter")
    torch.testing.assert_close(logits(theirs), expected, atol=1e-5, rtol=0)  # measured 1.8e-7, as above
