"""Every check can fail: each test plants one realistic bug and asserts the matching row catches it.

A parity suite that passes a broken implementation is worthless, so each stage has a bug
it must catch: a wrong scale, a missing transpose, an untied head, a zero B, a moved Adam
eps, a skipped layer, a wrong alpha in a saved adapter. Bugs are planted by replacing one
function the pipeline calls (``pair.with_impl``) or by monkeypatching a method.

The variants' bugs (DoRA, LoRA+, rank_pattern) are planted where a comparison of the halves cannot
see them: in both halves at once, or in the rule they share (``lora_format``). Each must then fail a
row against ``peft`` itself, while the torch-vs-JAX rows still pass (asserted, to show why the PEFT
reference is needed).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import lora_format.patterns
import lora_jax.dora
import numpy as np
import optax
import torch
from lora_jax import lora_apply
from lora_jax.delta import lora_delta
from lora_jax.loraplus import loraplus_labels
from lora_torch import DoRALayer, create_loraplus_param_groups
from transformers import GPT2LMHeadModel

import parity.adapted
from parity import Implementations, SuiteSettings, load_pair, run_check, run_suite
from parity.implementations import inject_torch
from parity.optimizers import lr_schedule


def _row(result, name_part: str):
    matches = [row for row in result.rows if name_part in row.name]
    assert matches, f"no row named like {name_part!r} in {[row.name for row in result.rows]}"
    return matches[0]


def _untied_head_loader(model_dir):
    # The bug: the head is declared untied, so lm_head.weight (absent from the checkpoint, which
    # stores it once as wte) is freshly initialised instead of shared with wte.
    return GPT2LMHeadModel.from_pretrained(model_dir, tie_word_embeddings=False).eval()


def test_base_forward_catches_untied_lm_head(tiny_gpt2_dir, tiny_pair):
    assert _row(run_check(tiny_pair, "base_forward"), "logits").passed
    broken = load_pair(tiny_gpt2_dir, impl=Implementations(load_torch=_untied_head_loader))
    row = _row(run_check(broken, "base_forward"), "logits")
    assert not row.passed and row.max_rel > 0.1  # a random head: logits off by their own size


def _inject_skipping_last_layer(model, config):
    # The bug: an off-by-one layer range (range(n_layer - 1)) leaves the last block without LoRA.
    n_layer = len(model.transformer.h)
    return inject_torch(model, dataclasses.replace(config, layers_to_transform=tuple(range(n_layer - 1))))


def test_injection_catches_one_skipped_layer(tiny_pair):
    broken = tiny_pair.with_impl(torch_inject=_inject_skipping_last_layer)
    result = run_check(broken, "injection")
    names = _row(result, "module names [c_attn,c_proj]")
    count = _row(result, "trainable params [c_attn,c_proj]")
    assert not names.passed and names.detail.startswith("only in reference: transformer.h.1.attn.c_attn")
    # Layer 1's c_attn (32*4 + 4*96) + attn.c_proj (32*4 + 4*32) + mlp.c_proj (128*4 + 4*32).
    assert not count.passed and count.max_abs == 1408


def test_later_stages_fail_when_halves_target_different_modules(tiny_pair):
    broken = tiny_pair.with_impl(torch_inject=_inject_skipping_last_layer)
    report = run_suite(broken, SuiteSettings(checks=("forward_delta",)))
    assert not report.passed
    assert "LoRA modules differ between the halves" in report.rows[0].detail


def _inject_scaling_by_alpha(model, config):
    # The tutorial bug: multiply the branch by alpha instead of alpha / r.
    model = inject_torch(model, config)
    for wrapper in model.modules():
        if hasattr(wrapper, "lora") and hasattr(wrapper.lora, "scaling"):
            wrapper.lora.scaling = config.alpha
    return model


def _jax_lora_apply_scaling_by_alpha(apply_fn):
    # The same bug in the JAX half. The real lora_apply runs, but is handed an Adapter whose config
    # says alpha * (alpha / s): its scaling is then alpha (r = 4 here, so 4x the true alpha / r).
    # This is how such a bug looks with Adapter values: the wrong scale travels with a config.
    forward = lora_apply(apply_fn)

    def broken(params, adapter, *args, **kwargs):
        config = adapter.config
        wrong = dataclasses.replace(config, alpha=config.alpha * config.alpha / config.scaling)
        return forward(params, dataclasses.replace(adapter, config=wrong), *args, **kwargs)

    return broken


def test_forward_delta_catches_alpha_instead_of_alpha_over_r(tiny_pair):
    result = run_check(tiny_pair.with_impl(torch_inject=_inject_scaling_by_alpha), "forward_delta")
    delta = _row(result, "delta (lora - base) torch vs JAX [rsLoRA off")
    # rank 4: torch's branch is 4x JAX's, so the delta error exceeds the delta itself
    # (more than the linear 3x: later layers see the larger perturbation and amplify it).
    assert not delta.passed and delta.max_rel > 2.0


def test_forward_delta_catches_alpha_instead_of_alpha_over_r_in_jax(tiny_pair):
    result = run_check(tiny_pair.with_impl(jax_lora_apply=_jax_lora_apply_scaling_by_alpha), "forward_delta")
    delta = _row(result, "delta (lora - base) torch vs JAX [rsLoRA off")
    # Now JAX's branch is the 4x one and the error is measured against JAX's (larger) delta: 3/4 if linear,
    # 0.93 measured (the later layers amplify the larger perturbation, as above).
    assert not delta.passed and delta.max_rel > 0.5


def test_gradients_catch_alpha_instead_of_alpha_over_r(tiny_pair):
    result = run_check(tiny_pair.with_impl(torch_inject=_inject_scaling_by_alpha), "gradients")
    assert not _row(result, "dL/dA").passed
    assert not _row(result, "loss").passed


def test_gradients_catch_alpha_instead_of_alpha_over_r_in_jax(tiny_pair):
    result = run_check(tiny_pair.with_impl(jax_lora_apply=_jax_lora_apply_scaling_by_alpha), "gradients")
    assert not _row(result, "dL/dA").passed
    assert not _row(result, "loss").passed


def test_zero_b_is_caught_where_the_comparison_itself_would_pass(tiny_pair, monkeypatch):
    # The bug: the harness forgets to draw B, so both halves carry B = 0 (a fresh adapter).
    monkeypatch.setattr(parity.adapted, "random_nonzero_b", lambda adapter, seed, params=None: adapter)
    for stage in ("forward_delta", "gradients", "merge"):
        result = run_check(tiny_pair, stage)
        guard = _row(result, "LoRA B non-zero")
        assert not guard.passed and guard.max_abs == 6  # all 6 adapted modules have B == 0
    # Without the guard only rounding noise would be compared: torch's delta is exactly zero and JAX's is
    # float32 noise (XLA compiles the zero branch into the graph), so the delta row's verdict is chance.
    result = run_check(tiny_pair, "forward_delta")
    base = run_check(tiny_pair, "base_forward").arrays
    torch_delta = result.arrays["torch_lora_logits"] - base["torch_base_logits"]
    jax_delta = result.arrays["jax_lora_logits"] - base["jax_base_logits"]
    assert np.abs(torch_delta).max() == 0.0 and np.abs(jax_delta).max() < 1e-6


def _adamw_eps_inside_sqrt(settings):
    # The bug: eps moved under the square root (eps_root), as in some hand-written Adams.
    return optax.chain(
        optax.clip_by_global_norm(settings.max_grad_norm),
        optax.adamw(lr_schedule(settings), b1=settings.b1, b2=settings.b2, eps=0.0, eps_root=settings.eps,
                    weight_decay=settings.weight_decay))


def test_training_catches_adam_eps_placed_differently(tiny_pair):
    result = run_check(tiny_pair.with_impl(jax_optimizer=_adamw_eps_inside_sqrt), "training")
    update = _row(result, "final A, B minus start")
    # sqrt(v + 1e-8) damps every element with |g| below ~1e-3: the updates differ by their own size.
    assert not update.passed and update.max_rel > 0.2


def test_merge_catches_missing_transpose_in_linear_merge(tiny_pair, monkeypatch):
    from lora_torch import LinearWithLoRA

    # The bug: nn.Linear's (out, in) weight gets the (in, out) update untransposed.
    monkeypatch.setattr(LinearWithLoRA, "delta_weight", lambda self: self.lora.delta_kernel())
    settings = SuiteSettings(targets=("attn.c_proj",))  # square (32, 32): the bug runs silently
    result = run_check(tiny_pair, "merge", settings)
    assert _row(result, "merged weights torch (Conv1D)").passed
    linear_weights = _row(result, "merged weights torch (Linear)")
    assert not linear_weights.passed and linear_weights.max_rel > 0.1
    assert not _row(result, "torch (Linear) merged vs unmerged logits").passed


def test_merge_catches_missing_transpose_on_non_square_modules(tiny_pair, monkeypatch):
    from lora_torch import LinearWithLoRA

    monkeypatch.setattr(LinearWithLoRA, "delta_weight", lambda self: self.lora.delta_kernel())
    report = run_suite(tiny_pair, SuiteSettings(targets=("c_attn",), checks=("merge",)))
    # (96, 32) + (32, 96) cannot add: the stage fails with the error instead of crashing the run.
    assert [row.name for row in report.rows] == ["stage raised"]
    assert not report.passed and report.rows[0].detail.startswith("RuntimeError")


def _jax_save_writing_scaling_as_alpha(out_dir, adapter):
    # The bug: the adapter config records the scaling s = alpha / r where PEFT expects alpha. Planted
    # through the real save_adapter, as an Adapter whose config carries alpha = s (same arrays).
    from lora_jax import save_adapter

    config = adapter.config
    save_adapter(out_dir, dataclasses.replace(adapter, config=dataclasses.replace(config, alpha=config.scaling)))
    assert json.loads((Path(out_dir) / "adapter_config.json").read_text())["lora_alpha"] == config.scaling


def test_interchange_catches_wrong_alpha_in_saved_adapter(tiny_pair):
    result = run_check(tiny_pair.with_impl(jax_save_adapter=_jax_save_writing_scaling_as_alpha), "interchange")
    assert _row(result, "JAX-saved -> torch-loaded A, B").passed  # the tensors are right...
    assert not _row(result, "JAX-saved adapter: torch logits").passed  # ...the scale is not
    assert not _row(result, "peft.PeftModel").passed
    assert _row(result, "torch-saved adapter: JAX logits").passed  # the other direction is intact


def _fresh_lora_apply(apply_fn):
    # The real lora_apply under a new name: the pair compiles per jax_lora_apply, so a function traced
    # with a planted lora_jax.dora.weight_norm is a new entry, not the correct one compiled before.
    return lora_apply(apply_fn)


def _plant_dora_norm(monkeypatch, *, axis: int, detached: bool) -> None:
    """Plants one DoRA norm bug in BOTH halves: the norm over ``axis`` of the (in, out) kernel, maybe not detached."""

    def jax_norm(kernel, a, b, scaling):
        norm = jnp.linalg.norm(jnp.asarray(kernel, jnp.float32) + lora_delta(a, b, scaling), axis=axis)
        return jax.lax.stop_gradient(norm) if detached else norm

    def torch_norm(self, base_kernel):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detached):
            return torch.linalg.norm(base_kernel + self.delta_kernel(), dim=axis)

    monkeypatch.setattr(lora_jax.dora, "weight_norm", jax_norm)
    monkeypatch.setattr(DoRALayer, "weight_norm", torch_norm)


def test_dora_norm_not_detached_in_both_halves_is_caught_by_peft_gradients(tiny_pair, monkeypatch):
    _plant_dora_norm(monkeypatch, axis=0, detached=False)
    settings = SuiteSettings(use_dora=True)
    result = run_check(tiny_pair.with_impl(jax_lora_apply=_fresh_lora_apply), "gradients", settings)
    # Both halves differentiate through the norm alike: the halves agree (measured rel 7.5e-7)...
    assert _row(result, "dL/dA, dL/dB, dL/dm torch vs JAX").passed
    assert _row(result, "loss peft.PeftModel vs JAX").passed  # ...the forward is unchanged...
    reference = _row(result, "dL/dA, dL/dB, dL/dm peft.PeftModel vs JAX")
    # ...but PEFT detaches the norm (DoRA section 4.3): measured rel 1.15 (worst tensor), bound 1e-4.
    assert not reference.passed and reference.max_rel > 0.1


def test_dora_norm_over_input_features_in_both_halves_is_caught_by_peft_logits(tiny_pair, monkeypatch):
    _plant_dora_norm(monkeypatch, axis=1, detached=True)
    # attn.c_proj is square (32, 32): a norm per input feature has the right shape and runs silently.
    settings = SuiteSettings(use_dora=True, targets=("attn.c_proj",))
    result = run_check(tiny_pair.with_impl(jax_lora_apply=_fresh_lora_apply), "forward_delta", settings)
    assert _row(result, "DoRA m != ||W0 + sAB||").passed  # parity's own norm (per output) sees m perturbed
    assert _row(result, "LoRA logits torch vs JAX [rsLoRA off").passed
    assert _row(result, "delta (lora - base) torch vs JAX [rsLoRA off").passed
    logits = _row(result, "LoRA logits peft.PeftModel vs JAX [rsLoRA off")
    delta = _row(result, "delta (lora - base) peft.PeftModel vs JAX [rsLoRA off")
    # Measured: logits rel 4.8e-2 (bound 1e-5), delta rel 0.30 (bound 1e-4); the halves agree to 1.7e-6.
    assert not logits.passed and logits.max_rel > 1e-2
    assert not delta.passed and delta.max_rel > 0.1


def _loraplus_on_a_optax(settings):
    # The bug, as lora_jax.loraplus would have it with its two rates swapped: the fast rate goes to A.
    def adamw(peak):
        return optax.adamw(lr_schedule(settings, peak), b1=settings.b1, b2=settings.b2, eps=settings.eps,
                           eps_root=0.0, weight_decay=settings.weight_decay)

    fast, slow = settings.lr * settings.loraplus_ratio, settings.lr
    return optax.chain(optax.clip_by_global_norm(settings.max_grad_norm),
                       optax.partition({"A": adamw(fast), "B": adamw(slow)}, loraplus_labels))


def _loraplus_on_a_torch(model, settings):
    # The same swap in torch's groups (lora_torch.create_loraplus_param_groups, A and B rates exchanged).
    groups = create_loraplus_param_groups(model, settings.lr, settings.loraplus_ratio, settings.weight_decay)
    for group in groups:
        on_a = all(name.endswith("lora_A") for name in group["names"])
        group["lr"] = settings.lr * settings.loraplus_ratio if on_a else settings.lr
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(settings.b1, settings.b2), eps=settings.eps,
                             weight_decay=settings.weight_decay, foreach=False)


def test_loraplus_ratio_on_a_in_both_halves_is_caught_by_peft_training(tiny_pair):
    broken = tiny_pair.with_impl(jax_optimizer=_loraplus_on_a_optax, torch_optimizer=_loraplus_on_a_torch)
    result = run_check(broken, "training", SuiteSettings(loraplus_ratio=16.0))
    assert _row(result, "loss trajectory (10 AdamW steps, LoRA+ ratio 16)").passed
    assert _row(result, "final A, B minus start (worst tensor)").passed  # the halves agree (rel 1.6e-5)...
    update = _row(result, "final A, B minus start peft.PeftModel vs JAX")
    # ...PEFT steps B 16x faster than A, not A: measured rel 15.7 (bound 2e-2), and the loss rel 9.9e-3 (bound 1e-5).
    assert not update.passed and update.max_rel > 5.0
    assert not _row(result, "loss trajectory peft.PeftModel vs JAX").passed


def _substring_pattern_key(keys, name):
    # The bug: a rank_pattern key "matches" wherever it occurs in the name (the tutorial's substring
    # targeting), instead of PEFT's re.match(rf"(.*\.)?({key})$", name).
    return next((key for key in keys if key in name), None)


def test_rank_pattern_key_matched_as_substring_is_caught_by_peft(tiny_pair, monkeypatch):
    # "h.0.attn" ends at no module name, so PEFT gives it to no module: every module keeps r = 4.
    settings = SuiteSettings(rank_pattern={"h.0.attn": 2})
    label = "[c_attn,c_proj@rank_pattern=h.0.attn:2]"
    correct = run_check(tiny_pair, "injection", settings)
    assert _row(correct, f"rank, scaling, DoRA per module vs PEFT {label}").passed
    monkeypatch.setattr(lora_format.patterns, "pattern_key", _substring_pattern_key)  # the rule both halves share
    result = run_check(tiny_pair, "injection", settings)
    # Both halves now give h.0.attn.c_attn and h.0.attn.c_proj rank 2: they agree with each other...
    for name in ("module names", "trainable params", "modules with shape mismatch"):
        assert _row(result, f"{name} {label}").passed
    ranks = _row(result, f"rank, scaling, DoRA per module vs PEFT {label}")
    assert not ranks.passed and ranks.max_abs == 2  # ...not with PEFT
    assert ranks.detail.startswith("transformer.h.0.attn.c_attn: JAX (2, 4.0, False), PEFT (4, 2.0, False)")
    # h.0.attn.c_attn (32 + 96) * 2 fewer, h.0.attn.c_proj (32 + 32) * 2 fewer.
    assert _row(result, f"trainable params vs PEFT {label}").max_abs == 384
    delta = run_check(tiny_pair, "forward_delta", settings)
    assert _row(delta, "LoRA logits torch vs JAX [rsLoRA off").passed
    reference = _row(delta, "LoRA logits peft.PeftModel vs JAX [rsLoRA off")
    assert not reference.passed
    assert "PEFT builds lora_A with shape (4, 32), the adapter's is (2, 32)" in reference.detail


def test_every_stage_has_a_planted_bug():
    # Keeps this file honest when a stage is added.
    from parity import CHECKS

    covered = {"base_forward", "injection", "forward_delta", "gradients", "training", "merge", "interchange"}
    assert set(CHECKS) == covered


def _all_linear_with_head(linear_names, output_names):
    # The bug: all-linear keeps the output head (PEFT drops model.get_output_embeddings()).
    return tuple(sorted(set(linear_names)))


def test_all_linear_keeping_the_head_in_both_halves_is_caught(tiny_pair, monkeypatch):
    import lora_jax.targets
    import lora_torch.inject

    settings = SuiteSettings(targets="all-linear")
    assert all(row.passed for row in run_check(tiny_pair, "injection", settings).rows)
    monkeypatch.setattr(lora_torch.inject, "expand_all_linear", _all_linear_with_head)
    monkeypatch.setattr(lora_jax.targets, "expand_all_linear", _all_linear_with_head)
    result = run_check(tiny_pair, "injection", settings)
    # transformers' GPT-2 has an nn.Linear lm_head (tied to wte), which torch now adapts. The Flax GPT-2's head
    # is wte.attend, no Dense, so JAX (and the PEFT reference it is held to) stay right: the halves disagree.
    failed = [row.name for row in result.rows if not row.passed]
    assert failed == ["module names [all-linear]", "trainable params [all-linear]"], failed


def test_an_unscaled_embedding_branch_in_jax_is_caught_by_torch_and_peft(tiny_pair, monkeypatch):
    import lora_jax.forward

    original = lora_jax.forward.embedding_branch
    settings = SuiteSettings(targets=("wte", "c_attn"), rank=4, alpha=16.0)  # scaling 4: a missing one shows
    assert all(row.passed for row in run_check(tiny_pair, "forward_delta", settings).rows)
    monkeypatch.setattr(lora_jax.forward, "embedding_branch",
                        lambda ids, a, b, scaling, *, dtype: original(ids, a, b, 1.0, dtype=dtype))
    jax.clear_caches()  # the correct run compiled the same shapes; trace again with the bug in
    result = run_check(tiny_pair, "forward_delta", settings)
    assert not _row(result, "LoRA logits torch vs JAX [rsLoRA off").passed
    assert not _row(result, "LoRA logits peft.PeftModel vs JAX [rsLoRA off").passed
