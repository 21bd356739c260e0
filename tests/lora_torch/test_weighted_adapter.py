"""``add_weighted_adapter`` (lora_torch.weighted): against PEFT 0.21's tensors where PEFT is exact, and against
the dense float64 target ``sum_i w_i s_i A_i B_i`` everywhere.

The factor arithmetic is ``lora_format.combine``'s; these tests check what lora_torch hands it and
builds from it: layouts, scalings, the union of targets, dtypes, and that nothing else changes.
"""

from __future__ import annotations

import copy

import numpy as np
import peft
import pytest
import torch
from transformers import GPT2LMHeadModel

from lora_torch import (
    add_adapter,
    add_weighted_adapter,
    adapter_layers,
    inject_lora,
    list_adapters,
    load_adapter,
    lora_wrappers,
    set_adapter,
)

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

WEIGHTS = [0.7, -1.3]
# Factors: PEFT computes w * s * A in float32 and lora_torch in float64 rounded once to float32, so a
# factor may differ by one float32 ulp (6e-8 relative); observed ~1e-7 relative.
FACTOR_RTOL = 1e-6
# Deltas against the float64 target: the factors are stored in float32 (6e-8 relative each).
DENSE_RTOL = 1e-6
# Logits of the combined adapter, lora_torch against PEFT: the one-ulp factor differences above, amplified by
# a "linear" mix whose cross terms move the logits by several units; observed 3e-7 (cat) and 1.1e-5 (linear).
LOGIT_ATOL = 5e-5


def _base(path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(path).eval()


def _peft_pair(path, tmp_path, first: dict, second: dict) -> tuple[peft.PeftModel, GPT2LMHeadModel]:
    """PEFT's model with adapters "a" and "b" (non-zero B), and lora_torch's model loaded from its save."""
    torch.manual_seed(0)
    model = peft.get_peft_model(_base(path), peft.LoraConfig(fan_in_fan_out=True, init_lora_weights=False,
                                                             task_type="CAUSAL_LM", **first), adapter_name="a")
    model.add_adapter("b", peft.LoraConfig(fan_in_fan_out=True, init_lora_weights=False, task_type="CAUSAL_LM",
                                           **second))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(tmp_path)
    return model.eval(), load_adapter(_base(path), tmp_path)


def _peft_factors(model: peft.PeftModel, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Adapter ``name`` of a PEFT model as {module: (A (in, r), B (r, out), scaling)}."""
    found = {}
    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.lora_A:
            found[module_name] = (module.lora_A[name].weight.detach().T, module.lora_B[name].weight.detach().T,
                                  module.scaling[name])
    return found


def _dense_target(model: GPT2LMHeadModel, adapters: list[str], weights: list[float]) -> dict[str, np.ndarray]:
    """``sum_i w_i s_i A_i B_i`` per module, float64, from lora_torch's own (input) adapters."""
    target: dict[str, np.ndarray] = {}
    for name, weight in zip(adapters, weights):
        for module, layer in adapter_layers(model, name).items():
            a, b = (layer.lora_A.detach().double().numpy(), layer.lora_B.detach().double().numpy())
            target[module] = target.get(module, 0.0) + weight * layer.scaling * (a @ b)
    return target


def _delta(layer) -> np.ndarray:
    return layer.scaling * (layer.lora_A.detach().double().numpy() @ layer.lora_B.detach().double().numpy())


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("combination_type", ["cat", "linear"])
def test_cat_and_linear_give_peft_tensors_without_rslora(tiny_gpt2_dir, tmp_path, combination_type):
    # linear needs equal ranks; cat takes different ones. Alphas differ and the targets differ (union).
    second_rank = 2 if combination_type == "linear" else 4
    theirs, ours = _peft_pair(tiny_gpt2_dir, tmp_path, dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]),
                              dict(r=second_rank, lora_alpha=3, target_modules=["c_attn", "mlp.c_proj"]))
    theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=combination_type)
    add_weighted_adapter(ours, ["a", "b"], WEIGHTS, "mix", combination_type=combination_type)
    reference = _peft_factors(theirs, "mix")
    layers = adapter_layers(ours, "mix")
    assert sorted(layers) == sorted(reference)  # the union of both adapters' modules
    for module, (a, b, scaling) in reference.items():
        layer = layers[module]
        assert (layer.rank, layer.lora_alpha, layer.use_rslora) == (a.shape[1], float(a.shape[1]), False)
        assert layer.scaling == scaling == 1.0
        assert torch.allclose(layer.lora_A, a, rtol=FACTOR_RTOL, atol=FACTOR_RTOL * a.abs().max().item())
        assert torch.allclose(layer.lora_B, b, rtol=FACTOR_RTOL, atol=FACTOR_RTOL * b.abs().max().item())
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(3))
    set_adapter(ours, "mix")
    theirs.set_adapter("mix")
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() < LOGIT_ATOL


def test_cat_is_exact_with_rslora_mixed_ranks_and_wte_where_peft_is_not(tiny_gpt2_dir, tmp_path):
    first = dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["c_attn", "c_fc"])
    theirs, ours = _peft_pair(tiny_gpt2_dir, tmp_path, first,
                              dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["wte", "c_attn"]))
    target = _dense_target(ours, ["a", "b"], WEIGHTS)
    add_weighted_adapter(ours, ["a", "b"], WEIGHTS, "mix", combination_type="cat")
    layers = adapter_layers(ours, "mix")
    assert sorted(layers) == sorted(target)
    worst = max(_rel(_delta(layers[m]), target[m]) for m in target)
    assert worst < DENSE_RTOL
    # PEFT keeps the first adapter's use_rslora with lora_alpha = r' = 6: scaling sqrt(6), not 1.
    theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type="cat")
    peft_mix = _peft_factors(theirs, "mix")
    peft_err = max(_rel(s * (a.double().numpy() @ b.double().numpy()), target[m]) for m, (a, b, s) in peft_mix.items()
                   if m in target and not m.endswith("wte"))
    assert peft_err == pytest.approx(np.sqrt(6) - 1, rel=1e-5)  # PEFT's delta is sqrt(6) = 2.449 times the target


@pytest.mark.parametrize("svd_rank", [None, 3])
def test_svd_is_the_best_low_rank_approximation(tiny_gpt2_dir, tmp_path, svd_rank):
    theirs, ours = _peft_pair(tiny_gpt2_dir, tmp_path, dict(r=2, lora_alpha=4, target_modules=["c_attn"]),
                              dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["c_attn", "c_fc"]))
    target = _dense_target(ours, ["a", "b"], WEIGHTS)
    add_weighted_adapter(ours, ["a", "b"], WEIGHTS, "mix", combination_type="svd", svd_rank=svd_rank)
    rank = svd_rank or 4
    for module, layer in adapter_layers(ours, "mix").items():
        assert layer.rank == rank and layer.scaling == 1.0
        singular = np.linalg.svd(target[module], compute_uv=False)
        error = np.linalg.norm(_delta(layer) - target[module])  # Frobenius
        assert error == pytest.approx(np.sqrt((singular[rank:] ** 2).sum()), rel=1e-5, abs=1e-6)


def test_one_adapter_is_a_linear_copy_as_in_peft(tiny_model):
    inject_lora(tiny_model, ["c_attn"], rank=2, lora_alpha=6.0, init_lora_weights=False, verbose=False)
    add_weighted_adapter(tiny_model, ["default"], [2.0], "twice", combination_type="cat")
    for module, layer in adapter_layers(tiny_model, "twice").items():
        original = lora_wrappers(tiny_model)[module].adapters["default"]
        assert layer.rank == 2
        assert _rel(_delta(layer), 2.0 * _delta(original)) < DENSE_RTOL


@pytest.fixture
def two(tiny_model) -> GPT2LMHeadModel:
    inject_lora(tiny_model, ["c_attn"], rank=2, init_lora_weights=False, verbose=False)
    add_adapter(tiny_model, "b", ["c_attn", "c_fc"], rank=4, use_rslora=True, init_lora_weights=False, verbose=False)
    return tiny_model


def test_combining_changes_no_other_tensor_bit_for_bit(two, snapshot):
    before = snapshot(two)
    add_weighted_adapter(two, ["default", "b"], [1.0, 0.5], "mix", combination_type="cat")
    after = two.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert sorted(set(after) - set(before)) == sorted(
        f"transformer.h.{i}.{m}.lora_adapters.mix.lora_{x}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")
        for x in "AB")
    assert list_adapters(two) == ["default", "b", "mix"]
    assert not any(p.requires_grad for p in adapter_layers(two, "mix")["transformer.h.0.attn.c_attn"].parameters())


@pytest.mark.parametrize(("args", "message"), [
    ((["default", "nope"], [1.0, 1.0], "mix"), r"no adapter named \['nope'\] in the model"),
    ((["default", "default"], [1.0, 1.0], "mix"), r"\['default'\] listed more than once"),
    ((["default", "b"], [1.0, 1.0], "b"), "already has an adapter named 'b'"),
    ((["default", "b"], [1.0, float("nan")], "mix"), r"weights must be finite numbers, got \[1.0, nan\]"),
    ((["default", "b"], [float("inf"), 1.0], "mix"), "must be finite"),
    ((["default", "b"], [1.0], "mix"), "got 1 combination weights for 2 adapters"),
    ((["default", "b"], [1.0, 1.0], "mix", "linear"), r"every adapter needs the same rank, got ranks \[2, 4\]"),
    ((["default", "b"], [1.0, 1.0], "mix", "ties"), "unknown combination_type 'ties'"),
    ((["default", "b"], [1.0, 1.0], "mix", "svd", 0), "svd_rank must be a positive int"),
    (([], [], "mix"), "at least one adapter"),
    ((["default"], [1.0], "a.b"), "holds a '.'"),
])
def test_bad_combinations_change_nothing(two, args, message, snapshot, assert_same_state):
    before = snapshot(two)
    with pytest.raises(ValueError, match=message):
        add_weighted_adapter(two, *args)
    assert_same_state(two, before)
    assert list_adapters(two) == ["default", "b"]


def test_dora_adapters_are_refused(tiny_model):
    inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    add_adapter(tiny_model, "d", ["c_fc"], rank=2, use_dora=True, verbose=False)
    before = copy.deepcopy(tiny_model.state_dict())
    with pytest.raises(ValueError, match=r"cannot combine DoRA adapters \(\['d'\]\)"):
        add_weighted_adapter(tiny_model, ["default", "d"], [1.0, 1.0], "mix", combination_type="cat")
    assert all(torch.equal(tiny_model.state_dict()[k], v) for k, v in before.items())
