"""LoRA+ in both halves, proven against PEFT 0.21's ``create_loraplus_optimizer`` on a tiny GPT-2.

One PEFT adapter with a non-zero B is loaded by PEFT, lora_torch and lora_jax; each takes three AdamW
steps (lr 1e-3, ratio 16, eps 1e-8) on one fixed batch, with weight decay 0 and 0.01, and the final A
and B of every module must agree. PEFT applies ``loraplus_weight_decay`` to its groups (a plain
``weight_decay=`` is overridden by each group's own 0.0), so that is what PEFT is given here.

Numerics: float32, ``jax.default_matmul_precision("highest")``, TF32 off. The losses are the same mean
next-token cross-entropy (transformers shifts ``labels=ids`` and averages over every predicted token,
as ``lora_jax.lm_loss`` does); they agree to ~1e-7. Adam divides each gradient by its own running RMS,
so a step is about ``lr * sign(g)``; for elements whose gradient is tiny (not far above eps) the
~1e-7 relative rounding difference of the gradients (summation order) is amplified. Observed max
|difference| of any A or B element after three steps: 3.7e-6 (lora_torch) and 2.1e-6 (lora_jax)
(docs/variants.md). WEIGHT_ATOL = 2e-5 leaves 5x headroom and is 50x below one step of A (1e-3) and
800x below one of B (1.6e-2), so a swapped or missing ratio fails at once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer
from transformers import GPT2LMHeadModel

import lora_jax
import lora_torch
from lora_jax.gpt2.loading import load_gpt2
from lora_jax.gpt2.model import GPT2
from lora_jax.targets import dotted_name

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LR, RATIO, EPS, STEPS = 1e-3, 16.0, 1e-8, 3
IDS = np.array([[5, 17, 99, 3, 42, 0, 7, 64], [1, 2, 3, 4, 5, 6, 7, 8]])
WEIGHT_ATOL = 2e-5  # see the module docstring
LOSS_ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    torch.backends.cuda.matmul.allow_tf32 = False


def base_model(model_dir) -> GPT2LMHeadModel:
    return GPT2LMHeadModel.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def saved(tiny_gpt2_dir, tmp_path_factory):
    """A PEFT adapter on c_attn, c_proj, c_fc with B drawn non-zero (with B = 0, A gets no gradient)."""
    torch.manual_seed(3)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                             fan_in_fan_out=True, lora_dropout=0.0)
    model = peft.get_peft_model(base_model(tiny_gpt2_dir), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    directory = tmp_path_factory.mktemp("loraplus_adapter")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    config, params = load_gpt2(tiny_gpt2_dir)
    return GPT2(config), params


Weights = dict[str, tuple[np.ndarray, np.ndarray]]  # {module: (A (in, r), B (r, out))}


def torch_train(model, optimizer, steps: int) -> list[float]:
    ids, losses = torch.as_tensor(IDS), []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run_peft(tiny_gpt2_dir, saved, ratio: float, wd: float, steps: int) -> tuple[Weights, list[float]]:
    model = peft.PeftModel.from_pretrained(base_model(tiny_gpt2_dir), saved, is_trainable=True).eval()
    optimizer = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=ratio,
                                          loraplus_weight_decay=wd, eps=EPS)
    losses = torch_train(model, optimizer, steps)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, in), (out, r)
            weights[name.removeprefix("base_model.model.")] = (a.detach().numpy().T, b.detach().numpy().T)
    return weights, losses


def run_torch(tiny_gpt2_dir, saved, ratio: float, wd: float, steps: int) -> tuple[Weights, list[float]]:
    model = lora_torch.freeze_base_model(lora_torch.load_adapter(base_model(tiny_gpt2_dir), saved))
    optimizer = torch.optim.AdamW(lora_torch.create_loraplus_param_groups(model, LR, ratio, weight_decay=wd), eps=EPS)
    losses = torch_train(model, optimizer, steps)
    weights = {name: (w.lora.lora_A.detach().numpy().copy(), w.lora.lora_B.detach().numpy().copy())
               for name, w in lora_torch.lora_wrappers(model).items()}
    return weights, losses


def run_jax(gpt2, saved, ratio: float, wd: float, steps: int) -> tuple[Weights, list[float]]:
    model, params = gpt2
    adapter = lora_jax.load_adapter(saved, params)
    tx = lora_jax.loraplus_optimizer(lambda lr: optax.adamw(lr, eps=EPS, weight_decay=wd), LR, ratio=ratio)
    step = lora_jax.make_train_step(lora_jax.lm_loss(model), tx, donate=False)
    opt_state, losses = tx.init(adapter), []
    with jax.default_matmul_precision("highest"):
        for _ in range(steps):
            adapter, opt_state, metrics = step(adapter, opt_state, params, lora_jax.Batch(jnp.asarray(IDS)),
                                               jax.random.key(0))
            losses.append(float(metrics["loss"]))
    weights = {dotted_name(p): (np.asarray(a), np.asarray(b)) for p, (a, b) in adapter.modules().items()}
    return weights, losses


def runners(tiny_gpt2_dir, saved, gpt2):
    return {
        "peft": lambda *a: run_peft(tiny_gpt2_dir, saved, *a),
        "lora_torch": lambda *a: run_torch(tiny_gpt2_dir, saved, *a),
        "lora_jax": lambda *a: run_jax(gpt2, saved, *a),
    }


def max_error(x: Weights, y: Weights) -> float:
    assert x.keys() == y.keys()
    return max(float(np.max(np.abs(np.float64(u) - np.float64(v)))) for k in x for u, v in zip(x[k], y[k]))


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_three_steps_agree_with_peft(tiny_gpt2_dir, saved, gpt2, wd):
    results = {name: run(RATIO, wd, STEPS) for name, run in runners(tiny_gpt2_dir, saved, gpt2).items()}
    reference, ref_losses = results["peft"]
    start = run_peft(tiny_gpt2_dir, saved, RATIO, wd, 0)[0]
    assert len(reference) == 8
    assert max_error(reference, start) > 1e-2  # the steps moved the weights (B by ~3 * 1.6e-2)
    for name in ("lora_torch", "lora_jax"):
        weights, losses = results[name]
        np.testing.assert_allclose(losses, ref_losses, atol=LOSS_ATOL, rtol=0)
        error = max_error(weights, reference)
        print(f"wd={wd} {name} vs peft: max |dA|,|dB| = {error:.2e}; losses {losses}")
        assert error < WEIGHT_ATOL, (name, error)


def update_norms(start: Weights, end: Weights) -> tuple[float, float]:
    """The global L2 norms of A's and B's change."""
    da = math.sqrt(sum(float(np.sum((np.float64(end[k][0]) - start[k][0]) ** 2)) for k in start))
    db = math.sqrt(sum(float(np.sum((np.float64(end[k][1]) - start[k][1]) ** 2)) for k in start))
    return da, db


@pytest.mark.parametrize("name", ["peft", "lora_torch", "lora_jax"])
def test_ratio_scales_the_first_step_of_b_only(tiny_gpt2_dir, saved, gpt2, name):
    # Adam's first step is lr * g / (|g| + eps) (+ lr * wd * w), proportional to the group's lr: B's step
    # grows by exactly the ratio and A's does not change.
    start = run_peft(tiny_gpt2_dir, saved, 1.0, 0.01, 0)[0]
    if name == "lora_jax":  # one gradient, two optimizers: no second compile of the step
        model, params = gpt2
        adapter = lora_jax.load_adapter(saved, params)
        with jax.default_matmul_precision("highest"):
            grads = jax.jit(jax.grad(lora_jax.lm_loss(model)))(adapter, params, lora_jax.Batch(jnp.asarray(IDS)), None)

        def end(ratio):
            tx = lora_jax.loraplus_optimizer(lambda lr: optax.adamw(lr, eps=EPS, weight_decay=0.01), LR, ratio=ratio)
            moved = optax.apply_updates(adapter, tx.update(grads, tx.init(adapter), adapter)[0])
            return {dotted_name(p): (np.asarray(a), np.asarray(b)) for p, (a, b) in moved.modules().items()}
    else:
        run = runners(tiny_gpt2_dir, saved, gpt2)[name]

        def end(ratio):
            return run(ratio, 0.01, 1)[0]
    da16, db16 = update_norms(start, end(RATIO))
    da1, db1 = update_norms(start, end(1.0))
    assert db16 / db1 == pytest.approx(RATIO, rel=1e-3)
    assert da16 / da1 == pytest.approx(1.0, rel=1e-3)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_ratio_or_lr_is_refused(tiny_gpt2_dir, bad):
    with pytest.raises(ValueError, match="ratio"):
        lora_jax.loraplus_optimizer(optax.adamw, 1e-3, ratio=bad)
    with pytest.raises(ValueError, match="lr"):
        lora_jax.loraplus_optimizer(optax.adamw, bad, ratio=16.0)
    model = lora_torch.freeze_base_model(lora_torch.inject_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ["0"],
                                                                rank=2, verbose=False))
    with pytest.raises(ValueError, match="ratio"):
        lora_torch.create_loraplus_param_groups(model, 1e-3, bad)
    with pytest.raises(ValueError, match="lr"):
        lora_torch.create_loraplus_param_groups(model, bad, 16.0)


def test_jax_labels_refuse_a_tree_that_is_not_an_adapter():
    with pytest.raises(ValueError, match=r"by their name \(lora_A, lora_B, lora_magnitude_vector, lora_embedding_A"):
        lora_jax.loraplus_optimizer(optax.sgd, 0.1, ratio=2.0).init({"w": {"kernel": jnp.ones((2, 2))}})
