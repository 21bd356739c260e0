#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite on CPU, in two pytest-xdist workers (one per CI core; each test
# file stays on one worker, so module fixtures are built once). PYTEST_WORKERS=0 runs it in one process.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
