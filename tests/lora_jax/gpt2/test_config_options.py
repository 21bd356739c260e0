"""Every transformers ``GPT2Config`` option that changes the math, through the real loading path.

Each test writes a small ``GPT2LMHeadModel`` built from ``transformers.GPT2Config(...)`` with
``save_pretrained``, loads it with ``lora_jax.load_gpt2`` and compares against transformers.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gpt2_fixtures import save_gpt2 as save_hf_gpt2
from transformers import GPT2LMHeadModel
from transformers.activations import ACT2CLS, ACT2FN

from lora_jax.gpt2.generation import generate
from lora_jax.gpt2.loading import load_gpt2, save_gpt2
from lora_jax.gpt2.activations import ACTIVATIONS
from lora_jax.gpt2.model import GPT2, GPT2Config, init_cache

torch.backends.cuda.matmul.allow_tf32 = False

# 3 layers so that scale_attn_by_inverse_layer_idx divides by 1, 2 and 3; 2 heads of 16.
# initializer_range 0.1 (GPT-2 uses 0.02) puts MLP pre-activations at |x| ~ 1-3, where the
# activations differ from each other (erf-GELU and tanh-GELU differ by up to 5e-4 there, not at
# |x| ~ 0.1), while logits stay below ~3 so fp32 rounding stays near 1e-6.
SHAPE = dict(n_embd=32, n_layer=3, n_head=2, vocab_size=97, n_positions=32, initializer_range=0.1)
# Same fp32 function on both sides; only kernels and summation order differ. Measured gaps are
# 0.5-1.1e-6 on every option (docs/gpt2_flax.md); 1e-5 leaves room for other BLAS builds, and the
# smallest real difference between two options tested here (erf vs tanh GELU) is 5.0e-4.
ATOL = 1e-5
# The defaults of every option, to show that each test would notice the option being ignored.
GPT2_DEFAULTS = dict(
    n_inner=None, activation_function="gelu_new", scale_attn_weights=True,
    scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, layer_norm_epsilon=1e-5,
)
COMBINED = dict(
    n_inner=80, activation_function="gelu", scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True,
    reorder_and_upcast_attn=True, layer_norm_epsilon=1e-6,
)

# Every activation is checked elementwise against ACT2FN below; these also run in a whole model
# (each model costs a compile, so one per family: erf-GELU, sigmoid-gated, piecewise, smooth, learned).
MODEL_ACTIVATIONS = ["gelu", "quick_gelu", "relu", "silu", "mish", "tanh", "prelu"]
OPTIONS = [
    *({"activation_function": name} for name in MODEL_ACTIVATIONS),
    {"n_inner": 48},
    {"n_inner": 20},  # narrower than n_embd
    {"scale_attn_weights": False},
    {"scale_attn_by_inverse_layer_idx": True},
    {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True},
    {"layer_norm_epsilon": 1e-6},
    {"layer_norm_epsilon": 1e-2},
    {"reorder_and_upcast_attn": True},
]
# Options for which the test also shows that ignoring the option would exceed ATOL.
CHECK_MOVED = [
    {"activation_function": "gelu"},  # erf vs tanh: the smallest gap, 5.0e-4
    {"scale_attn_weights": False},
    {"scale_attn_by_inverse_layer_idx": True},
    {"layer_norm_epsilon": 1e-6},
]


def _id(option: object) -> str | None:
    if not isinstance(option, dict):
        return None  # pytest's default id for the other parameters
    return ",".join(f"{key}={value}" for key, value in option.items())


def _ids(shape=(2, 32), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, SHAPE["vocab_size"], shape)


def _hf_logits(model_dir: Path, ids: np.ndarray, attn_implementation: str = "sdpa") -> np.ndarray:
    model = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()


def _flax_logits(config: GPT2Config, params, ids: np.ndarray) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(jax.jit(GPT2(config).apply)({"params": params}, jnp.asarray(ids)))


@pytest.fixture(scope="module")
def combined_dir(tmp_path_factory) -> Path:
    return save_hf_gpt2(tmp_path_factory.mktemp("combined"), seed=3, **SHAPE, **COMBINED)


def test_activation_table_covers_transformers_act2fn_except_xielu():
    # prelu is a module with a learned slope (tested in a model); xielu is refused (tested below).
    assert set(ACT2CLS) - set(ACTIVATIONS) == {"prelu", "xielu"}


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_matches_transformers_act2fn(name):
    x = np.linspace(-12.0, 12.0, 4801, dtype=np.float32)  # step 0.005, both tails and the kinks
    ours = np.asarray(jax.jit(ACTIVATIONS[name])(jnp.asarray(x)))
    with torch.no_grad():
        theirs = ACT2FN[name](torch.from_numpy(x)).numpy()
    # Different fp32 kernels for tanh/erf/exp: measured at most 5.8e-7 relative (mish 1.9e-6
    # absolute at |y| ~ 12). 2e-6 relative is a few ulps; erf vs tanh GELU differ by 4.7e-4.
    assert ours.dtype == np.float32
    assert (np.abs(ours - theirs) / np.maximum(np.abs(theirs), 1.0)).max() < 2e-6


@pytest.mark.parametrize("option", OPTIONS, ids=_id)
def test_fp32_logits_match_transformers(option, tmp_path):
    model_dir = save_hf_gpt2(tmp_path / "hf", seed=1, **SHAPE, **option)
    config, params = load_gpt2(model_dir)
    for key, value in option.items():
        assert getattr(config, key) == value
    ids = _ids()
    ours = _flax_logits(config, params, ids)
    # reorder_and_upcast_attn only acts in transformers' eager attention; check that path too.
    implementations = ("sdpa", "eager") if "reorder_and_upcast_attn" in option else ("sdpa",)
    theirs = {name: _hf_logits(model_dir, ids, name) for name in implementations}
    for name, logits in theirs.items():
        assert np.abs(ours - logits).max() < ATOL, name
    if option in CHECK_MOVED:
        # The check above is evidence only if ignoring the option would move the logits past ATOL.
        as_default = dataclasses.replace(config, **{key: GPT2_DEFAULTS[key] for key in option})
        assert np.abs(_flax_logits(as_default, params, ids) - theirs["sdpa"]).max() > 10 * ATOL


def test_combined_options_match_transformers(combined_dir):
    config, params = load_gpt2(combined_dir)
    assert dataclasses.asdict(config) == {**dataclasses.asdict(config), **COMBINED}
    ids = _ids(seed=4)
    ours = _flax_logits(config, params, ids)
    for implementation in ("sdpa", "eager"):
        assert np.abs(ours - _hf_logits(combined_dir, ids, implementation)).max() < ATOL


def test_greedy_generation_with_options_equals_transformers(combined_dir):
    # The KV-cache path builds its own attention call (explicit mask, cached keys): the scale
    # options must reach it too. 20 new tokens from 6-token prompts fill 26 of 32 positions;
    # no EOS on either side, so every row runs the full 20 steps.
    config, params = load_gpt2(combined_dir)
    prompts = np.random.default_rng(7).integers(1, config.vocab_size, (3, 6))
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(generate(GPT2(config), params, prompts, max_new_tokens=20))
    hf = GPT2LMHeadModel.from_pretrained(combined_dir).eval()
    prompt_tensor = torch.as_tensor(prompts)
    with torch.no_grad():
        theirs = hf.generate(
            prompt_tensor, attention_mask=torch.ones_like(prompt_tensor), do_sample=False,
            max_new_tokens=20, eos_token_id=None, pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_cached_logits_equal_full_forward_with_options(combined_dir):
    config, params = load_gpt2(combined_dir)
    ids = jnp.asarray(_ids((2, 12), seed=5))
    apply = jax.jit(GPT2(config).apply)
    with jax.default_matmul_precision("highest"):
        full = apply({"params": params}, ids)
        first, cache = apply({"params": params}, ids[:, :6], cache=init_cache(config, 2, 12))
        rest, _ = apply({"params": params}, ids[:, 6:], cache=cache)  # same shapes: one compile
    stepped = jnp.concatenate([first, rest], axis=1)
    assert float(jnp.abs(stepped - full).max()) < ATOL


def test_save_gpt2_writes_every_option_back(combined_dir, tmp_path):
    config, params = load_gpt2(combined_dir)
    out = save_gpt2(params, config, tmp_path / "saved")
    written = json.loads((out / "config.json").read_text())
    assert {key: written[key] for key in COMBINED} == COMBINED
    # transformers reads the same model back: same weights, same options, identical logits.
    ids = _ids(seed=6)
    for implementation in ("sdpa", "eager"):
        np.testing.assert_array_equal(
            _hf_logits(out, ids, implementation), _hf_logits(combined_dir, ids, implementation)
        )
    assert load_gpt2(out)[0] == config


def test_prelu_slope_round_trips_as_hf_key(tmp_path):
    model_dir = save_hf_gpt2(tmp_path / "hf", seed=2, **SHAPE, activation_function="prelu")
    config, params = load_gpt2(model_dir)
    slope = params["transformer"]["h"]["1"]["mlp"]["act"]["weight"]
    assert slope.shape == (1,) and float(slope[0]) == pytest.approx(0.25)  # torch's nn.PReLU init
    from safetensors.numpy import load_file

    tensors = load_file(str(save_gpt2(params, config, tmp_path / "out") / "model.safetensors"))
    assert tensors["transformer.h.1.mlp.act.weight"].tolist() == [0.25]


def test_defaults_match_transformers_gpt2config():
    from transformers import GPT2Config as HFConfig

    hf, ours = HFConfig(), GPT2Config()
    for field in dataclasses.fields(GPT2Config):
        assert getattr(ours, field.name) == getattr(hf, field.name), field.name


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"activation_function": "xielu"}, "activation_function 'xielu' is not implemented"),
        ({"add_cross_attention": True}, "add_cross_attention is true: this Flax GPT-2 has no cross-attention"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings is false"),
    ],
    ids=_id,
)
def test_unimplemented_options_raise_naming_the_field(option, message, tmp_path):
    model_dir = save_hf_gpt2(tmp_path / "hf", seed=1, **SHAPE, **option)
    with pytest.raises(ValueError, match=message):
        load_gpt2(model_dir)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"activation_function": "gelu_newer"}, "activation_function 'gelu_newer' is unknown; choose one of: gelu,"),
        ({"n_inner": 0}, "n_inner must be None"),
        ({"n_inner": 3.5}, "n_inner must be None"),
        ({"scale_attn_weights": "yes"}, "scale_attn_weights must be True or False"),
        ({"scale_attn_by_inverse_layer_idx": 1}, "scale_attn_by_inverse_layer_idx must be True or False"),
        ({"reorder_and_upcast_attn": None}, "reorder_and_upcast_attn must be True or False"),
    ],
    ids=_id,
)
def test_config_validates_new_fields_when_built(fields, message):
    with pytest.raises(ValueError, match=message):
        GPT2Config(n_embd=32, n_head=2, **fields)


def test_untied_checkpoint_without_head_is_refused(tmp_path):
    model_dir = save_hf_gpt2(tmp_path / "hf", seed=1, **SHAPE)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(ValueError, match="sets tie_word_embeddings false but stores no lm_head.weight"):
        load_gpt2(model_dir)


def test_fields_that_do_not_change_the_math_are_accepted():
    config = GPT2Config.from_hf({
        "model_type": "gpt2", "n_embd": 32, "n_head": 2, "resid_pdrop": 0.3, "summary_type": "mean",
        "initializer_range": 0.5, "use_cache": False, "_attn_implementation": "eager", "bos_token_id": 3,
    })
    assert config == GPT2Config(n_embd=32, n_head=2)
