"""The curated package namespace: every exported name resolves, and the core loads without the extras."""

import subprocess
import sys

import lora_jax


def test_every_exported_name_resolves():
    missing = [name for name in lora_jax.__all__ if getattr(lora_jax, name, None) is None]
    assert missing == []
    assert lora_jax.save_adapter.__module__ == "lora_jax.peft_format"
    assert lora_jax.GPT2.__module__ == "lora_jax.gpt2.model"
    assert lora_jax.shard_train_step.__module__ == "lora_jax.training.sharding"


def test_import_does_not_load_lazy_modules():
    code = "import sys, lora_jax; print(sorted(m for m in ('lora_jax.embedded.base', 'lora_jax.gpt2.generation', 'lora_jax.peft_format', 'lora_jax.training.sharding') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
