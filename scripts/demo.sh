#!/usr/bin/env bash
# Set up (if needed) and run the offline demo: build a small refusing model, abliterate it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m heretic.demo "$@"
