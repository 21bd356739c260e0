#!/usr/bin/env bash
# Sets up .venv and runs the main job: GPT-2 + LoRA trained with optax on the embedded default.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec .venv/bin/python examples/train_gpt2_optax.py "$@"
