#!/usr/bin/env bash
# Creates .venv beside the repository root and installs lora-parity with its dev extras.
# torch is pinned first so pip takes the CPU wheel instead of pulling CUDA packages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip "setuptools>=77"
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev]"
