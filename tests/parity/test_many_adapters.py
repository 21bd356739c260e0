"""Several named adapters: the switching, mixed_batch and combination stages, their planted bugs, bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from parity.checks.many_adapters import check_combination, check_mixed_batch, load_many
from parity.cli import main


def _peft_adapter(model_dir, out, targets, r, alpha, rslora, seed):
    import peft

    model = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(model_dir), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, fan_in_fan_out=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # PEFT's init leaves B = 0: the adapters would prove nothing
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapter_dirs(tiny_gpt2_dir, tmp_path_factory):
    """a: r=4 on c_attn,c_proj; b: r=8 with rsLoRA on c_attn,c_fc (made by PEFT alone)."""
    root = tmp_path_factory.mktemp("many")
    return (_peft_adapter(tiny_gpt2_dir, root / "a", ["c_attn", "c_proj"], 4, 8, False, 1),
            _peft_adapter(tiny_gpt2_dir, root / "b", ["c_attn", "c_fc"], 8, 16, True, 2))


@pytest.fixture(scope="module")
def many(tiny_pair, adapter_dirs):
    return load_many(tiny_pair, [("a", str(adapter_dirs[0])), ("b", str(adapter_dirs[1]))])


def _ids(many, rows=3):
    return np.random.default_rng(5).integers(0, 101, size=(rows, 8), dtype=np.int64)


def _rows(result):
    return {row.name: row for row in result.rows}


def test_cli_two_named_adapters_pass_every_stage_and_dump(tiny_gpt2_dir, adapter_dirs, tmp_path, capsys):
    code = main(["--model", str(tiny_gpt2_dir), "--adapter", f"a={adapter_dirs[0]}", "--adapter",
                 f"b={adapter_dirs[1]}", "--checks", "base_forward", "--combine-weights", "0.7,0.3",
                 "--dump", str(tmp_path)])
    table = capsys.readouterr().out
    assert code == 0, table
    # 1 base, switching 2 x 2, mixed 11 (logits 3, loss and grads 4, three AdamW steps 4), combination: cat 4 (JAX, torch, PEFT vs dense; logits) + svd 3 (no linear:
    # the ranks differ; PEFT's rows are there because its first adapter, a, has no rsLoRA).
    assert "PASS: all 23 rows within tolerance" in table
    names = json.loads((tmp_path / "mixed_adapter_names.json").read_text())
    ids = np.load(tmp_path / "mixed_input_ids.npy")
    assert names == ["a", "b", "__base__"] and ids.shape[0] == 3
    from peft import PeftModel

    peft = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), adapter_dirs[0], adapter_name="a")
    peft.load_adapter(adapter_dirs[1], adapter_name="b")
    with torch.no_grad():
        reference = peft.eval()(torch.as_tensor(ids), adapter_names=names).logits.numpy()
    for name in ("jax_mixed_logits", "torch_mixed_logits"):  # the bound: within 2e-5 of PEFT's
        assert np.abs(np.load(tmp_path / f"{name}.npy") - reference).max() < 2e-5, name
    cat_j, cat_t = np.load(tmp_path / "jax_combined_cat_logits.npy"), np.load(tmp_path / "torch_combined_cat_logits.npy")
    assert np.abs(cat_j - cat_t).max() < 1e-5 * np.abs(cat_t).max()


def test_planted_misrouted_mixed_batch_fails_against_peft(many):
    import jax.numpy as jnp
    import lora_jax

    def misrouted(apply_fn):  # example i gets example i+1's adapter
        forward = lora_jax.lora_apply(apply_fn)

        def call(params, adapters, ids, adapter_names=None, **kwargs):
            if isinstance(adapter_names, list):
                adapter_names = adapter_names[1:] + adapter_names[:1]
            elif adapter_names is not None:
                adapter_names = jnp.roll(adapter_names, -1)
            return forward(params, adapters, ids, adapter_names=adapter_names, **kwargs)

        return call

    broken = dataclasses.replace(many, pair=many.pair.with_impl(jax_lora_apply=misrouted))
    rows = _rows(check_mixed_batch(broken, _ids(many)))
    for name in ("mixed logits peft adapter_names vs JAX", "each example vs peft with its adapter alone",
                 "mixed dL/dA, dL/dB of every adapter peft vs JAX (worst tensor)",
                 "mixed: every adapter's A, B minus start peft vs JAX (worst tensor)"):
        assert not rows[name].passed and rows[name].max_rel > 1e-3, name


def test_planted_cat_dropping_one_scaling_fails_against_dense(many, monkeypatch):
    import lora_format.combine as combine

    def cat_without_second_scaling(parts, rank):
        a = np.concatenate([w * (f.scaling if i == 0 else 1.0) * np.asarray(f.a, np.float64)
                            for i, (w, f) in enumerate(parts)], axis=1)
        b = np.concatenate([np.asarray(f.b, np.float64) for _, f in parts], axis=0)
        return combine._padded(a, b, rank)

    monkeypatch.setitem(combine._COMBINE, "cat", cat_without_second_scaling)
    rows = _rows(check_combination(many, _ids(many, 2), (0.7, 0.3)))
    for half in ("JAX", "torch"):  # both halves share the bug: only the dense float64 sum sees it
        row = rows[f"[cat] {half} combined delta vs dense float64 (exact sum)"]
        assert not row.passed and row.max_rel > 0.1
    assert rows["[cat] combined logits torch vs JAX"].passed


def test_planted_combination_ignoring_rslora_fails_against_dense(many, monkeypatch):
    import lora_jax.combination as jax_combination
    import lora_torch.weighted as torch_weighted

    jax_factors, torch_factors = jax_combination._factors, torch_weighted._factors

    def jax_plain(name, adapter):
        factors = jax_factors(name, adapter)
        if not adapter.config.use_rslora:
            return factors
        return {k: dataclasses.replace(f, scaling=f.scaling / math.sqrt(f.rank)) for k, f in factors.items()}

    def torch_plain(layer):
        f = torch_factors(layer)
        return dataclasses.replace(f, scaling=f.scaling / math.sqrt(layer.rank)) if layer.use_rslora else f

    monkeypatch.setattr(jax_combination, "_factors", jax_plain)
    monkeypatch.setattr(torch_weighted, "_factors", torch_plain)
    rows = _rows(check_combination(many, _ids(many, 2), (0.5, 0.5)))
    for kind in ("cat", "svd"):
        for half in ("JAX", "torch"):
            row = next(r for n, r in rows.items() if n.startswith(f"[{kind}] {half} combined delta vs dense"))
            assert not row.passed and row.max_rel > 0.1, (kind, half)


@pytest.mark.parametrize("args, message", [
    (["--adapter", "a=/tmp", "--adapter", "a=/"], "repeats the name a"),
    (["--adapter", "a=/no/such/adapter", "--adapter", "b=/tmp"], "--adapter a=/no/such/adapter: no such directory"),
    (["--adapter", "a=/tmp", "--adapter", "/"], "is a plain DIR beside NAME=DIR forms"),
    (["--adapter", "a=/tmp", "--adapter", "b=/", "--combine-weights", "1,2,3"], "gives 3 weights for 2 adapters"),
    (["--adapter", "a=/tmp", "--adapter", "b=/", "--combine-weights", "1,nan"], "holds a non-finite weight"),
    (["--combine-weights", "1,1"], "pass two or more --adapter NAME=DIR"),
])
def test_many_adapters_bad_input_exits_2_before_loading(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m parity: error: ") and message in err and len(err.splitlines()) == 1


def test_named_adapter_for_another_model_is_bad_input(tiny_gpt2_dir, alt_gpt2_dir, adapter_dirs, tmp_path, capsys):
    other = _peft_adapter(alt_gpt2_dir, tmp_path / "alt", ["c_attn"], 4, 8, False, 3)
    capsys.readouterr()  # the loading bars of the adapter's making
    assert main(["--model", str(tiny_gpt2_dir), "--adapter", f"a={adapter_dirs[0]}", "--adapter", f"b={other}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m parity: error: --adapter b: ") and "needs (r, 32)" in err
