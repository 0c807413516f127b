#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, then the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --tests
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q --durations=25 "$@"
ruff check src tests benchmarks demo
