"""Output: the merged model folder, the adapter files and heretic_metadata.json, written so a
crash never leaves half-written output (through `atomic`: a temporary sibling first, then a
rename into place).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from heretic.atomic import atomic_file, staged_folder
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


def save_model_folder(model: torch.nn.Module, tokenizer, path: Path) -> None:
    """save_pretrained (safetensors) + tokenizer into `path`, atomically."""
    with staged_folder(path, "the model") as tmp:
        write_model_files(model, tokenizer, tmp)


def write_model_files(model: torch.nn.Module, tokenizer, folder: Path, processor=None) -> None:
    """The merged model as transformers saves it (safetensors) plus the tokenizer, or the
    processor of a vision-language model (which holds the tokenizer too)."""
    model.save_pretrained(folder, safe_serialization=True)
    (processor or tokenizer).save_pretrained(folder)


def adapter_weights(
    sites: Iterable[EditSite], edit: TrialEdit
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

    W and the bias are read from the sites' tensors (`WriterTensor.value`), so a model searched
    in 4/8 bits passes sites holding the checkpoint's full-precision tensors
    (`shard_edits.stored_sites`): the adapter is applied to those.
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
        w = site.weights[0].value().float()
        bias = site.biases[0].value().float() if site.biases else None
        row = row.to(w.device)
        prefix = f"base_model.model.{site.name}"
        tensors[f"{prefix}.lora_A.weight"] = (row.b @ w).unsqueeze(0).cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = (-row.weight * row.a).unsqueeze(1).cpu()
        if bias is not None:
            if edit.mode(site) == "full":
                raise ExportError(
                    f"{site.describe()} has a bias, which a DoRA adapter cannot edit exactly: "
                    "use --export model (merged safetensors) or row_normalization pre/none."
                )
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
    sites: Iterable[EditSite],
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
    """Write JSON atomically (see `atomic.atomic_file`)."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")


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
