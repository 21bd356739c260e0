"""KV-cache generation: greedy parity with transformers, cache consistency, sampling rules."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from lora_jax.gpt2.generation import generate, top_k_logits
from lora_jax.gpt2.loading import load_gpt2
from lora_jax.gpt2.model import GPT2, init_cache

NEW = 12


def _prompts(vocab_size: int) -> np.ndarray:
    return np.random.default_rng(7).integers(1, vocab_size, (4, 5))


@pytest.fixture(scope="module")
def tiny(tiny_gpt2_dir):
    config, params = load_gpt2(tiny_gpt2_dir)
    return GPT2(config), params


def _forward(model, params, ids, **kwargs):
    # jit once per shape: op-by-op dispatch of an unjitted apply costs seconds on CI cores.
    return jax.jit(model.apply)({"params": params}, ids, **kwargs)


@pytest.mark.parametrize(("fixture", "eos"), [("tiny_gpt2_dir", 0), ("alt_gpt2_dir", None)])
def test_greedy_ids_equal_transformers_generate(fixture, eos, request):
    model_dir = request.getfixturevalue(fixture)
    config, params = load_gpt2(model_dir)
    prompts = _prompts(config.vocab_size)
    with jax.default_matmul_precision("highest"):
        ours = generate(GPT2(config), params, prompts, max_new_tokens=NEW, eos_token_id=eos)
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    torch_prompts = torch.as_tensor(prompts)
    with torch.no_grad():
        # eos=None: plain greedy for NEW tokens; eos=0: HF stops rows at EOS and pads them with it.
        theirs = hf.generate(
            torch_prompts,
            attention_mask=torch.ones_like(torch_prompts),
            do_sample=False,
            max_new_tokens=NEW,
            eos_token_id=eos,
            pad_token_id=0,
        ).numpy()
    theirs = np.pad(theirs, ((0, 0), (0, ours.shape[1] - theirs.shape[1])), constant_values=0)
    np.testing.assert_array_equal(np.asarray(ours), theirs)


def test_one_token_at_a_time_cache_logits_equal_full_forward(tiny):
    model, params = tiny
    ids = jnp.asarray(_prompts(101)[:2, :5].repeat(2, axis=1))  # (2, 10)
    with jax.default_matmul_precision("highest"):
        full = _forward(model, params, ids)
        cache, stepped = init_cache(model.config, 2, 10), []
        step = jax.jit(model.apply)
        for i in range(ids.shape[1]):
            logits, cache = step({"params": params}, ids[:, i : i + 1], cache=cache)
            stepped.append(logits)
    # fp32, same weights; attention over a length-1 query vs a causal mask only reorders sums: 1e-5.
    np.testing.assert_allclose(jnp.concatenate(stepped, axis=1), full, atol=1e-5, rtol=0)


def test_greedy_tokens_are_the_argmax_of_the_uncached_forward(tiny):
    model, params = tiny
    prompts = _prompts(101)
    with jax.default_matmul_precision("highest"):
        out = generate(model, params, prompts, max_new_tokens=NEW)
        logits = _forward(model, params, out)
    t = prompts.shape[1]
    np.testing.assert_array_equal(out[:, :t], prompts)
    np.testing.assert_array_equal(out[:, t:], jnp.argmax(logits[:, t - 1 : -1], axis=-1))


def test_sampling_respects_top_k_and_is_reproducible(tiny):
    model, params = tiny
    prompts = _prompts(101)
    key = jax.random.key(3)
    out = generate(model, params, prompts, max_new_tokens=NEW, temperature=1.5, top_k=3, key=key)
    again = generate(model, params, prompts, max_new_tokens=NEW, temperature=1.5, top_k=3, key=key)
    np.testing.assert_array_equal(out, again)
    other = generate(model, params, prompts, max_new_tokens=NEW, temperature=1.5, top_k=3, key=jax.random.key(4))
    assert (np.asarray(out) != np.asarray(other)).any()
    logits = _forward(model, params, out)[:, prompts.shape[1] - 1 : -1]  # (B, NEW, V)
    ranks = (logits > jnp.take_along_axis(logits, out[:, prompts.shape[1] :, None], axis=-1)).sum(-1)
    assert int(ranks.max()) <= 2  # every sampled token is among the 3 most likely


def test_top_k_of_one_is_greedy(tiny):
    model, params = tiny
    prompts = _prompts(101)
    # Same shapes as the other tests so the compiled programs are reused.
    with jax.default_matmul_precision("highest"):
        greedy = generate(model, params, prompts, max_new_tokens=NEW)
    sampled = generate(model, params, prompts, max_new_tokens=NEW, temperature=0.8, top_k=1, key=jax.random.key(0))
    np.testing.assert_array_equal(greedy, sampled)


def test_top_k_logits_keeps_ties_and_masks_the_rest():
    masked = top_k_logits(jnp.array([[0.5, 2.0, 2.0, -1.0]]), 2)
    assert masked.tolist() == [[-np.inf, 2.0, 2.0, -np.inf]]


@pytest.mark.parametrize(
    ("prompt", "kwargs", "message"),
    [
        (np.zeros((5,), np.int32), {}, "batch, time"),
        (np.zeros((1, 0), np.int32), {}, "non-empty"),
        (np.zeros((1, 60), np.int32), {}, "exceeds n_positions=64"),
        (np.full((1, 3), 101, np.int32), {}, r"lie in \[0, vocab_size=101\)"),
        (np.zeros((1, 3), np.int32), {"temperature": 1.0}, "needs a PRNG key"),
        (np.zeros((1, 3), np.int32), {"temperature": -1.0}, "temperature must be >= 0"),
        (np.zeros((1, 3), np.int32), {"top_k": 0}, "top_k must be"),
        (np.zeros((1, 3), np.int32), {"eos_token_id": 101}, "eos_token_id"),
    ],
)
def test_bad_arguments_raise_before_tracing(tiny, prompt, kwargs, message):
    model, params = tiny
    with pytest.raises(ValueError, match=message):
        generate(model, params, prompt, max_new_tokens=5, **kwargs)


def test_zero_new_tokens_returns_the_prompt(tiny):
    model, params = tiny
    out = generate(model, params, np.array([[4, 5, 6]]), max_new_tokens=0)
    assert out.tolist() == [[4, 5, 6]]


def test_apply_fn_decodes_through_unmerged_lora_like_the_merged_model(tiny):
    from lora_jax import LoraConfig, init_lora, lora_apply, merge

    model, params = tiny
    config = LoraConfig(rank=2, alpha=4.0, target_modules=["c_attn", "mlp.c_fc"])
    lora = init_lora(params, config, jax.random.key(1))
    # Non-zero B (a fresh adapter has B = 0 and would prove nothing); large enough to change tokens.
    lora = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(jax.random.key(7), x.shape) if "lora_B" in str(path[-1]) else x, lora
    )
    lora_forward = lora_apply(model.apply)

    def apply_fn(both, ids, cache):
        return lora_forward(both[0], both[1], ids, cache=cache)

    prompts = _prompts(101)
    with jax.default_matmul_precision("highest"):
        unmerged = generate(model, (params, lora), prompts, max_new_tokens=NEW, apply_fn=apply_fn)
        merged = generate(model, merge(params, lora), prompts, max_new_tokens=NEW)
        base = generate(model, params, prompts, max_new_tokens=NEW)
    np.testing.assert_array_equal(unmerged, merged)
    assert (np.asarray(unmerged) != np.asarray(base)).any()
