"""Mixed batches (``lora_torch.adapter_names``): example i uses adapter names[i], against the real ``peft`` 0.21.

Three adapters of different ranks, alphas, targets and rsLoRA (one on ``wte``, one with a rank_pattern)
are built by PEFT with non-zero B, saved with ``PeftModel.save_pretrained`` and loaded by lora_torch.
PEFT's ``model(ids, adapter_names=names)`` is the reference for the logits and, in float64, the gradients.
"""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import GPT2LMHeadModel

from lora_torch import (
    BASE_ADAPTER,
    LoRALayer,
    adapter_names,
    add_adapter,
    disable_adapters,
    inject_lora,
    list_adapters,
    load_adapter,
    lora_wrappers,
    set_adapter,
    unfreeze_lora_parameters,
)

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

# Each adapter differs in rank, alpha, rsLoRA and targets; "c" adapts the tied wte too.
CONFIGS = {
    "default": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]),
    "b": dict(r=4, lora_alpha=3, use_rslora=True, target_modules=["c_attn", "c_proj"]),
    "c": dict(r=1, lora_alpha=8, target_modules=["wte", "c_fc", "mlp.c_proj"], rank_pattern={"c_fc": 3}),
}
NAMES = ["b", BASE_ADAPTER, "default", "c", "b", "default", "c"]
# fp32: PEFT computes lora_B(lora_A(x)) as two Linear layers, lora_torch (x @ A) @ B, and the rows of a
# sub-batch go through matmuls of another size than the whole batch; the same sums in another order.
# Observed max |logit error| ~3e-7 on logits the adapters move by ~0.5; 2e-5 as for DoRA's logits.
ATOL = 2e-5
# float64 gradients: the same rounding argument at 2^-52; observed ~1e-15 relative.
GRAD_RTOL = 1e-10


def _base(path, dtype=torch.float32) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(path).to(dtype).eval()


@pytest.fixture(scope="module")
def peft_dir(tiny_gpt2_dir, tmp_path_factory):
    """PEFT's three adapters with every LoRA tensor drawn non-zero, saved by PEFT (default at the root)."""
    torch.manual_seed(0)
    configs = {name: peft.LoraConfig(fan_in_fan_out=True, init_lora_weights=False, lora_dropout=0.0,
                                     task_type="CAUSAL_LM", **kwargs) for name, kwargs in CONFIGS.items()}
    model = peft.get_peft_model(_base(tiny_gpt2_dir), configs["default"])
    for name in ("b", "c"):
        model.add_adapter(name, configs[name])
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    directory = tmp_path_factory.mktemp("peft_three")
    model.save_pretrained(directory)
    return directory


def _peft(tiny_gpt2_dir, peft_dir, dtype=torch.float32) -> peft.PeftModel:
    model = peft.PeftModel.from_pretrained(_base(tiny_gpt2_dir, dtype), peft_dir)
    for name in ("b", "c"):
        model.load_adapter(peft_dir / name, adapter_name=name)
    return model.to(dtype).eval()


@pytest.fixture(scope="module")
def theirs(tiny_gpt2_dir, peft_dir) -> peft.PeftModel:
    return _peft(tiny_gpt2_dir, peft_dir)


@pytest.fixture
def ours(tiny_gpt2_dir, peft_dir) -> GPT2LMHeadModel:
    return load_adapter(_base(tiny_gpt2_dir), peft_dir)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (len(NAMES), 9), generator=torch.Generator().manual_seed(2))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_peft_save_of_three_adapters_loads_with_each_adapters_settings(ours):
    assert list_adapters(ours) == ["default", "b", "c"]
    layers = {(module, name): layer for module, wrapper in lora_wrappers(ours).items()
              for name, layer in wrapper.adapters.items()}
    assert layers[("transformer.h.0.attn.c_attn", "b")].scaling == pytest.approx(3 / 2)  # rsLoRA: 3 / sqrt(4)
    assert layers[("transformer.h.1.mlp.c_fc", "c")].rank == 3  # rank_pattern
    assert layers[("transformer.wte", "c")].scaling == 8.0
    assert ("transformer.h.0.attn.c_attn", "c") not in layers  # targets differ per adapter
    assert lora_wrappers(ours)["transformer.h.0.mlp.c_fc"].active_adapters == ["default"]


def test_mixed_batch_logits_match_peft(ours, theirs, ids):
    with torch.no_grad():
        reference = theirs(ids, adapter_names=NAMES).logits
        with adapter_names(ours, NAMES):
            mixed = ours(ids).logits
        with disable_adapters(ours):
            base = ours(ids).logits
    assert _max_err(mixed, reference) < ATOL
    assert torch.equal(mixed[1], base[1])  # the "__base__" row is the base model, bit for bit
    # Every adapter moves its rows far beyond the tolerance, so a row routed wrongly would fail.
    moved = (mixed - base).abs().amax(dim=(1, 2))
    assert moved[1] == 0 and bool((moved[[0, 2, 3, 4, 5, 6]] > 0.05).all())


def test_each_row_equals_its_adapter_run_alone(ours, ids):
    with torch.no_grad(), adapter_names(ours, NAMES):
        mixed = ours(ids).logits
    for name in ("default", "b", "c"):
        rows = [i for i, n in enumerate(NAMES) if n == name]
        set_adapter(ours, name)
        with torch.no_grad():
            alone = ours(ids[rows]).logits
        assert _max_err(mixed[rows], alone) < 1e-5


def test_each_adapter_computes_only_its_own_rows(ours, ids):
    seen: dict[str, list[int]] = {}
    handles = [layer.register_forward_hook(lambda module, args, out, key=name: seen.setdefault(key, []).append(
                   args[0].shape[0]))
               for wrapper in lora_wrappers(ours).values() for name, layer in wrapper.adapters.items()]
    with torch.no_grad(), adapter_names(ours, NAMES):
        ours(ids)
    for handle in handles:
        handle.remove()
    assert {name: set(rows) for name, rows in seen.items()} == {name: {NAMES.count(name)} for name in CONFIGS}
    assert all(isinstance(module, LoRALayer) for wrapper in lora_wrappers(ours).values()
               for module in wrapper.adapters.values())


def test_mixed_batch_gradients_match_peft(tiny_gpt2_dir, peft_dir, ids):
    """float64, so that an error in the routing cannot hide under fp32 rounding; ours runs in training mode."""
    theirs = _peft(tiny_gpt2_dir, peft_dir, torch.float64)
    for name, param in theirs.named_parameters():
        param.requires_grad_("lora_" in name)  # PEFT trains only the active adapter; here all three
    ours = load_adapter(_base(tiny_gpt2_dir, torch.float64), peft_dir).train()
    unfreeze_lora_parameters(ours)
    labels = ids.roll(-1, dims=1)
    loss_theirs = torch.nn.functional.cross_entropy(theirs(ids, adapter_names=NAMES).logits.flatten(0, 1),
                                                    labels.flatten())
    loss_theirs.backward()
    with adapter_names(ours, NAMES):
        loss_ours = torch.nn.functional.cross_entropy(ours(ids).logits.flatten(0, 1), labels.flatten())
    loss_ours.backward()
    assert abs(loss_ours.item() - loss_theirs.item()) < 1e-12
    peft_params = dict(theirs.named_parameters())
    worst = 0.0
    for module, wrapper in lora_wrappers(ours).items():
        for name, layer in wrapper.adapters.items():
            prefix = f"base_model.model.{module}"
            if module.endswith("wte"):
                pairs = [(layer.lora_A, f"{prefix}.lora_embedding_A.{name}"),
                         (layer.lora_B, f"{prefix}.lora_embedding_B.{name}")]
            else:
                pairs = [(layer.lora_A, f"{prefix}.lora_A.{name}.weight"), (layer.lora_B, f"{prefix}.lora_B.{name}.weight")]
            for param, key in pairs:
                reference = peft_params[key].grad.T
                assert reference.abs().max() > 0  # every adapter has examples, so every factor gets a gradient
                worst = max(worst, (_max_err(param.grad, reference) / reference.abs().max()).item())
    assert worst < GRAD_RTOL


def test_gradients_come_from_each_adapters_own_examples(ours, ids):
    """With a loss summed over examples, adapter b's gradient in the mixed batch is that of b's rows alone."""
    unfreeze_lora_parameters(ours)
    ours.train()
    with adapter_names(ours, NAMES):
        ours(ids).logits.square().sum().backward()
    holders = [w for w in lora_wrappers(ours).values() if "b" in w.adapters]
    mixed = {id(p): p.grad.clone() for w in holders for p in w.adapters["b"].parameters()}
    ours.zero_grad()
    rows = [i for i, n in enumerate(NAMES) if n == "b"]
    with adapter_names(ours, ["b"] * len(rows)):
        ours(ids[rows]).logits.square().sum().backward()
    for wrapper in holders:
        for param in wrapper.adapters["b"].parameters():
            assert torch.allclose(mixed[id(param)], param.grad, rtol=1e-5, atol=1e-6)
    # The other adapters had no example in this batch: no gradient reached them.
    others = [p for w in lora_wrappers(ours).values() for name, layer in w.adapters.items() if name != "b"
              for p in layer.parameters()]
    assert others and all(p.grad is None for p in others)


def test_disabled_adapters_win_over_adapter_names(ours, theirs, ids):
    with torch.no_grad(), disable_adapters(ours), adapter_names(ours, NAMES):
        ours_out = ours(ids).logits
    with torch.no_grad(), theirs.disable_adapter():
        reference = theirs(ids).logits
    assert _max_err(ours_out, reference) < ATOL


@pytest.mark.parametrize(("names", "error", "message"), [
    (["b", "nope"] + ["b"] * 5, ValueError, r"adapter_names: no adapter named 'nope' in the model; its adapters are "
                                            r"\['default', 'b', 'c'\]"),
    ("b", TypeError, "one adapter name per example"),
    ([], ValueError, "adapter_names is empty"),
    (["b", None], TypeError, "non-empty str"),
])
def test_bad_names_are_refused_before_the_forward(ours, names, error, message, snapshot, assert_same_state):
    before = snapshot(ours)
    with pytest.raises(error, match=message):
        with adapter_names(ours, names):
            pass
    assert_same_state(ours, before)
    assert all(wrapper.batch_routing is None for wrapper in lora_wrappers(ours).values())


def test_a_names_list_of_the_wrong_length_is_refused_and_cleared(ours, ids, snapshot, assert_same_state):
    before = snapshot(ours)
    with pytest.raises(ValueError, match=r"adapter_names has 3 names for a batch of 7 examples; give exactly one"):
        with adapter_names(ours, NAMES[:3]):
            ours(ids)
    assert_same_state(ours, before)
    assert all(wrapper.batch_routing is None for wrapper in lora_wrappers(ours).values())


def test_a_wrapper_called_directly_takes_adapter_names(ours):
    wrapper = lora_wrappers(ours)["transformer.h.0.attn.c_attn"]  # holds default and b
    x = torch.randn(3, 5, 32)
    out = wrapper(x, adapter_names=["b", "__base__", "default"])
    base = wrapper.base_layer(x)
    assert torch.equal(out[1], base[1])
    assert torch.allclose(out[0], base[0] + wrapper.adapters["b"](x[:1])[0], atol=1e-6)
    assert torch.allclose(out[2], base[2] + wrapper.adapters["default"](x[2:])[0], atol=1e-6)
    with pytest.raises(ValueError, match=r"adapter_names names adapters this module does not hold: \['c'\]"):
        wrapper(x, adapter_names=["c", "b", "b"])


def test_dora_adapters_are_refused_in_a_mixed_batch(tiny_model):
    model = inject_lora(tiny_model, ["c_attn"], rank=2, verbose=False)
    add_adapter(model, "dora", ["c_fc"], rank=2, use_dora=True, verbose=False)
    with pytest.raises(ValueError, match=r"cannot use DoRA adapters \(\['dora'\]\) in a mixed batch, as PEFT cannot"):
        with adapter_names(model, ["dora", "default"]):
            pass
    with torch.no_grad(), adapter_names(model, ["default", "__base__"]):  # the DoRA module runs its base there
        model(torch.zeros(2, 4, dtype=torch.long))
