"""Several named adapters on one base (lora_torch.adapters, add_adapter, save/load), against the real ``peft`` 0.21.

Adapters differ in rank, alpha, targets and rsLoRA and have non-zero B. PEFT is the reference for
switching (``set_adapter``, several active summed, ``disable_adapter``), for which parameters train,
for merging chosen adapters, and for the multi-adapter directory in both directions.
"""

from __future__ import annotations

import copy
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2LMHeadModel

from lora_torch import (
    LinearWithDoRA,
    active_adapters,
    adapter_layers,
    add_adapter,
    create_loraplus_param_groups,
    delete_adapter,
    disable_adapters,
    freeze_base_model,
    inject_lora,
    list_adapters,
    load_adapter,
    load_lora_weights,
    lora_wrappers,
    merge_lora_weights,
    save_adapter,
    save_lora_weights,
    set_adapter,
    unmerge_lora_weights,
)

pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

# As in test_peft_adapter: PEFT's two Linear layers against (x @ A) @ B; only the summation order differs.
ATOL = 1e-5
CONFIGS = {  # name -> (target_modules, rank, alpha, rsLoRA)
    "default": (["c_attn", "mlp.c_fc"], 2, 4.0, False),
    "b": (["c_attn", "attn.c_proj"], 4, 3.0, True),
    "c": (["c_fc", "mlp.c_proj"], 1, 8.0, False),
}


def _base(path) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(path).eval()


def _randomize(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wrapper in lora_wrappers(model).values():
            for layer in wrapper.adapters.values():
                for param in (layer.lora_A, layer.lora_B):
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))


def _three(path) -> GPT2LMHeadModel:
    """lora_torch's model with the three CONFIGS adapters, every tensor non-zero."""
    targets, rank, alpha, rslora = CONFIGS["default"]
    model = inject_lora(_base(path), targets, rank, alpha, use_rslora=rslora, verbose=False)
    for name in ("b", "c"):
        targets, rank, alpha, rslora = CONFIGS[name]
        add_adapter(model, name, targets, rank, alpha, use_rslora=rslora, verbose=False)
    _randomize(model, seed=3)
    return model


@pytest.fixture(scope="module")
def saved_three(tiny_gpt2_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ours_three")
    save_adapter(_three(tiny_gpt2_dir), directory)
    return directory


@pytest.fixture(scope="module")
def theirs(tiny_gpt2_dir, saved_three) -> peft.PeftModel:
    """PEFT loading lora_torch's save: from_pretrained for the root, load_adapter for each subdirectory."""
    model = peft.PeftModel.from_pretrained(_base(tiny_gpt2_dir), saved_three)
    for name in ("b", "c"):
        model.load_adapter(saved_three / name, adapter_name=name)
    return model.eval()


@pytest.fixture
def ours(tiny_gpt2_dir, saved_three) -> GPT2LMHeadModel:
    return load_adapter(_base(tiny_gpt2_dir), saved_three)


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(5))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- the wrapper and the model-level calls -----------------------------------------------------------------


def test_one_adapter_keeps_the_tutorials_names_and_others_sit_beside_it(tiny_gpt2_dir):
    model = inject_lora(_base(tiny_gpt2_dir), ["c_attn"], rank=2, verbose=False)
    names = [n for n, _ in model.named_parameters() if "h.0.attn.c_attn" in n]
    assert names == ["transformer.h.0.attn.c_attn.base_layer.weight", "transformer.h.0.attn.c_attn.base_layer.bias",
                     "transformer.h.0.attn.c_attn.lora.lora_A", "transformer.h.0.attn.c_attn.lora.lora_B"]
    add_adapter(model, "task_b", ["c_attn"], rank=3, verbose=False)
    wrapper = lora_wrappers(model)["transformer.h.0.attn.c_attn"]
    assert [n for n, _ in wrapper.named_parameters()][-2:] == ["lora_adapters.task_b.lora_A",
                                                               "lora_adapters.task_b.lora_B"]
    assert wrapper.lora is wrapper.adapters["default"]  # the active adapter
    set_adapter(model, "task_b")
    assert wrapper.lora is wrapper.adapters["task_b"] and wrapper.lora.rank == 3
    set_adapter(model, ["default", "task_b"])
    with pytest.raises(ValueError, match=r"wrapper.lora is the one active adapter of this module, but 2 of its "
                                         r"adapters are active \(\['default', 'task_b'\]"):
        wrapper.lora  # noqa: B018


@pytest.mark.parametrize("active", ["default", "b", "c", ["default", "b"], ["b", "c", "default"]],
                         ids=lambda a: "+".join(a) if isinstance(a, list) else a)
def test_set_adapter_gives_peft_logits(ours, theirs, ids, active):
    set_adapter(ours, active)
    # PeftModel.set_adapter takes one name; its LoraModel takes a list and sums them, as lora_torch does.
    theirs.base_model.set_adapter(active)
    assert active_adapters(ours) == ([active] if isinstance(active, str) else active)
    assert _max_err(_logits(ours, ids), _logits(theirs, ids)) < ATOL


def test_switching_changes_the_logits_and_disabling_gives_the_base(ours, theirs, ids, tiny_gpt2_dir):
    outputs = {}
    for name in ("default", "b", "c"):
        set_adapter(ours, name)
        outputs[name] = _logits(ours, ids)
    assert min(_max_err(outputs[x], outputs[y]) for x, y in (("default", "b"), ("b", "c"), ("default", "c"))) > 0.05
    with disable_adapters(ours):
        disabled = _logits(ours, ids)
    assert torch.equal(disabled, _logits(_base(tiny_gpt2_dir), ids))
    with theirs.disable_adapter():
        assert _max_err(disabled, _logits(theirs, ids)) < ATOL
    assert torch.equal(_logits(ours, ids), outputs["c"])  # the choice survives the block


def test_the_active_adapters_train_as_in_peft(ours, theirs):
    for active in ("b", ["default", "c"]):
        set_adapter(ours, active)
        theirs.base_model.set_adapter(active)
        trains_theirs = sorted({(n.split(".lora_")[0].removeprefix("base_model.model."), n.split(".")[-2])
                                for n, p in theirs.named_parameters() if p.requires_grad})
        trains_ours = sorted((module, name) for module, wrapper in lora_wrappers(ours).items()
                             for name, layer in wrapper.adapters.items() if layer.lora_A.requires_grad)
        assert trains_ours == trains_theirs
    set_adapter(ours, "b", inference_mode=True)
    assert not any(p.requires_grad for w in lora_wrappers(ours).values() for p in w.parameters())


def test_an_added_adapter_waits_for_set_adapter(tiny_gpt2_dir):
    model = inject_lora(_base(tiny_gpt2_dir), ["c_attn"], rank=2, verbose=False)
    add_adapter(model, "b", ["c_fc"], rank=2, verbose=False)
    c_fc = lora_wrappers(model)["transformer.h.0.mlp.c_fc"]
    assert c_fc.active_adapters == ["default"] and not c_fc.adapters["b"].lora_A.requires_grad
    assert lora_wrappers(model)["transformer.h.0.attn.c_attn"].lora.lora_A.requires_grad


def test_delete_adapter_changes_nothing_else_bit_for_bit(ours, ids, snapshot):
    set_adapter(ours, ["default", "c"])
    before = snapshot(ours)
    c_fc_base = lora_wrappers(ours)["transformer.h.0.mlp.c_fc"].base_layer
    attn_proj_base = lora_wrappers(ours)["transformer.h.0.attn.c_proj"].base_layer  # only "b" adapts it
    delete_adapter(ours, "b")
    after = ours.state_dict()
    kept = {k: v for k, v in before.items() if ".lora_adapters.b." not in k}
    key = "transformer.h.0.attn.c_proj"
    kept = {k.replace(f"{key}.base_layer.", f"{key}.").replace(f"{key.replace('0', '1')}.base_layer.",
                                                               f"{key.replace('0', '1')}."): v for k, v in kept.items()}
    assert sorted(after) == sorted(kept)
    assert all(torch.equal(after[k], kept[k]) for k in kept)
    assert ours.get_submodule(key) is attn_proj_base  # a module left without adapters gets its base back
    assert lora_wrappers(ours)["transformer.h.0.mlp.c_fc"].base_layer is c_fc_base
    assert list_adapters(ours) == ["default", "c"] and active_adapters(ours) == ["default", "c"]


def test_deleting_the_active_adapter_activates_the_first_remaining_one(ours, caplog):
    set_adapter(ours, "c")
    delete_adapter(ours, "c")
    assert active_adapters(ours) == ["b"]  # PEFT's rule: the first of the remaining names, sorted
    assert "'c' was the active adapter; 'b' is active now" in caplog.text
    delete_adapter(ours, "b")
    delete_adapter(ours, "default")
    assert lora_wrappers(ours) == {} and list_adapters(ours) == []


# -- bad input: a clear error, and nothing changes -------------------------------------------------------------


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda m: set_adapter(m, "nope"), ValueError, r"set_adapter: no adapter named 'nope' in the model; its adapters "
                                                   r"are \['default', 'b', 'c'\]"),
    (lambda m: set_adapter(m, ["b", "b"]), ValueError, r"\['b'\] named more than once"),
    (lambda m: set_adapter(m, []), ValueError, "disable_adapters"),
    (lambda m: delete_adapter(m, "nope"), ValueError, "delete_adapter: no adapter named 'nope'"),
    (lambda m: add_adapter(m, "b", ["c_attn"], verbose=False), ValueError,
     r"already has an adapter named 'b' \(adapters: \['default', 'b', 'c'\]\); choose a new name"),
    (lambda m: add_adapter(m, "d", ["q_proj"], verbose=False), ValueError, r"target_modules=\['q_proj'\].*matched no "
                                                                           r"module of GPT2LMHeadModel"),
    (lambda m: add_adapter(m, "d", ["c_attn"], use_dora=True, verbose=False), ValueError,
     r"targets modules that carry plain LoRA adapters.*use use_dora=False"),
    (lambda m: add_adapter(m, "v1.2", ["c_attn"], verbose=False), ValueError, "holds a '.'"),
    (lambda m: add_adapter(m, "__base__", ["c_attn"], verbose=False), ValueError, '"__base__" is reserved'),
    (lambda m: add_adapter(m, "train", ["c_attn"], verbose=False), ValueError, "torch.nn.ModuleDict attribute.*'train_adapter'"),
    (lambda m: add_adapter(m, "d", ["c_attn", "attn"], verbose=False), TypeError, "unsupported type"),
    (lambda m: merge_lora_weights(m, adapter_names=["nope"]), ValueError, r"no adapter named \['nope'\]"),
    (lambda m: inject_lora(m, ["c_attn"], verbose=False), ValueError, r"add a second named adapter with add_adapter"),
])
def test_bad_calls_change_nothing(ours, call, error, message, snapshot, assert_same_state):
    before, adapters, active = snapshot(ours), list_adapters(ours), active_adapters(ours)
    grads = [p.requires_grad for p in ours.parameters()]
    with pytest.raises(error, match=message):
        call(ours)
    assert_same_state(ours, before)
    assert (list_adapters(ours), active_adapters(ours)) == (adapters, active)
    assert [p.requires_grad for p in ours.parameters()] == grads


# -- merge and unmerge per adapter ---------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [["b"], ["default", "c"]], ids=["b", "default+c"])
def test_merging_chosen_adapters_gives_peft_merged_weights(ours, theirs, ids, names, snapshot, assert_same_state):
    before = snapshot(ours)
    set_adapter(ours, names)
    unmerged = _logits(ours, ids)
    set_adapter(ours, "default")  # merging names adapters explicitly, whatever is active
    merge_lora_weights(ours, adapter_names=names)
    assert lora_wrappers(ours) == {}
    assert _max_err(_logits(ours, ids), unmerged) < ATOL
    merged_theirs = copy.deepcopy(theirs).merge_and_unload(adapter_names=names)  # consumes its model
    ours_state, theirs_state = ours.state_dict(), merged_theirs.state_dict()
    assert sorted(ours_state) == sorted(theirs_state)
    assert max(_max_err(ours_state[k], theirs_state[k]) for k in ours_state) < 1e-6
    unmerge_lora_weights(ours)
    assert_same_state(ours, before)  # every adapter back, bit for bit
    assert list_adapters(ours) == ["default", "b", "c"]


# -- the multi-adapter directory, both ways ------------------------------------------------------------------------


def test_our_save_has_peft_layout(saved_three):
    assert sorted(p.name for p in saved_three.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "b",
                                                            "c"]
    assert sorted(p.name for p in (saved_three / "b").iterdir()) == ["adapter_config.json",
                                                                    "adapter_model.safetensors"]
    b = load_file(saved_three / "b" / "adapter_model.safetensors")
    assert b["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 32)
    assert not any("mlp" in key for key in b)


def test_peft_save_of_several_adapters_loads_all(theirs, tiny_gpt2_dir, tmp_path, ids):
    theirs.save_pretrained(tmp_path)
    model = load_adapter(_base(tiny_gpt2_dir), tmp_path)
    assert list_adapters(model) == ["default", "b", "c"] and active_adapters(model) == ["default"]
    for name in ("default", "b", "c"):
        set_adapter(model, name)
        theirs.base_model.set_adapter(name)
        assert _max_err(_logits(model, ids), _logits(theirs, ids)) < ATOL


def test_selected_adapters_and_adapter_name(ours, tiny_gpt2_dir, tmp_path, ids):
    save_adapter(ours, tmp_path / "only_b", selected_adapters=["b"])
    assert [p.name for p in (tmp_path / "only_b").iterdir()] == ["b"]  # PEFT's layout: not default, so a subdirectory
    alone = load_adapter(_base(tiny_gpt2_dir), tmp_path / "only_b")
    assert list_adapters(alone) == ["b"] and active_adapters(alone) == ["b"]  # a model's first adapter is active
    renamed = load_adapter(_base(tiny_gpt2_dir), tmp_path / "only_b" / "b", adapter_name="task")
    set_adapter(ours, "b")
    assert torch.equal(_logits(renamed, ids), _logits(ours, ids))
    assert list_adapters(renamed) == ["task"]


def test_loading_into_a_model_with_the_adapters_overwrites_them(ours, saved_three, tiny_gpt2_dir, snapshot,
                                                                assert_same_state):
    before = snapshot(ours)
    _randomize(ours, seed=11)
    load_adapter(ours, saved_three)
    assert_same_state(ours, before)


def test_a_bad_adapter_in_a_multi_directory_loads_none(saved_three, tiny_gpt2_dir, tmp_path, snapshot,
                                                       assert_same_state):
    broken = tmp_path / "broken"
    shutil.copytree(saved_three, broken)
    (broken / "c" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    model = _base(tiny_gpt2_dir)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"c/adapter_model.safetensors.*truncated or corrupt"):
        load_adapter(model, broken)
    assert_same_state(model, before)
    assert lora_wrappers(model) == {}


def test_a_second_adapter_must_fit_the_base_model(ours, alt_gpt2_dir, saved_three, snapshot, assert_same_state):
    model = inject_lora(_base(alt_gpt2_dir), ["c_attn"], rank=2, verbose=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"does not (fit|match)"):
        load_adapter(model, saved_three / "b", adapter_name="b")
    assert_same_state(model, before)
    assert list_adapters(model) == ["default"]


# -- other pieces with several adapters ----------------------------------------------------------------------------


def test_flat_file_and_loraplus_see_every_adapter(ours, tmp_path):
    saved = save_lora_weights(ours, tmp_path / "all.safetensors")
    assert "transformer.h.0.attn.c_attn.lora_adapters.b.lora_A" in saved
    assert len(saved) == 2 * sum(len(w.adapters) for w in lora_wrappers(ours).values())
    _randomize(ours, seed=9)
    load_lora_weights(ours, tmp_path / "all.safetensors")
    assert torch.equal(lora_wrappers(ours)["transformer.h.0.attn.c_attn"].adapters["b"].lora_B,
                       saved["transformer.h.0.attn.c_attn.lora_adapters.b.lora_B"])
    set_adapter(ours, ["default", "b", "c"])
    groups = create_loraplus_param_groups(freeze_base_model(ours), lr=1e-3, ratio=16.0)
    assert {len(g["names"]) for g in groups} == {len(saved) // 2}  # every adapter's A, and every B


def test_adapter_layers_and_build_config_per_adapter(ours):
    assert {name: layer.rank for name, layer in adapter_layers(ours, "c").items()} == {
        f"transformer.h.{i}.mlp.{m}": 1 for i in (0, 1) for m in ("c_fc", "c_proj")}
    set_adapter(ours, ["default", "b"])
    with pytest.raises(ValueError, match=r"2 adapters are active \(\['default', 'b'\]\); name the adapter"):
        adapter_layers(ours)


def test_dora_modules_hold_several_dora_adapters_one_active_at_a_time():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    inject_lora(model, ["0"], rank=2, use_dora=True, init_lora_weights=False, verbose=False)
    add_adapter(model, "other", ["0"], rank=1, use_dora=True, init_lora_weights=False, verbose=False)
    wrapper = model[0]
    assert isinstance(wrapper, LinearWithDoRA)
    assert torch.allclose(wrapper.adapters["other"].magnitude, wrapper.adapters["other"].weight_norm(
        wrapper.base_kernel()))  # m starts at ||W0 + s A B||
    x = torch.randn(3, 6)
    first = model(x)
    set_adapter(model, "other")
    second = model(x)
    assert not torch.allclose(first, second)
    with pytest.raises(ValueError, match=r"DoRA adapters cannot be active together \(\['default', 'other'\]\)"):
        set_adapter(model, ["default", "other"])
    assert active_adapters(model) == ["other"]
    expected = second.detach()
    merge_lora_weights(model)
    assert torch.allclose(model(x), expected, atol=1e-6)
