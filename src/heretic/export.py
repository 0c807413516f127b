"""Output: the merged model folder and heretic_metadata.json, written so a crash never leaves
half-written output (everything goes to a temporary sibling first, then is renamed into place).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from heretic.errors import ExportError

LIBRARIES = ("torch", "transformers", "optuna", "accelerate", "datasets", "pydantic-settings")


def heretic_version() -> str:
    try:
        return metadata.version("heretic")
    except metadata.PackageNotFoundError:
        return "unknown"


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _writable_parent(path: Path) -> Path:
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(
            f"Cannot create output folder {parent}: {e.strerror}. Fix --output-dir."
        ) from e
    if not os.access(parent, os.W_OK):
        raise ExportError(f"Output folder {parent} is not writable: fix --output-dir.")
    return parent


def _default_mode(directory: bool) -> int:
    """The permissions a normal mkdir/open would give under the current umask (mkdtemp and
    mkstemp create private 0700/0600 entries, which would surprise users sharing outputs)."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _replace(tmp: Path, final: Path) -> None:
    """Move tmp into final's place; an existing final is kept until the new one is in place."""
    backup = None
    if final.exists():
        backup = final.with_name(final.name + ".old")
        if backup.exists():
            shutil.rmtree(backup) if backup.is_dir() else backup.unlink()
        final.rename(backup)
    tmp.rename(final)
    if backup is not None:
        shutil.rmtree(backup) if backup.is_dir() else backup.unlink()


def save_model_folder(model: torch.nn.Module, tokenizer, path: Path) -> None:
    """save_pretrained (safetensors) + tokenizer into `path`, atomically."""
    parent = _writable_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    try:
        tmp.chmod(_default_mode(directory=True))
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(
            f"Saving the model to {path} failed ({e.strerror or e}); nothing was overwritten. "
            "Free disk space or choose another --output-dir."
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(data: Mapping[str, Any], path: Path) -> None:
    """Write JSON atomically (temporary file + rename)."""
    parent = _writable_parent(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, default=str)
            f.write("\n")
        os.chmod(tmp_name, _default_mode(directory=False))
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def build_metadata(
    *,
    source_model: str,
    trial_number: int,
    best_params: Mapping[str, Any],
    kl_divergence: float,
    refusal_count: int,
    base_refusal_count: int,
    n_bad_evaluation_prompts: int,
    n_trials: int,
    seed: int,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "source_model": source_model,
        "trial_number": trial_number,
        "best_params": dict(best_params),
        "kl_divergence": kl_divergence,
        "refusal_count": refusal_count,
        "base_refusal_count": base_refusal_count,
        "n_bad_evaluation_prompts": n_bad_evaluation_prompts,
        "n_trials": n_trials,
        "seed": seed,
        "heretic_version": heretic_version(),
        "library_versions": library_versions(),
        "settings": dict(settings),
    }
