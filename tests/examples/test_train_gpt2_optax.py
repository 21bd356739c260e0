"""End-to-end tests of examples/train_gpt2_optax.py on a tiny embedded-style base built in seconds.

The example runs in-process through ``main(argv)`` (one JAX import for all tests, and runs with the
same settings reuse its compiled programs); one test runs it as a real subprocess to check the exit
code a shell sees. Each reliability test names the failure it reproduces.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from example_scripts import EXAMPLES, load_example
from lora_jax.training.checkpoint import TrainState, latest_checkpoint

SCRIPT = EXAMPLES / "train_gpt2_optax.py"
ADAPTER = Path("adapter") / "adapter_model.safetensors"


@pytest.fixture(scope="module")
def example():
    return load_example("train_gpt2_optax")


def _argv(base_dir: Path, out: Path, *extra: str) -> list[str]:
    # Runs with the same settings reuse the example's cached compiled step, which keeps these tests fast.
    return ["--model", str(base_dir), "--out", str(out), "--steps", "6", "--batch-size", "4", "--seq-len", "16",
            "--rank", "2", "--lr", "1e-2", "--warmup", "1", "--eval-every", "3", "--ckpt-every", "2",
            "--dropout", "0.1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def full_run(example, base_dir, tmp_path_factory) -> tuple[Path, str]:
    """One uninterrupted 6-step run with LoRA dropout on (so the dropout RNG path is exercised); its stdout."""
    out = tmp_path_factory.mktemp("full") / "run"
    old_umask, stdout = os.umask(0o022), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            assert example.main(_argv(base_dir, out)) == 0
    finally:
        os.umask(old_umask)
    return out, stdout.getvalue()


def _adapter(out: Path) -> dict[str, np.ndarray]:
    return load_file(out / ADAPTER)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _snapshot(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.rglob("*")) if p.name != ".lock"}


def test_full_run_adapts_and_writes_every_output(full_run):
    out, _ = full_run
    results = _results(out)
    assert results["final_heldout_loss"] < results["base_heldout_loss"]
    assert results["final_heldout_perplexity"] == pytest.approx(np.exp(results["final_heldout_loss"]), rel=1e-12)
    assert [e[0] for e in results["evals"]] == [0, 2, 3, 4, 6]  # every --eval-every step and every checkpoint
    # The merged weights alone reproduce the adapter's held-out loss (fp32 rounding only).
    assert abs(results["merged_heldout_loss"] - results["final_heldout_loss"]) < 1e-4
    assert results["history"] == [{"event": "start", "step": 0}] and results["bit_identical_to_uninterrupted"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 2, 16.0)
    tensors = _adapter(out)
    assert len(tensors) == 6  # 1 layer x (attn.c_attn, attn.c_proj, mlp.c_proj) x (A, B)
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2, 32)
    assert np.abs(tensors["base_model.model.transformer.h.0.mlp.c_proj.lora_B.weight"]).max() > 0


def test_greedy_continuations_before_and_after_are_shown_side_by_side_and_stored(full_run):
    out, stdout = full_run
    greedy = _results(out)["greedy"]
    assert set(greedy) == {"prompt", "new_tokens", "base", "adapted", "reference"}
    assert greedy["new_tokens"] == 16  # the tiny base has 32 positions: a 16-token prompt + 16 new tokens
    assert greedy["prompt"] and greedy["reference"]
    header = next(line for line in stdout.splitlines() if line.startswith("base model "))
    assert header.split("|")[1].strip() == "with LoRA (merged)"
    assert "temperature" not in json.dumps(greedy) and "samples" not in _results(out)  # no sampled text any more


def test_outputs_and_checkpoints_get_umask_modes_not_0600(full_run):
    # Regression: results.json and loss.png were written 0600 (mkstemp), checkpoint dirs 0700, tensors 0600.
    out, _ = full_run
    files = [out / "results.json", out / "loss.png", *(out / "checkpoints").glob("step_*/*")]
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}
    assert {oct(p.stat().st_mode & 0o777) for p in (out / "checkpoints").glob("step_*")} == {"0o755"}


def test_killed_then_resumed_run_gives_the_same_adapter_bit_for_bit(example, base_dir, full_run, tmp_path):
    argv = _argv(base_dir, tmp_path)  # dropout on: the RNG stream must resume exactly too
    assert example.main(argv + ["--stop-after", "3"]) == 0  # "killed" after step 3; newest checkpoint is step 2
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    assert not (tmp_path / ADAPTER).exists()
    assert example.main(argv + ["--resume"]) == 0
    resumed, uninterrupted = _adapter(tmp_path), _adapter(full_run[0])
    assert resumed.keys() == uninterrupted.keys()
    for name in uninterrupted:  # exact equality: same data, RNG and optimizer state from step 2 on
        assert np.array_equal(resumed[name], uninterrupted[name]), name
    assert _results(tmp_path)["evals"] == _results(full_run[0])["evals"]


def test_truncated_newest_checkpoint_falls_back_to_the_older_one_with_a_warning(example, base_dir, full_run,
                                                                                  tmp_path, capsys, caplog):
    # Regression: a truncated state.safetensors crashed --resume with a traceback.
    argv = _argv(base_dir, tmp_path)
    assert example.main(argv + ["--stop-after", "5"]) == 0  # checkpoints at steps 2 and 4
    damaged = tmp_path / "checkpoints" / "step_00000004" / "state.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    capsys.readouterr()
    assert example.main(argv + ["--resume"]) == 0
    assert "resuming from step_00000002 instead of the damaged step_00000004" in capsys.readouterr().err
    assert "step_00000004 is damaged: state.safetensors has 1000 bytes" in caplog.text  # the library's warning
    assert _results(tmp_path)["history"][-1] == {"event": "resume", "step": 2, "from": "step_00000002",
                                                 "skipped_damaged": ["step_00000004"]}
    resumed, uninterrupted = _adapter(tmp_path), _adapter(full_run[0])
    assert all(np.array_equal(resumed[k], uninterrupted[k]) for k in uninterrupted)  # still bit for bit


def test_resume_with_other_settings_fails_in_one_line_and_changes_nothing(example, base_dir, full_run, capsys):
    out, _ = full_run
    before = _snapshot(out)
    code = example.main(_argv(base_dir, out, "--rank", "4", "--resume"))
    assert code == example.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rank: checkpoint 2, this run 4" in err and "--out" in err
    assert _snapshot(out) == before


def test_resume_may_change_lr_and_clip_norm_and_says_the_run_is_no_longer_bit_identical(example, base_dir, full_run,
                                                                                          tmp_path, capsys):
    # Regression: exit 3 advised "lower --lr", but --resume refused any change of --lr or --clip-norm (exit 2).
    assert example.main(_argv(base_dir, tmp_path, "--stop-after", "2")) == 0
    capsys.readouterr()
    assert example.main(_argv(base_dir, tmp_path, "--resume", "--lr", "5e-3", "--clip-norm", "0.5")) == 0
    assert "--lr 0.01 -> 0.005, --clip-norm 1.0 -> 0.5 at step 2; the run is no longer bit-identical" in \
        capsys.readouterr().out
    results = _results(tmp_path)
    change = results["history"][-1]
    assert change["changed"] == {"lr": [0.01, 0.005], "clip_norm": [1.0, 0.5]} and not \
        results["bit_identical_to_uninterrupted"]
    manifest = json.loads((tmp_path / "checkpoints" / "step_00000006" / "manifest.json").read_text())
    assert manifest["history"][-1] == change and manifest["run_config"]["lr"] == 0.005
    # Adam's state carried over: 6 updates counted (4 after a re-initialisation at step 2).
    state = load_file(tmp_path / "checkpoints" / "step_00000006" / "state.safetensors")
    assert int(state["opt_state.inner_opt_state.1.0.count"]) == 6
    name = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    assert not np.array_equal(_adapter(tmp_path)[name], _adapter(full_run[0])[name])  # the new lr took effect


def test_nan_loss_stops_with_exit_3_and_keeps_last_good_checkpoint(example, base_dir, tmp_path, capsys):
    code = example.main(_argv(base_dir, tmp_path, "--inject-nan-at", "4"))
    assert code == example.EXIT_DIVERGED
    err = capsys.readouterr().err
    assert "divergence at step 4: training loss nan" in err
    assert "newest good checkpoint is " + str(tmp_path / "checkpoints" / "step_00000002") in err
    assert "--resume --lr 0.001" in err  # advice that --resume now accepts
    assert latest_checkpoint(tmp_path / "checkpoints").name == "step_00000002"
    assert not (tmp_path / ADAPTER).exists()


def test_huge_lr_exits_3_and_writes_no_nan_results_adapter_or_checkpoint(example, base_dir, tmp_path, capsys):
    # Regression: this command exited 0, printed "held-out loss nan", wrote NaN into results.json and an
    # adapter with values up to 1e6 (the guard checked only the training loss, before the update).
    code = example.main(["--model", str(base_dir), "--out", str(tmp_path), "--steps", "2", "--warmup", "1", "--lr",
                         "1e6", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--ckpt-every", "2",
                         "--no-progress"])
    assert code == example.EXIT_DIVERGED
    assert "divergence at step 2: held-out loss nan. Nothing was saved" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def _loop_args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**{"steps": 4, "grad_accum": 1, "batch_size": 2, "eval_every": 1, "ckpt_every": 2,
                                 "stop_after": None, "inject_nan_at": None, "no_progress": True, **overrides})


class _Sampler:
    def batch(self, seen, batch_size):
        return None


def _start() -> TrainState:
    import jax

    return TrainState(0, {"w": jnp.ones(2)}, {"mu": jnp.zeros(2)}, jax.random.key(0), 0, (), ((0, 1.0),))


def test_update_that_overflows_the_adapter_is_divergence_even_with_a_finite_loss(example):
    # Regression: only the loss (computed before the update) was checked, so an update to inf/NaN params passed.
    def step_fn(adapter, opt_state, frozen, batch, rng):  # finite loss and gradient; step 3's update overflows
        blown = {"w": adapter["w"] * (jnp.inf if saved else 1.0)}
        return blown, opt_state, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}

    saved = []
    with pytest.raises(example.Diverged, match="step 3: the adapter or optimizer state holds NaN or infinity"):
        example.train_loop(_loop_args(), step_fn, _start(), None, _Sampler(), lambda a: 1.0, saved.append,
                           lambda b: b)
    assert [s.step for s in saved] == [2]  # step 3 never reaches a checkpoint


def test_checkpoint_with_a_non_finite_heldout_loss_is_never_saved(example):
    # Regression: with --lr 1e6 step_00000002 was saved with held-out loss NaN and later named "last good".
    def step_fn(adapter, opt_state, frozen, batch, rng):
        return adapter, opt_state, {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}

    saved, heldout = [], iter([1.0, float("nan")])
    with pytest.raises(example.Diverged, match="step 2: held-out loss nan"):
        example.train_loop(_loop_args(), step_fn, _start(), None, _Sampler(), lambda a: next(heldout), saved.append,
                           lambda b: b)
    assert saved == []


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "1e39"), ("--clip-norm", "inf"),
                                         ("--alpha", "nan"), ("--weight-decay", "nan"), ("--dropout", "nan")])
def test_non_finite_float_flags_are_bad_input(example, base_dir, tmp_path, capsys, flag, value):
    # Regression: `--steps 1 --warmup 0 --lr nan` passed the flag checks.
    with pytest.raises(SystemExit) as exit_info:
        example.main(_argv(base_dir, tmp_path, flag, value))
    assert exit_info.value.code == 2
    assert f"{flag} must be a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--grad-accum", "0", "--grad-accum must be >= 1"),
    ("--warmup", "6", "--warmup must be in [0, --steps)"),
    ("--dropout", "1", "--dropout must be < 1"),
])
def test_bad_flags_exit_2_with_the_reason(example, base_dir, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        example.main(_argv(base_dir, tmp_path, flag, value))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_fresh_run_refuses_a_non_empty_out_and_changes_nothing(example, base_dir, full_run, capsys):
    # Regression: a fresh run over a finished --out deleted its checkpoints before saving anything new.
    out, _ = full_run
    before = _snapshot(out)
    assert example.main(_argv(base_dir, out)) == example.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds adapter, checkpoints, loss.png, results.json" in err
    assert "--resume" in err and "--overwrite" in err
    assert _snapshot(out) == before


def test_overwrite_keeps_the_old_run_until_the_new_run_has_a_checkpoint(example, base_dir, full_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run[0], out)
    old = _snapshot(out)
    # Diverges at step 2, before its first checkpoint: the old run must be untouched.
    assert example.main(_argv(base_dir, out, "--overwrite", "--inject-nan-at", "2")) == example.EXIT_DIVERGED
    assert _snapshot(out) == old
    assert example.main(_argv(base_dir, out, "--overwrite", "--stop-after", "2")) == 0
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints"]  # the old outputs went with them
    manifest = json.loads((out / "checkpoints" / "step_00000002" / "manifest.json").read_text())
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"] and manifest["step"] == 2


def test_second_run_on_the_same_out_exits_2_while_the_first_holds_it(example, base_dir, tmp_path, capsys):
    # Regression: two runs on one --out both exited 0 and the second deleted the first one's checkpoints.
    with example.open_run_dir(tmp_path, resume=False, overwrite=False):  # the first run, in this process
        assert example.main(_argv(base_dir, tmp_path)) == example.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"is in use by another run (pid {os.getpid()})" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_the_lock_goes_with_a_killed_run(example, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; h = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
         "fcntl.flock(h, fcntl.LOCK_EX); os.write(h, str(os.getpid()).encode()); print('locked', flush=True); "
         "sys.stdin.read()", str(tmp_path / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(example.BadInput, match=f"in use by another run \\(pid {holder.pid}\\)"):
            with example.open_run_dir(tmp_path, resume=False, overwrite=False):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
    with example.open_run_dir(tmp_path, resume=False, overwrite=False) as run_dir:  # the kernel released it
        assert run_dir.out == tmp_path


def _model_copy(base_dir: Path, tmp_path: Path, change) -> Path:
    model = tmp_path / "model"
    shutil.copytree(base_dir, model)
    change(model)
    return model


def _bigger_tokenizer(model: Path) -> None:
    from lora_jax.embedded.corpus import base_corpus
    from lora_jax.embedded.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(base_corpus()[:200_000], 400).save(str(model / "tokenizer.json"))


@pytest.mark.parametrize("case, message", [
    ("no_model", "--model {tmp}/absent: {tmp}/absent is not a model directory"),
    ("no_tokenizer", "has no usable tokenizer"),
    ("config_list", "config.json must hold a JSON object, found list"),
    ("config_not_json", "config.json is not valid JSON"),
    ("tokenizer_too_big", "the tokenizer has 400 tokens ... but the model's vocab_size is 300"),
    ("binary_data", "--data {tmp}/weights.bin is not UTF-8 text (byte 0x80 at offset 3)"),
    ("out_is_a_file", "--out {tmp}/taken is a file"),
    ("seq_len_too_long", "--seq-len 64 exceeds the model's 32 positions"),
    ("no_target", "--targets q_proj: "),
    ("empty_targets", "--rank/--alpha/--dropout/--targets: LoraConfig.target_modules is empty"),
    ("text_too_short", "Held-out text has ... Lower --seq-len (now 16) or pass a longer --data."),
])
def test_bad_input_exits_2_with_one_line_and_no_traceback(example, base_dir, tmp_path, capsys, case, message):
    # Regression: these gave tracebacks with exit 1, or (a tokenizer bigger than the model) NaN blamed on --lr.
    model, out, extra = base_dir, tmp_path / "out", []
    if case == "no_model":
        model = tmp_path / "absent"
    elif case == "no_tokenizer":
        model = _model_copy(base_dir, tmp_path, lambda m: (m / "tokenizer.json").unlink())
    elif case == "config_list":
        model = _model_copy(base_dir, tmp_path, lambda m: (m / "config.json").write_text("[]"))
    elif case == "config_not_json":
        model = _model_copy(base_dir, tmp_path, lambda m: (m / "config.json").write_text('{"n_embd": 3'))
    elif case == "tokenizer_too_big":
        model = _model_copy(base_dir, tmp_path, _bigger_tokenizer)
    elif case == "binary_data":
        (tmp_path / "weights.bin").write_bytes(b"abc\x80\x00" * 100)
        extra = ["--data", str(tmp_path / "weights.bin")]
    elif case == "out_is_a_file":
        out, model = tmp_path / "taken", tmp_path / "absent"  # --out is checked before the model is looked at
        out.write_text("mine")
    elif case == "seq_len_too_long":
        extra = ["--seq-len", "64"]
    elif case == "no_target":
        extra = ["--targets", "q_proj"]
    elif case == "empty_targets":
        extra = ["--targets", ","]
    elif case == "text_too_short":
        (tmp_path / "short.txt").write_text("a few words of text " * 3, encoding="utf-8")
        extra = ["--data", str(tmp_path / "short.txt")]
    code = example.main(_argv(model, out, *extra))
    err = capsys.readouterr().err
    assert code == example.EXIT_BAD_INPUT, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert all(part in err for part in message.format(tmp=tmp_path).split(" ... ")), err


def test_a_bug_keeps_its_traceback_instead_of_becoming_bad_input(example, base_dir, tmp_path, monkeypatch):
    # Regression: main() turned every ValueError into exit 2, hiding real bugs behind "bad settings".
    def broken(*args, **kwargs):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(example, "heldout_loss", broken)
    with pytest.raises(ValueError, match="a bug, not the user's input"):
        example.main(_argv(base_dir, tmp_path))


def test_gradient_accumulation_equals_the_big_batch(example, base_dir, tmp_path):
    big, accumulated = tmp_path / "big", tmp_path / "accum"
    common = ["--steps", "3", "--eval-every", "3", "--dropout", "0"]  # masks would differ by micro-batch
    assert example.main(_argv(base_dir, big, *common, "--batch-size", "4")) == 0
    assert example.main(_argv(base_dir, accumulated, *common, "--batch-size", "2", "--grad-accum", "2")) == 0
    a, b = _adapter(big), _adapter(accumulated)
    for name in a:
        # Same 4 windows per step; only the summation order of the mean gradient differs (float32
        # rounding ~1e-7 relative), which Adam's normalised step keeps at that scale.
        np.testing.assert_allclose(b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert _results(big)["final_heldout_loss"] == pytest.approx(_results(accumulated)["final_heldout_loss"], rel=1e-5)


def test_cli_subprocess_bf16_on_a_text_file_and_a_two_device_mesh(base_dir, tmp_path):
    data = tmp_path / "notes.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 60, encoding="utf-8")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    argv = _argv(base_dir, tmp_path / "out", "--data", str(data), "--mesh", "data=2", "--dtype", "bf16", "--steps", "3",
                 "--warmup", "0", "--eval-every", "3")
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["data"] == str(data) and results["devices"] == 2 and results["settings"]["dtype"] == "bf16"
    # A repeated sentence is easy to learn: three steps at lr 1e-2 must already lower the held-out loss.
    assert results["final_heldout_loss"] < results["base_heldout_loss"]


def test_qlora_run_learns_merges_full_precision_and_resumes_bit_for_bit(example, base_dir, tmp_path, capsys):
    # --quantize nf4: the base's kernels in NF4, LoRA on top; a resume re-quantizes the base deterministically.
    full, part = tmp_path / "full", tmp_path / "part"
    assert example.main(_argv(base_dir, full, "--quantize", "nf4")) == 0
    results = _results(full)
    assert results["quantize"] == "nf4" and results["settings"]["quantize"] == "nf4"
    assert results["final_heldout_loss"] < results["base_heldout_loss"]  # measured 5.601 -> 5.570 in 6 steps
    # The merged model is the dequantized base plus s A B in fp32: the adapter's held-out loss, fp32 rounding only.
    assert abs(results["merged_heldout_loss"] - results["final_heldout_loss"]) < 1e-4
    assert all("lora_" in name for name in _adapter(full))  # adapter only: the PEFT directory has no base weights
    assert example.main(_argv(base_dir, part, "--quantize", "nf4", "--stop-after", "3")) == 0
    assert example.main(_argv(base_dir, part, "--quantize", "nf4", "--resume")) == 0
    for name, value in _adapter(full).items():
        assert np.array_equal(_adapter(part)[name], value), name
    capsys.readouterr()
    assert example.main(_argv(base_dir, part, "--resume")) == example.EXIT_BAD_INPUT  # a float run cannot resume it
    assert "quantize: checkpoint 'nf4', this run '<missing>'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (("--quantize", "fp4"), "argument --quantize: invalid choice: 'fp4'"),
    (("--quantize", "nf4", "--mesh", "data=1"), "--quantize nf4 cannot be combined with --mesh"),
])
def test_bad_quantize_flags_exit_2_with_the_reason(example, base_dir, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        example.main(_argv(base_dir, tmp_path, *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
