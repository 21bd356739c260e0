"""``python -m parity``: a real run with every output, and each bad input answered with exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel

from parity.cli import main


def test_cli_run_on_alt_shape_writes_table_json_markdown_and_dump(alt_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "out"
    page = tmp_path / "page.md"
    page.write_text("# Hand-written intro\n\nkept as is\n")
    code = main(["--model", str(alt_gpt2_dir), "--targets", "c_attn,c_fc", "--rank", "8", "--alpha", "16",
                 "--rslora", "--checks", "base_forward,forward_delta,merge", "--json", str(out / "r.json"),
                 "--markdown", str(page), "--section", "alt", "--dump", str(out / "dump")])
    table = capsys.readouterr().out
    assert code == 0
    # 1 base + 5 delta (B guard, 2 x 2 rows) + 10 merge, and PEFT's: 2 x 2 delta rows, 1 merge row.
    assert "PASS: all 21 rows within tolerance" in table and "device: cpu" in table and "dtype: fp32" in table
    report = json.loads((out / "r.json").read_text())
    assert report["passed"] is True and report["settings"]["rank"] == 8 and report["settings"]["use_rslora"]
    assert report["environment"]["versions"]["torch"] == torch.__version__
    text = page.read_text()
    assert text.startswith("# Hand-written intro\n\nkept as is\n") and "<!-- parity:alt:end -->" in text
    dumped = {p.stem: np.load(p) for p in (out / "dump").glob("*.npy")}
    assert dumped["input_ids"].shape == (2, 16) and dumped["input_ids"].dtype == np.int64
    assert len(dumped) == 7
    for name in ("torch_base_logits", "jax_base_logits", "torch_merged_logits", "jax_lora_logits"):
        assert dumped[name].shape == (2, 16, 97) and dumped[name].dtype == np.float32
    # fp32 parity: the dumped halves agree far inside the logits tolerance (rel 1e-5).
    scale = np.abs(dumped["jax_base_logits"]).max()
    assert np.abs(dumped["torch_base_logits"] - dumped["jax_base_logits"]).max() < 1e-5 * scale


def _zero_b_adapter(model_dir, out_dir):
    from lora_torch import inject_lora, save_adapter

    model = inject_lora(GPT2LMHeadModel.from_pretrained(model_dir), ["c_attn"], rank=4, lora_alpha=8.0,
                        verbose=False)
    save_adapter(model, out_dir)  # freshly injected: B == 0
    return out_dir


def test_cli_exits_1_when_a_check_fails_on_an_untrained_adapter(tiny_gpt2_dir, tmp_path, capsys):
    adapter = _zero_b_adapter(tiny_gpt2_dir, tmp_path / "fresh_adapter")
    code = main(["--model", str(tiny_gpt2_dir), "--adapter", str(adapter), "--checks", "forward_delta"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAIL" in out and "B == 0 in 2/2 modules" in out


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model_dir"], "Model directory '/no/such/model_dir' does not exist"),
    (["--device", "gpu"], "--device gpu needs a GPU visible to both frameworks"),
    (["--rank", "0"], "LoraConfig.rank must be > 0, got 0"),
    (["--steps", "0"], "steps must be an int >= 1"),
    (["--checks", "base_forward,merged"], "Unknown or no checks ['merged']"),
    (["--adapter", "/x", "--rank", "8"], "drop --rank"),
    (["--adapter", "/x", "--layers", "0", "--rslora"], "rsLoRA, layers and DoRA from its adapter_config.json; "
                                                        "drop --rslora, --layers."),
    (["--targets", "re:(unclosed"], "is read as a regex, and it does not compile"),
    (["--section", "cpu"], "--section cpu replaces a section of a Markdown page; add --markdown PAGE.md."),
    (["--adapter", "/x", "--dora"], "from its adapter_config.json; drop --dora."),
    (["--loraplus-ratio", "0"], "--loraplus-ratio 0 must be a finite number > 0 (B's learning rate over A's); "
                                "pass e.g. --loraplus-ratio 16"),
    (["--loraplus-ratio", "nan"], "--loraplus-ratio nan must be a finite number > 0"),
    (["--loraplus-ratio", "16", "--checks", "merge"], "--checks merge leaves training out; add training to --checks, "
                                                      "or drop --loraplus-ratio."),
    (["--targets", "ALL-linear", "--layers", "0"], "--targets ALL-linear cannot take --layers: PEFT expands all-linear "
                                                   "to full module names"),
])
def test_cli_bad_input_exits_2_with_a_clear_message(args, message, capsys):
    if args[:2] == ["--device", "gpu"] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m parity: error: ") and message in err


def test_cli_rejects_non_gpt2_checkpoint(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["--model", str(tmp_path)]) == 2
    assert "holds a 'llama' checkpoint; parity compares GPT-2 only" in capsys.readouterr().err


def test_cli_rejects_adapter_made_for_another_model(tiny_gpt2_dir, alt_gpt2_dir, tmp_path, capsys):
    adapter = _zero_b_adapter(alt_gpt2_dir, tmp_path / "alt_adapter")  # width 48, tiny is width 32
    assert main(["--model", str(tiny_gpt2_dir), "--adapter", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert "has shape (4, 48), but this GPT-2's transformer.h.0.attn.c_attn needs (r, 32)" in err


def test_cli_unknown_device_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "tpu"])
    assert exit_info.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err


def test_help_epilog_lists_every_exit_status():
    from parity.cli import build_parser

    text = build_parser().format_help()
    assert "exit status:" in text
    for line in ("0  every check passed", "1  a numerical check failed", "2  bad input: one line on stderr",
                 "3  divergence: non-finite training loss"):
        assert line in text


def test_non_finite_training_loss_exits_3(tiny_gpt2_dir, monkeypatch, capsys):
    import types

    import parity.pair
    import parity.report
    import parity.suite

    report = types.SimpleNamespace(passed=False, settings={}, arrays={
        "torch_losses": np.array([4.6, np.nan], np.float32), "jax_losses": np.array([4.6, 4.5], np.float32)})
    monkeypatch.setattr(parity.pair, "load_pair", lambda *args, **kwargs: object())
    monkeypatch.setattr(parity.suite, "run_suite", lambda *args, **kwargs: report)
    monkeypatch.setattr(parity.report, "render_table", lambda report: "")
    assert main(["--model", str(tiny_gpt2_dir), "--checks", "training"]) == 3
    assert "diverged: non-finite training loss in torch_losses" in capsys.readouterr().err


@pytest.fixture(scope="module")
def peft_dora_adapter(tiny_gpt2_dir, tmp_path_factory):
    """A DoRA adapter made and saved by PEFT alone: all-linear, r=4, alpha 8, B ~ N(0, 0.1), m moved ~10%.

    PEFT sets m = ||W0|| at injection (B = 0 then); drawing B and scaling m keeps m off ||W0 + sAB||, so
    the magnitude matters in every comparison (parity's guard row checks it).
    """
    import peft

    base = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, fan_in_fan_out=True)
    model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
            elif "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
    out = tmp_path_factory.mktemp("peft_dora") / "adapter"
    model.save_pretrained(out)
    return out


def test_peft_dora_all_linear_adapter_runs_every_stage_and_dumps_peft_logits(tiny_gpt2_dir, peft_dora_adapter,
                                                                             tmp_path, capsys):
    from peft import PeftModel

    code = main(["--model", str(tiny_gpt2_dir), "--adapter", str(peft_dora_adapter), "--dump", str(tmp_path)])
    table = capsys.readouterr().out
    assert code == 0, table
    # Every stage ran on the DoRA adapter, each held to PEFT as well as torch vs JAX: 1 base, 21 injection (6 specs
    # x 3, 3 vs PEFT), 11 forward_delta, 6 gradients, 4 training, 12 merge, 9 interchange.
    assert "PASS: all 64 rows within tolerance" in table and "use_dora=True" in table
    assert "dL/dA, dL/dB, dL/dm peft.PeftModel vs JAX" in table and "PEFT-saved -> JAX-loaded A, B, m" in table
    ids = np.load(tmp_path / "input_ids.npy")
    reference = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), peft_dora_adapter).eval()
    base = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    with torch.no_grad():
        peft_logits = reference(torch.as_tensor(ids)).logits.numpy()
        base_logits = base(torch.as_tensor(ids)).logits.numpy()
    # The dumped logits are PeftModel's within 2e-5 (fp32, CPU; measured 8.9e-8 JAX, 6.0e-8 torch, |logits| <= 0.42)...
    for name in ("jax_lora_logits", "torch_lora_logits"):
        assert np.abs(np.load(tmp_path / f"{name}.npy") - peft_logits).max() < 2e-5, name
    # ...and the adapter moves them by far more than that.
    assert np.abs(peft_logits - base_logits).max() > 1e-2


def test_cli_variant_flags_run_dora_loraplus_all_linear(tiny_gpt2_dir, tmp_path, capsys):
    code = main(["--model", str(tiny_gpt2_dir), "--dora", "--loraplus-ratio", "16", "--targets", "all-linear",
                 "--checks", "injection,training", "--steps", "4", "--json", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    settings = report["settings"]
    assert (settings["targets"], settings["use_dora"], settings["loraplus_ratio"]) == ("all-linear", True, 16.0)
    names = [row["name"] for row in report["rows"]]
    # all-linear is the main spec: PEFT's own expansion gives the same 8 modules (lm_head left out).
    assert "module names vs peft.get_peft_model [all-linear@dora]" in names
    assert next(row for row in report["rows"] if row["name"] == "module names [all-linear@dora]")["detail"] == \
        "8 identical"
    assert "final A, B, m minus start peft.PeftModel vs JAX (worst tensor)" in names
    assert "loss trajectory (4 AdamW steps, LoRA+ ratio 16)" in names


def test_cli_targets_wte_runs_every_stage_with_peft_rows_and_merge_against_peft(tiny_gpt2_dir, tmp_path, capsys):
    code = main(["--model", str(tiny_gpt2_dir), "--targets", "wte,c_attn", "--steps", "3",
                 "--json", str(tmp_path / "r.json")])
    table = capsys.readouterr().out
    assert code == 0, table
    rows = {row["name"]: row for row in json.loads((tmp_path / "r.json").read_text())["rows"]}
    # The tied head: each side's merged logits are held to PEFT's merge_and_unload, not to its own unmerged ones.
    merged = rows["JAX merged logits vs peft merge_and_unload (tied head)"]
    assert merged["passed"] and "merging moved the logits by max" in merged["detail"]
    assert "JAX merged vs unmerged logits" not in rows
    assert rows["merged weights peft merge_and_unload vs JAX (worst module)"]["passed"]
    assert rows["LoRA logits peft.PeftModel vs JAX [rsLoRA off, s=2]"]["passed"]
    assert "A != 0 in transformer.wte" in rows["LoRA B non-zero (modules with B == 0)"]["detail"]
    assert rows["module names vs peft.get_peft_model [wte,c_attn]"]["detail"] == "3 identical"


def test_cli_peft_wte_adapter_runs_merge_and_interchange(tiny_gpt2_dir, tmp_path, capsys):
    import peft

    model = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["wte", "c_fc"], use_rslora=True, fan_in_fan_out=True))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # PEFT's embedding init leaves A = 0 (linear layers: B = 0)
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(tmp_path / "adapter")
    code = main(["--model", str(tiny_gpt2_dir), "--adapter", str(tmp_path / "adapter"),
                 "--checks", "forward_delta,merge,interchange"])
    table = capsys.readouterr().out
    assert code == 0, table
    assert "torch (Conv1D) merged logits vs peft merge_and_unload (tied head)" in table
    assert "PEFT-saved -> JAX-loaded A, B" in table


def test_cli_dora_on_wte_is_bad_input(capsys):
    assert main(["--targets", "wte,c_attn", "--dora"]) == 2
    assert "DoRA on the token embedding transformer.wte is implemented by neither half" in capsys.readouterr().err
