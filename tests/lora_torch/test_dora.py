"""DoRA (lora_torch.dora), checked against the real ``peft`` 0.21: load, save, gradients, merge, dropout."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from gpt2_fixtures import save_gpt2
from lora_torch import (
    Conv1DWithDoRA,
    LinearWithDoRA,
    create_loraplus_param_groups,
    freeze_base_model,
    inject_lora,
    load_adapter,
    load_lora_weights,
    lora_parameters,
    lora_wrappers,
    merge_lora_weights,
    print_trainable_parameters,
    save_adapter,
    save_lora_weights,
    unmerge_lora_weights,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TARGETS = ["c_attn", "c_proj", "c_fc"]
# Width 24 with n_inner 40: c_fc is (24, 40) and mlp.c_proj (40, 24), so a norm over the wrong axis
# has the wrong shape and fails to load, and c_attn (24, 72) is far from square too.
SHAPE = dict(n_layer=2, n_embd=24, n_head=4, n_inner=40, vocab_size=53, n_positions=16)
# fp32: PEFT computes the branch as lora_B(lora_A(x)) and the norm from (out, in) weights, lora_torch as
# x @ A @ B and from (in, out) kernels; the same sums in another order differ by float rounding. Observed
# max |logit error| is 2.4e-7 loaded and 1.1e-6 merged vs unmerged, on logits of size ~0.3 whose adapter
# moves them by 0.03-0.4; 2e-5 keeps headroom and still catches an m/n off by 0.1% on one module.
ATOL = 2e-5
CASES = [pytest.param(rank, rslora, id=f"r{rank}-{'rs' if rslora else 'std'}") for rank in (1, 4)
         for rslora in (False, True)]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_gpt2(tmp_path_factory.mktemp("dora_gpt2"), seed=3, **SHAPE)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(1))


def _base(path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(path).eval()


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _peft_dora(base_dir, rank: int, use_rslora: bool, seed: int = 0) -> peft.PeftModel:
    """PEFT's DoRA with non-zero B (init_lora_weights=False) and m perturbed away from n."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=rank, lora_alpha=8, target_modules=TARGETS, fan_in_fan_out=True, use_dora=True,
                             use_rslora=use_rslora, init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = peft.get_peft_model(_base(base_dir), config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, peft.tuners.lora.LoraLayer):
                magnitude = module.lora_magnitude_vector["default"].weight
                magnitude.mul_(1.0 + 0.2 * torch.randn(magnitude.shape))
    return model


def _ours_dora(base_dir, rank: int, use_rslora: bool, seed: int = 0) -> GPT2LMHeadModel:
    """lora_torch's DoRA with seeded non-zero A, B and m != n."""
    model = inject_lora(_base(base_dir), TARGETS, rank=rank, lora_alpha=8.0, use_rslora=use_rslora, use_dora=True,
                        verbose=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wrapper in lora_wrappers(model).values():
            for param in (wrapper.lora.lora_A, wrapper.lora.lora_B):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            wrapper.lora.magnitude.mul_(1.0 + 0.2 * torch.randn(wrapper.lora.magnitude.shape, generator=generator))
    return model


@pytest.mark.parametrize(("rank", "use_rslora"), CASES)
def test_saved_by_peft_loads_here(base_dir, ids, tmp_path, rank, use_rslora):
    theirs = _peft_dora(base_dir, rank, use_rslora)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(_base(base_dir), tmp_path)
    assert {type(w) for w in lora_wrappers(ours).values()} == {Conv1DWithDoRA}
    expected = _logits(theirs, ids)
    assert _max_err(expected, _logits(_base(base_dir), ids)) > 0.01  # the adapter acts
    assert _max_err(_logits(ours, ids), expected) < ATOL


@pytest.mark.parametrize(("rank", "use_rslora"), CASES)
def test_saved_here_loads_in_peft(base_dir, ids, tmp_path, rank, use_rslora):
    ours = _ours_dora(base_dir, rank, use_rslora, seed=rank)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["use_dora"], config["fan_in_fan_out"], config["use_rslora"]) == (True, True, use_rslora)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    magnitude = tensors["base_model.model.transformer.h.0.mlp.c_fc.lora_magnitude_vector"]
    assert (tuple(magnitude.shape), magnitude.dtype) == ((40,), torch.float32)
    assert len(tensors) == 3 * 8  # A, B and m for 4 modules in each of 2 layers
    theirs = peft.PeftModel.from_pretrained(_base(base_dir), tmp_path).eval()
    expected = _logits(ours, ids)
    assert _max_err(expected, _logits(_base(base_dir), ids)) > 0.01
    assert _max_err(_logits(theirs, ids), expected) < ATOL


def _our_grads(model) -> dict[tuple[str, str], torch.Tensor]:
    grads = {}
    for name, wrapper in lora_wrappers(model).items():
        grads[name, "A"] = wrapper.lora.lora_A.grad
        grads[name, "B"] = wrapper.lora.lora_B.grad
        grads[name, "m"] = wrapper.lora.magnitude.grad
    return grads


def _peft_grads(model) -> dict[tuple[str, str], torch.Tensor]:
    grads = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            grads[name, "A"] = module.lora_A["default"].weight.grad.T  # (r, in) -> our (in, r)
            grads[name, "B"] = module.lora_B["default"].weight.grad.T  # (out, r) -> our (r, out)
            grads[name, "m"] = module.lora_magnitude_vector["default"].weight.grad
    return grads


# Error of each gradient relative to its largest entry. float64 shows the maths is the same (observed
# 1.2e-14); fp32 shows the working dtype: observed 1.6e-5, from h.1.attn.c_attn's dL/dA at r=1, whose
# entries (max 6e-3) are sums of terms ~20x larger, so fp32 rounding of those terms shows through.
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(("rank", "use_rslora"), CASES)
def test_gradients_match_peft(base_dir, ids, tmp_path, rank, use_rslora, dtype):
    theirs = _peft_dora(base_dir, rank, use_rslora, seed=10 + rank)
    theirs.save_pretrained(tmp_path)
    ours = freeze_base_model(load_adapter(_base(base_dir), tmp_path))
    for model in (theirs.to(dtype), ours.to(dtype)):
        model(ids, labels=ids).loss.backward()
    mine, reference = _our_grads(ours), _peft_grads(theirs)
    assert sorted(mine) == sorted(reference) and len(mine) == 3 * 8
    worst = max(_max_err(mine[key], reference[key]) / reference[key].abs().max().item() for key in mine)
    assert worst < GRAD_RTOL[dtype]
    assert min(reference[key].abs().max().item() for key in mine) > 1e-3  # every gradient is non-trivial


@pytest.mark.parametrize(("rank", "use_rslora"), CASES[::3])
def test_merge_matches_unmerged_and_peft(base_dir, ids, tmp_path, rank, use_rslora, snapshot, assert_same_state):
    theirs = _peft_dora(base_dir, rank, use_rslora, seed=20)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(_base(base_dir), tmp_path)
    unmerged = _logits(ours, ids)
    before = snapshot(ours)
    merge_lora_weights(ours)
    assert type(ours.transformer.h[0].mlp.c_fc) is Conv1D
    merged = _logits(ours, ids)
    peft_merged = _logits(theirs.merge_and_unload(), ids)
    assert _max_err(merged, unmerged) < ATOL
    assert _max_err(merged, peft_merged) < ATOL
    unmerge_lora_weights(ours)
    assert_same_state(ours, before)  # bit-identical: the kept wrapper comes back
    assert torch.equal(_logits(ours, ids), unmerged)


def test_merged_weight_formula_linear():
    torch.manual_seed(0)
    wrapper = LinearWithDoRA(nn.Linear(5, 3), rank=2, lora_alpha=4.0)
    with torch.no_grad():
        wrapper.lora.lora_B.normal_()
        wrapper.lora.magnitude.copy_(torch.tensor([1.0, 2.0, 3.0]))
    adapted = wrapper.base_layer.weight + 2.0 * (wrapper.lora.lora_A @ wrapper.lora.lora_B).T  # (out, in)
    expected = torch.tensor([1.0, 2.0, 3.0])[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    merged = merge_lora_weights(nn.Sequential(wrapper))[0]
    assert type(merged) is nn.Linear
    assert _max_err(merged.weight, expected) < 1e-6  # fp32 rounding of the same formula
    # Each output row of the merged weight has norm m: DoRA's magnitude is per output feature.
    assert _max_err(merged.weight.norm(dim=1), torch.tensor([1.0, 2.0, 3.0])) < 1e-6
    assert torch.equal(merged.bias, wrapper.base_layer.bias)


def test_norm_is_per_output_feature_of_an_out_in_linear():
    linear = nn.Linear(4, 2, bias=False)  # weight (out=2, in=4)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    wrapper = LinearWithDoRA(linear, rank=1)
    # Rows of the (out, in) weight: ||(3, 4, 0, 0)|| = 5 and ||(1, 0, 0, 0)|| = 1.
    assert wrapper.lora.magnitude.tolist() == [5.0, 1.0]
    assert wrapper.lora.weight_norm(wrapper.base_kernel()).tolist() == [5.0, 1.0]
    conv = Conv1D(nf=2, nx=4)  # weight (in=4, out=2): the same layer stored transposed
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
    assert Conv1DWithDoRA(conv, rank=1).lora.magnitude.tolist() == [5.0, 1.0]


def _dora_output(layer: LinearWithDoRA, x: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """DoRA's formula written out for an nn.Linear, with the norm detached or not."""
    lora = layer.lora
    adapted = layer.base_layer.weight.T + lora.scaling * lora.lora_A @ lora.lora_B  # (in, out)
    norm = adapted.norm(dim=0)
    norm = norm.detach() if detach_norm else norm
    return x @ (lora.magnitude / norm * adapted) + layer.base_layer.bias


def test_norm_is_detached_from_the_gradient():
    torch.manual_seed(0)
    layer = LinearWithDoRA(nn.Linear(6, 4), rank=2, lora_alpha=4.0)
    with torch.no_grad():
        layer.lora.lora_B.normal_()
        layer.lora.magnitude.mul_(1.5)
    x = torch.randn(8, 6)
    target = torch.randn(8, 4)

    def grad_of_a(output: torch.Tensor) -> torch.Tensor:
        layer.lora.lora_A.grad = None
        ((output - target) ** 2).sum().backward()
        return layer.lora.lora_A.grad.clone()

    ours = grad_of_a(layer(x))
    detached = grad_of_a(_dora_output(layer, x, detach_norm=True))
    through_norm = grad_of_a(_dora_output(layer, x, detach_norm=False))
    # Same function, factorised differently: fp32 rounding only (observed 1.5e-7 of the largest entry).
    assert _max_err(ours, detached) < 1e-5 * detached.abs().max().item()
    # The norm's own gradient is not small (observed 73% of the largest entry), so a forward whose norm
    # were not detached would fail the line above.
    assert _max_err(through_norm, detached) > 0.05 * detached.abs().max().item()


def test_dropout_matches_peft_in_training_mode():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5))
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True, lora_dropout=0.5,
                             init_lora_weights=False)
    theirs = peft.get_peft_model(nn.Sequential(nn.Linear(6, 5)), config)
    theirs.base_model.model[0].base_layer.load_state_dict(base[0].state_dict())
    ours = inject_lora(base, ["0"], rank=2, lora_alpha=4.0, dropout=0.5, use_dora=True, verbose=False)
    layer, reference = ours[0], theirs.base_model.model[0]
    with torch.no_grad():
        layer.lora.lora_A.copy_(reference.lora_A["default"].weight.T)
        layer.lora.lora_B.copy_(reference.lora_B["default"].weight.T)
        layer.lora.magnitude.copy_(1.3 * reference.lora_magnitude_vector["default"].weight)
        reference.lora_magnitude_vector["default"].weight.mul_(1.3)
    x = torch.randn(7, 6)
    outputs = []
    for model in (ours.train(), theirs.train()):
        torch.manual_seed(5)  # the same dropout mask: each draws it once, from the same generator state
        outputs.append(model(x))
    assert _max_err(outputs[0], outputs[1]) < 1e-6  # fp32 rounding of the same sums
    with torch.no_grad():  # and the mask matters: eval (no dropout) gives something else
        assert _max_err(ours.eval()(x), outputs[0]) > 0.05


def test_trainable_parameters_and_tutorial_file_include_the_magnitude(base_dir, tmp_path, capsys):
    model = freeze_base_model(_ours_dora(base_dir, rank=4, use_rslora=False))
    sizes = [(24, 72), (24, 24), (24, 40), (40, 24)]  # c_attn, attn.c_proj, c_fc, mlp.c_proj: (in, out)
    expected = 2 * sum(4 * (fan_in + fan_out) + fan_out for fan_in, fan_out in sizes)
    assert print_trainable_parameters(model)["trainable"] == expected == 2496
    assert sum(p.numel() for _, p in lora_parameters(model)) == expected
    saved = save_lora_weights(model, tmp_path / "dora.safetensors")
    assert saved["transformer.h.1.mlp.c_fc.lora.magnitude"].shape == (40,)
    other = _ours_dora(base_dir, rank=4, use_rslora=False, seed=99)
    load_lora_weights(other, tmp_path / "dora.safetensors")
    for name, param in lora_parameters(other):
        assert torch.equal(param, saved[name])


def test_loraplus_puts_the_magnitude_with_b_as_peft_does(base_dir):
    ours = freeze_base_model(_ours_dora(base_dir, rank=2, use_rslora=False))
    groups = create_loraplus_param_groups(ours, lr=1e-3, ratio=16.0, weight_decay=0.01)
    by_name = {name: (group["lr"], group["weight_decay"]) for group in groups for name in group["names"]}
    theirs = _peft_dora(base_dir, rank=2, use_rslora=False)
    optimizer = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                          loraplus_weight_decay=0.01)
    ids = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    peft_magnitudes = {ids[id(p)] for name, p in theirs.named_parameters() if "lora_magnitude_vector" in name}
    ours_magnitudes = {setting for name, setting in by_name.items() if name.endswith("lora.magnitude")}
    assert peft_magnitudes == ours_magnitudes == {(0.016, 0.01)}
    assert sum(name.endswith("lora.magnitude") for name in by_name) == 8


def test_dora_file_into_plain_lora_and_back_is_refused(base_dir, tmp_path, snapshot, assert_same_state):
    save_adapter(_ours_dora(base_dir, rank=2, use_rslora=False), tmp_path / "dora")
    plain = inject_lora(_base(base_dir), TARGETS, rank=2, lora_alpha=8.0, verbose=False)
    save_adapter(plain, tmp_path / "plain")
    for model, source in ((plain, "dora"), (_ours_dora(base_dir, rank=2, use_rslora=False), "plain")):
        before = snapshot(model)
        with pytest.raises(ValueError, match=rf"does not match the LoRA already in the model .* use_dora="
                                             rf"{source == 'dora'}\)"):
            load_adapter(model, tmp_path / source)
        assert_same_state(model, before)


def test_magnitude_of_the_wrong_shape_is_refused(base_dir, tmp_path, snapshot, assert_same_state):
    directory = save_adapter(_ours_dora(base_dir, rank=2, use_rslora=False), tmp_path / "dora")
    path = directory / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.transformer.h.0.mlp.c_fc.lora_magnitude_vector"
    tensors[key] = tensors[key][:24]  # a norm over the input axis would have this shape
    save_file(tensors, path, metadata={"format": "pt"})  # PEFT's metadata: no digest to trip first
    model = _base(base_dir)
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{key} has shape \(24,\), the model needs \(40,\)"):
        load_adapter(model, directory)
    assert_same_state(model, before)
    assert lora_wrappers(model) == {}


def test_mixed_dora_and_plain_modules_cannot_be_saved(base_dir, tmp_path):
    model = inject_lora(_base(base_dir), ["c_attn"], rank=2, use_dora=True, verbose=False)
    inject_lora(model, ["c_fc"], rank=2, verbose=False)
    with pytest.raises(ValueError, match=r"different use_dora values \[False, True\]"):
        save_adapter(model, tmp_path / "mixed")
