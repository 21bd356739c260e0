"""``python -m parity`` passes on checkpoints whose GPT2Config uses non-default options.

Two option groups, one parity run each (a run costs ~70 s of CPU on the tiny model):

- attention and MLP shape: ``n_inner``, exact (erf) GELU, ``scale_attn_weights`` false,
  ``scale_attn_by_inverse_layer_idx``, ``reorder_and_upcast_attn``, ``layer_norm_epsilon`` 1e-6;
- a learned activation: ``prelu`` puts one extra leaf per layer (``mlp.act.weight``) in both
  models' trees, beside a narrow ``n_inner`` and a large LayerNorm epsilon.

The runs go through the public entry point (``parity.cli.main``) with every check, so LoRA
injection, training, merging and adapter interchange all see the non-default model.
"""

from __future__ import annotations

import json

import pytest
from gpt2_fixtures import save_gpt2

from parity.cli import main

# initializer_range 0.1 (GPT-2: 0.02) puts MLP pre-activations where activations differ
# (erf and tanh GELU differ by 5e-4 at |x| ~ 2, by ~1e-7 at GPT-2's usual |x| ~ 0.1).
SHAPE = dict(n_embd=32, n_layer=3, n_head=2, vocab_size=97, n_positions=32, initializer_range=0.1)
GROUPS = {
    "attention_and_mlp": dict(
        n_inner=48, activation_function="gelu", scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True, layer_norm_epsilon=1e-6,
    ),
    "learned_activation": dict(n_inner=20, activation_function="prelu", layer_norm_epsilon=1e-3),
}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_parity_passes_with_non_default_options(group, tmp_path, capsys):
    model_dir = save_gpt2(tmp_path / group, seed=2, **SHAPE, **GROUPS[group])
    report_file = tmp_path / "report.json"
    code = main(["--model", str(model_dir), "--targets", "c_attn,c_proj,c_fc", "--json", str(report_file)])
    table = capsys.readouterr().out
    report = json.loads(report_file.read_text())
    failures = [(row["stage"], row["name"], row["detail"]) for row in report["rows"] if not row["passed"]]
    assert (code, failures) == (0, []), table
    stages = {row["stage"] for row in report["rows"]}
    assert stages == {"base_forward", "injection", "forward_delta", "gradients", "training", "merge", "interchange"}
    base = next(row for row in report["rows"] if row["stage"] == "base_forward")
    # fp32 on CPU: the two halves' base logits agree to a few ulps (measured ~2e-7 relative).
    assert base["max_rel"] < 1e-5
