"""Output: the merged model folder and heretic_metadata.json, written so a crash never leaves
half-written output (everything goes to a temporary sibling first, then is renamed into place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from heretic.edit import TrialEdit
from heretic.errors import ExportError
from heretic.sites import EditSite

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


@contextlib.contextmanager
def staged_folder(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to fill; on success it replaces `path` whole.

    A crash, Ctrl-C or full disk leaves the previous `path` (if any) untouched and no
    temporary folder behind, so an output folder is always one complete export.
    """
    parent = _writable_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    try:
        tmp.chmod(_default_mode(directory=True))
        yield tmp
        _replace(tmp, path)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(
            f"Saving to {path} failed ({e.strerror or e}); nothing was overwritten. "
            "Free disk space or choose another --output-dir."
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model_folder(model: torch.nn.Module, tokenizer, path: Path) -> None:
    """save_pretrained (safetensors) + tokenizer into `path`, atomically."""
    with staged_folder(path) as tmp:
        write_model_files(model, tokenizer, tmp)


def write_model_files(model: torch.nn.Module, tokenizer, folder: Path, processor=None) -> None:
    """The merged model as transformers saves it (safetensors) plus the tokenizer, or the
    processor of a vision-language model (which holds the tokenizer too)."""
    model.save_pretrained(folder, safe_serialization=True)
    (processor or tokenizer).save_pretrained(folder)


def adapter_weights(
    sites: Sequence[EditSite], edit: TrialEdit
) -> tuple[dict[str, torch.Tensor], list[str], bool]:
    """The edit as rank-1 LoRA weights keyed the way PEFT saves them, the target modules, and
    whether the adapter needs LoRA biases.

    `W' = W - w a (b^T W)` (see `abliteration.row_edit`; a = b = r without row normalization)
    is `W + B A` with `A = b^T W` (1 x in) and `B = -w a` (out x 1), so with rank 1 and alpha 1
    (scale 1) PEFT reproduces the merged model exactly (b is the fitted readout where readouts
    are given). A writer's bias changes by `-w a (b . bias)`: PEFT's `lora_bias` adds exactly
    that as lora_B's bias. With "full" row normalization every row of `W + B A` is given back
    its original norm: that is exactly DoRA's `m * (W + B A) / |W + B A|_row` with the
    magnitude m = the original row norms, so the adapter is a rank-1 DoRA adapter
    (`lora_magnitude_vector`) and is exact too. A site that is not one linear layer (a
    mixture-of-experts block, fused 3-D expert tensors) cannot be expressed by PEFT's LoRA:
    that is an error naming the module, never a silent skip.
    """
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    uses_bias = False
    for site in sites:
        row = edit.row_edit(site)
        if row is None:
            continue
        if not site.is_linear:
            raise ExportError(
                f"{site.describe()} is edited as a whole block (mixture of experts), which a "
                "PEFT LoRA adapter cannot express: use --export model (merged safetensors)."
            )
        module = site.module
        w = module.weight.detach().float()
        row = row.to(w.device)
        prefix = f"base_model.model.{site.name}"
        tensors[f"{prefix}.lora_A.weight"] = (row.b @ w).unsqueeze(0).cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = (-row.weight * row.a).unsqueeze(1).cpu()
        if module.bias is not None:
            if edit.mode(site) == "full":
                raise ExportError(
                    f"{site.describe()} has a bias, which a DoRA adapter cannot edit exactly: "
                    "use --export model (merged safetensors) or row_normalization pre/none."
                )
            bias = module.bias.detach().float()
            tensors[f"{prefix}.lora_B.bias"] = (-row.weight * row.a * (row.b @ bias)).cpu()
            uses_bias = True
        if edit.mode(site) == "full":
            tensors[f"{prefix}.lora_magnitude_vector"] = w.norm(dim=1).cpu()
        targets.append(site.name)
    if not targets:
        raise ExportError(
            "The chosen trial edits nothing (every strength is 0), so there is no adapter to "
            "save: choose another trial."
        )
    return tensors, targets, uses_bias


def write_adapter_files(
    sites: Sequence[EditSite],
    edit: TrialEdit,
    base_model: str,
    folder: Path,
) -> list[str]:
    """adapter_config.json + adapter_model.safetensors in PEFT's format (PEFT itself is not
    needed to write them, only to load them); returns the target module names."""
    from safetensors.torch import save_file

    tensors, targets, uses_bias = adapter_weights(sites, edit)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "bias": "none",
        "lora_bias": uses_bias,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": edit.row_normalization == "full",
        "init_lora_weights": True,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(folder / "adapter_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return targets


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
