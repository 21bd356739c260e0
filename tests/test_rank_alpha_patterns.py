"""rank_pattern and alpha_pattern in both halves, proven against PEFT 0.21 itself on a tiny GPT-2.

Both halves take the matching rule from ``lora_format.patterns``; a rule shared by both halves would
pass any half-vs-half check even if it were wrong, so every check here compares with PEFT: the ranks
and scalings ``peft.get_peft_model`` creates, the logits of ``peft.PeftModel``, and the weights of
``merge_and_unload``. Adapters cross in all four directions (PEFT -> lora_jax, PEFT -> lora_torch,
lora_jax -> PEFT, lora_torch -> PEFT), each with a non-zero B.

Numerics: float32 everywhere, ``jax.default_matmul_precision("highest")`` (XLA on CPU may otherwise
use lower-precision passes on accelerators), TF32 off in torch (it only exists on GPU). Observed
logit differences are at most 7.6e-7 on logits of order 1, from summation order (PEFT runs
``lora_B(lora_A(x))`` as two Linear layers, lora_jax ``(x A) B`` in one jitted program); 1e-5 leaves
10x headroom, while a module at the wrong rank cannot load and ignoring alpha_pattern (alpha 8 for
3 on ``mlp.c_proj``) moves the logits by 0.22.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from transformers import GPT2LMHeadModel

import lora_jax
import lora_torch
from lora_format.patterns import module_rank_alpha, module_scaling
from lora_jax.gpt2.loading import load_gpt2
from lora_jax.gpt2.model import GPT2
from lora_jax.targets import dotted_name
from tests.lora_jax.encoder_model import with_random_b

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TARGETS = ["c_attn", "c_proj", "c_fc"]
RANK, ALPHA = 4, 8
RANK_PATTERN = {"h.0.attn.c_attn": 2, "c_fc": 6}
ALPHA_PATTERN = {"mlp.c_proj": 3}
# (rank, alpha) of each adapted module, worked out by hand from PEFT's rule: the first key that
# matches the whole name or a tail after a dot. h.0.attn.c_attn matches one module; c_fc both
# c_fc; mlp.c_proj both MLP projections and not attn.c_proj.
EXPECTED = {
    "transformer.h.0.attn.c_attn": (2, 8.0), "transformer.h.0.attn.c_proj": (4, 8.0),
    "transformer.h.0.mlp.c_fc": (6, 8.0), "transformer.h.0.mlp.c_proj": (4, 3.0),
    "transformer.h.1.attn.c_attn": (4, 8.0), "transformer.h.1.attn.c_proj": (4, 8.0),
    "transformer.h.1.mlp.c_fc": (6, 8.0), "transformer.h.1.mlp.c_proj": (4, 3.0),
}
IDS = np.array([[5, 17, 99, 3, 42, 0, 7, 64], [1, 2, 3, 4, 5, 6, 7, 8]])
LOGITS_ATOL = 1e-5  # see the module docstring
# Merged kernels are W0 + s A B with |W| < 1: each side rounds one sum of at most 6 products and one add.
# Observed bit-identical on CPU; 1e-6 (~10 ulps at |W| ~ 1) allows another summation order (another BLAS,
# a GPU), and is far below a wrong scaling's change of more than 1e-2.
MERGE_ATOL = 1e-6


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    config, params = load_gpt2(tiny_gpt2_dir)
    return GPT2(config), params


def base_model(model_dir) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.numpy()


def jax_logits(gpt2, adapter) -> np.ndarray:
    model, params = gpt2
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(lora_jax.lora_apply(model.apply))(params, adapter, jnp.asarray(IDS)))


def peft_modules(model) -> dict[str, tuple[int, float, float]]:
    """``{name: (r, lora_alpha, scaling)}`` of every LoRA layer PEFT built."""
    return {name.removeprefix("base_model.model."): (m.r["default"], float(m.lora_alpha["default"]),
                                                     m.scaling["default"])
            for name, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def jax_modules(adapter) -> dict[str, tuple[int, float, float]]:
    return {dotted_name(p): (adapter.rank(p), adapter.config.module_alpha(dotted_name(p)), adapter.scaling(p))
            for p in adapter.modules()}


def torch_modules(model) -> dict[str, tuple[int, float, float]]:
    wrappers = lora_torch.lora_wrappers(model)
    return {name: (w.lora.rank, w.lora.lora_alpha, w.lora.scaling) for name, w in wrappers.items()}


def expected_modules(use_rslora: bool) -> dict[str, tuple[int, float, float]]:
    return {name: (r, a, module_scaling(r, a, use_rslora)) for name, (r, a) in EXPECTED.items()}


def max_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module", params=[False, True], ids=["alpha_over_r", "rslora"])
def use_rslora(request) -> bool:
    return request.param


@pytest.fixture(scope="module")
def peft_saved(tiny_gpt2_dir, tmp_path_factory, use_rslora):
    """A PEFT model with the patterns, B drawn non-zero, saved with ``save_pretrained``."""
    torch.manual_seed(11)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, rank_pattern=RANK_PATTERN,
                             alpha_pattern=ALPHA_PATTERN, use_rslora=use_rslora, fan_in_fan_out=True, lora_dropout=0.0)
    model = peft.get_peft_model(base_model(tiny_gpt2_dir), config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)  # PEFT starts B at zero; with B = 0 nothing would be tested
    directory = tmp_path_factory.mktemp("peft_saved")
    model.save_pretrained(directory)
    return directory, model


def test_the_shared_rule_gives_the_ranks_peft_creates(peft_saved, use_rslora):
    _, model = peft_saved
    assert peft_modules(model) == expected_modules(use_rslora)
    assert {name: module_rank_alpha(name, RANK, ALPHA, tuple(RANK_PATTERN.items()), tuple(ALPHA_PATTERN.items()))
            for name in EXPECTED} == EXPECTED


def test_peft_saved_loads_in_lora_jax(gpt2, peft_saved, use_rslora, tiny_gpt2_dir):
    directory, model = peft_saved
    adapter = lora_jax.load_adapter(directory, gpt2[1])
    assert jax_modules(adapter) == peft_modules(model)
    ours, theirs = jax_logits(gpt2, adapter), torch_logits(model)
    assert max_error(ours, torch_logits(base_model(tiny_gpt2_dir))) > 1e-2  # the adapter acts
    np.testing.assert_allclose(ours, theirs, atol=LOGITS_ATOL, rtol=0)


def test_peft_saved_loads_in_lora_torch(peft_saved, tiny_gpt2_dir):
    directory, model = peft_saved
    ours = lora_torch.load_adapter(base_model(tiny_gpt2_dir), directory)
    assert torch_modules(ours) == peft_modules(model)
    np.testing.assert_allclose(torch_logits(ours), torch_logits(model), atol=LOGITS_ATOL, rtol=0)


def test_lora_jax_saved_loads_in_peft(gpt2, tiny_gpt2_dir, tmp_path, use_rslora):
    config = lora_jax.LoraConfig(rank=RANK, alpha=ALPHA, target_modules=TARGETS, rank_pattern=RANK_PATTERN,
                                 alpha_pattern=ALPHA_PATTERN, use_rslora=use_rslora)
    adapter = with_random_b(lora_jax.init_lora(gpt2[1], config, jax.random.key(3)), scale=0.3)
    assert jax_modules(adapter) == expected_modules(use_rslora)
    lora_jax.save_adapter(tmp_path, adapter)
    theirs = peft.PeftModel.from_pretrained(base_model(tiny_gpt2_dir), tmp_path).eval()
    assert peft_modules(theirs) == expected_modules(use_rslora)
    np.testing.assert_allclose(torch_logits(theirs), jax_logits(gpt2, adapter), atol=LOGITS_ATOL, rtol=0)


def test_lora_torch_saved_loads_in_peft(tiny_gpt2_dir, tmp_path, use_rslora):
    torch.manual_seed(4)
    ours = lora_torch.inject_lora(base_model(tiny_gpt2_dir), TARGETS, RANK, ALPHA, use_rslora=use_rslora,
                                  rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN, verbose=False)
    with torch.no_grad():
        for wrapper in lora_torch.lora_wrappers(ours).values():
            wrapper.lora.lora_B.normal_(0.0, 0.3)
    assert torch_modules(ours) == expected_modules(use_rslora)
    lora_torch.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base_model(tiny_gpt2_dir), tmp_path).eval()
    assert peft_modules(theirs) == expected_modules(use_rslora)
    np.testing.assert_allclose(torch_logits(theirs), torch_logits(ours), atol=LOGITS_ATOL, rtol=0)


def merged_kernels(gpt2, peft_saved, tiny_gpt2_dir) -> dict[str, dict[str, np.ndarray]]:
    """The adapted modules' merged (in, out) kernels from PEFT, lora_jax and lora_torch."""
    directory, _ = peft_saved
    peft_model = peft.PeftModel.from_pretrained(base_model(tiny_gpt2_dir), directory)
    peft_state = peft_model.merge_and_unload().state_dict()
    with jax.default_matmul_precision("highest"):
        jax_params = lora_jax.merge(gpt2[1], lora_jax.load_adapter(directory, gpt2[1]))
    torch_model = lora_torch.merge_lora_weights(lora_torch.load_adapter(base_model(tiny_gpt2_dir), directory))
    torch_state = torch_model.state_dict()
    kernels: dict[str, dict[str, np.ndarray]] = {"peft": {}, "lora_jax": {}, "lora_torch": {}}
    for name in EXPECTED:  # GPT-2's Conv1D weight is (in, out), as the Flax kernel
        kernels["peft"][name] = peft_state[f"{name}.weight"].numpy()
        kernels["lora_torch"][name] = torch_state[f"{name}.weight"].detach().numpy()
        node = jax_params
        for key in name.split("."):
            node = node[key]
        kernels["lora_jax"][name] = np.asarray(node["kernel"])
    return kernels


def test_merge_in_both_halves_equals_peft_merge_and_unload(gpt2, peft_saved, tiny_gpt2_dir):
    kernels = merged_kernels(gpt2, peft_saved, tiny_gpt2_dir)
    base = base_model(tiny_gpt2_dir).state_dict()
    for name in EXPECTED:
        assert max_error(kernels["peft"][name], base[f"{name}.weight"].numpy()) > 1e-2  # the merge changed W
        np.testing.assert_allclose(kernels["lora_jax"][name], kernels["peft"][name], atol=MERGE_ATOL, rtol=0)
        np.testing.assert_allclose(kernels["lora_torch"][name], kernels["peft"][name], atol=MERGE_ATOL, rtol=0)


def test_parity_accepts_the_peft_adapter_and_injects_peft_ranks(gpt2, peft_saved, tiny_gpt2_dir):
    from parity.checkpoint import read_gpt2_config
    from parity.implementations import inject_torch
    from parity.validation import check_adapter, gpt2_skeleton

    directory, model = peft_saved
    # Before: "says r=4 but its tensors have rank [2, 4, 6]" (exit 2); now each module is held to its own rank.
    assert check_adapter(directory, read_gpt2_config(tiny_gpt2_dir), gpt2_skeleton(tiny_gpt2_dir)) is None
    injected = inject_torch(base_model(tiny_gpt2_dir), lora_jax.load_adapter(directory, gpt2[1]).config)
    assert torch_modules(injected) == peft_modules(model)
