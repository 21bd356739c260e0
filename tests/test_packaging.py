"""The distribution as a user installs it: a wheel holding every subpackage, and a core without torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lora_format", "lora_jax", "lora_torch", "parity")

# Blocks torch the way an environment without it behaves: `import torch` raises ImportError.
NO_TORCH = "import sys\nfor name in ('torch', 'transformers', 'peft', 'bitsandbytes'):\n    sys.modules[name] = None\n"

CORE_WITHOUT_TORCH = NO_TORCH + '''
import tempfile
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
import lora_jax

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))

model, x = MLP(), jnp.ones((2, 4))
params = model.init(jax.random.key(0), x)["params"]
config = lora_jax.LoraConfig(rank=2, alpha=4.0, target_modules=["hidden", "out"])
adapter = lora_jax.init_lora(params, config, jax.random.key(1))
forward = lora_jax.lora_apply(model.apply)
loss_fn = lambda a, frozen, batch, rng: jnp.mean((forward(frozen, a, batch) - 1.0) ** 2)
tx = optax.adam(1e-2)
step = lora_jax.make_train_step(loss_fn, tx, donate=False)
opt_state = tx.init(adapter)
for _ in range(3):
    adapter, opt_state, metrics = step(adapter, opt_state, params, x, jax.random.key(2))
merged = lora_jax.merge(params, adapter)
out = tempfile.mkdtemp()
lora_jax.save_adapter(out, adapter)
back = lora_jax.load_adapter(out, params)
assert back.config == config
same = np.allclose(model.apply({"params": merged}, x), forward(params, back, x), atol=1e-5)
print("ok", same, float(metrics["loss"]) > 0, sorted(m for m, mod in sys.modules.items() if m.split(".")[0] == "torch" and mod is not None))
'''


def test_lora_jax_core_runs_without_torch():
    done = subprocess.run([sys.executable, "-c", CORE_WITHOUT_TORCH], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "ok True True []"


def test_lora_jax_core_tests_need_no_torch():
    core_tests = [f"tests/lora_jax/{name}" for name in (
        "test_adapter.py", "test_config.py", "test_lora_tree.py", "test_partition.py", "test_initialize.py",
        "test_merge.py", "test_targets.py")]
    code = NO_TORCH + f"import pytest\nsys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', *{core_tests!r}]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout and "error" not in done.stdout.lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the tracked sources, so no build/ directory from an earlier build can
    # add stale modules, and the checkout stays clean.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    # No build isolation and no dependencies: the environment's setuptools builds it, offline and fast.
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("lora_parity-*.whl")
    return built


def test_wheel_holds_every_subpackage(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    expected = {str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("__init__.py")}
    assert expected <= set(names), sorted(expected - set(names))
    assert "parity/checks/__init__.py" in names and "lora_jax/training/__init__.py" in names


def test_installed_wheel_imports_and_runs_the_cli(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # Run from an empty directory with only the installed wheel ahead of the environment, so
    # neither the source tree nor the editable install can supply a missing module.
    env = dict(os.environ, PYTHONPATH=str(target))
    code = ("import lora_format, lora_jax, lora_torch, parity, parity.checks, lora_jax.training, lora_jax.gpt2, "
            "lora_jax.embedded\nprint(sorted({m.__file__.split('site')[0] for m in (lora_format, lora_jax, lora_torch, "
            "parity)}) == [" + repr(str(tmp_path) + os.sep) + "])")
    imported = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
    assert imported.stdout.strip() == "True", imported.stderr[-3000:]
    cli = subprocess.run([sys.executable, "-m", "parity", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "usage: python -m parity" in cli.stdout
