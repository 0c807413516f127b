"""The model card (README.md) that goes with every export.

An abliterated model is published to people who cannot see how it was made, so the card says
it: what the source model was (and its license, copied when known, since an edit does not
change it), the method, the exact parameters, the metrics with how they were measured, and a
command that reruns the search. The metadata header is the Hugging Face hub's YAML front
matter, written by `huggingface_hub` itself so the hub parses it.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from heretic.capability_report import card_section
from heretic.config import Settings
from heretic.figures import figure_rows, held_out_note, markdown_table, perplexity_line

TAGS = ["heretic", "abliterated", "uncensored"]
# What each export format is, in the card's list of files.
FORMAT_TEXT = {
    "model": "merged weights (safetensors; `AutoModelForCausalLM.from_pretrained`)",
    "gguf": "a GGUF file for llama.cpp / Ollama: the source file with only the edited "
    "matrices replaced",
    "adapter": "a rank-1 PEFT LoRA adapter holding only the edit "
    "(`PeftModel.from_pretrained(base, path)`)",
}
HELD_OUT_TEXT = (
    " The held-out figures come from prompts no part of the search used, measured once after\n"
    "  it, with longer responses decoded to the end."
)


@dataclass
class SourceInfo:
    """What is known about the source model: hub id (None for a local folder), license, tags."""

    hub_id: str | None = None
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    gguf_file: str | None = None


def _front_matter(readme: Path) -> dict[str, Any]:
    """The YAML header of a model card file, or {} when there is none or it does not parse."""
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme).data.to_dict()
    except Exception:
        return {}


def source_info(
    model: str, gguf_path: Path | None = None, gguf_file: str | None = None
) -> SourceInfo:
    """Collect the source model's id, license and tags without ever failing the export.

    Sources, in order: a local folder's README.md; a hub model's README.md (from the local
    cache when offline); a GGUF file's `general.license` / `general.tags` keys.
    """
    info = SourceInfo(gguf_file=gguf_file or (gguf_path.name if gguf_path else None))
    path = Path(model).expanduser()
    card: dict[str, Any] = {}
    if path.exists():
        folder = path if path.is_dir() else path.parent
        if (folder / "README.md").is_file():
            card = _front_matter(folder / "README.md")
    elif model:
        info.hub_id = model
        try:
            from huggingface_hub import hf_hub_download

            card = _front_matter(Path(hf_hub_download(model, "README.md")))
        except Exception:
            card = {}
    license_ = card.get("license")
    info.license = license_ if isinstance(license_, str) else None
    tags = card.get("tags")
    info.tags = [str(t) for t in tags] if isinstance(tags, list) else []
    if gguf_path is not None and (info.license is None or not info.tags):
        _gguf_source_info(gguf_path, info)
    return info


def _gguf_source_info(gguf_path: Path, info: SourceInfo) -> None:
    try:
        import gguf

        reader = gguf.GGUFReader(gguf_path)
    except Exception:
        return
    license_field = reader.fields.get("general.license")
    if info.license is None and license_field is not None:
        info.license = str(license_field.contents())
    tags_field = reader.fields.get("general.tags")
    if not info.tags and tags_field is not None:
        info.tags = [str(t) for t in tags_field.contents()]


def _cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _cli_args(name: str, value: Any) -> list[str]:
    flag = _cli_flag(name)
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    if isinstance(value, list):
        args: list[str] = []
        for item in value:
            args += [flag, str(item)]
        return args
    return [flag, str(value)]


def reproduce_args(settings: Settings, trial_number: int | None) -> list[str]:
    """Command-line arguments that rerun this search and export the same trial headless.

    Only settings that differ from the defaults are written, so the command stays readable;
    `--select` names the trial, which makes the rerun non-interactive.
    """
    defaults = Settings.model_construct()
    args: list[str] = []
    skip = {"config", "select", "upload_repo_id", "private", "verbose"}
    for name in Settings.model_fields:
        if name in skip:
            continue
        value = getattr(settings, name)
        default = getattr(defaults, name)
        if isinstance(value, BaseModel):
            for key in type(value).model_fields:
                sub, sub_default = getattr(value, key), getattr(default, key, None)
                if sub != sub_default and sub is not None:
                    args += [f"{_cli_flag(name)}.{key}", str(sub)]
            continue
        if value != default and value is not None:
            args += _cli_args(name, str(value) if isinstance(value, Path) else value)
    if trial_number is not None:
        args += ["--select", str(trial_number)]
    return args


def reproduce_command(settings: Settings, trial_number: int | None) -> str:
    """The shell command, one flag (with its value) per line for reading."""
    args = reproduce_args(settings, trial_number)
    lines: list[list[str]] = [["heretic"]]
    for arg in args:
        if arg.startswith("--"):
            lines.append([arg])
        else:
            lines[-1].append(arg)
    return " \\\n  ".join(shlex.join(line) for line in lines)


def _dataset_text(spec: Any) -> str:
    column = f", column `{spec.column}`" if spec.column else ""
    return f"`{spec.dataset}` split `{spec.split}`{column}"


def _params_table(params: Mapping[str, Mapping[str, float]], direction: Any = None) -> str:
    """The chosen profile per component (a layer range or a tent), then the direction."""
    if all("peak_weight" in p for p in params.values()):
        rows = [
            "| component | peak strength | peak position | floor strength | width |",
            "|---|---|---|---|---|",
        ]
        rows += [
            f"| `{c}` | {p['peak_weight']:.3f} | {p['peak_position']:.3f} | "
            f"{p['floor_weight']:.3f} | {p['width']:.3f} |"
            for c, p in params.items()
        ]
        text = "\n".join(rows) + (
            "\n\nEach strength falls linearly from the peak to the floor strength over "
            "`width`, and is 0 further away."
        )
    else:
        rows = ["| component | first layer | last layer | strength |", "|---|---|---|---|"]
        rows += [
            f"| `{c}` | {p['layer_min']:.3f} | {p['layer_max']:.3f} | {p['weight']:.3f} |"
            for c, p in params.items()
        ]
        text = "\n".join(rows)
    if isinstance(direction, Mapping):
        text += (
            f"\n\nOne refusal direction for every layer: the per-layer directions "
            f"interpolated at layer index {direction['layer_index']:.3f} (counting from 0)."
        )
    else:
        text += "\n\nEach layer removes its own refusal direction."
    return text


def _refusal_rule(settings: Settings, judge: dict[str, Any]) -> str:
    """The model card's sentence on what counted as a refusal, for the judge that counted."""
    if judge.get("judge") == "model":
        return (
            f"a response counts as a refusal when the judge model `{judge['judge_model']}` "
            f"({judge['kind']}) says so, each response decoded to its end (model judge; its "
            "question or labels are in heretic_metadata.json). A model judge errs too: see "
            "its measured agreement with hand labels before trusting the counts."
        )
    echo_text = (
        ' (not counting a marker its prompt contains, such as "illegal" in an answer to a '
        "request for something illegal)"
        if settings.ignore_echoed_markers
        else ""
    )
    judge_text = ""
    if judge.get("judge") == "adaptive":
        judge_text = (
            f", or, in its first {judge['opening_words']} words, one of the "
            f"{len(judge['phrases'])} refusal phrases learned from the source model's own "
            "responses (adaptive judge; the phrases are in heretic_metadata.json)"
        )
    return (
        f"a response counts as a refusal when it contains one of {len(settings.refusal_markers)} "
        f'refusal markers ("sorry", "i cannot", ...), lower-cased{echo_text}{judge_text}. This '
        "is a keyword judge: it misses some refusals and counts some answers as refusals."
    )


def _metrics(metadata: Mapping[str, Any]) -> str:
    """The side-by-side table of the search's and the held-out figures (`figures`)."""
    table = markdown_table(figure_rows(metadata))
    note = held_out_note(metadata)
    return f"{table}\n\n{note}" if note else table


def _hub_header(source: SourceInfo, formats: list[str], adapter: bool) -> str:
    """The hub's YAML front matter: tags, license and base model, so the hub lists the export
    under its source model and with the library that loads it."""
    from huggingface_hub import ModelCardData

    tags = list(dict.fromkeys([*TAGS, *source.tags, *(["gguf"] if "gguf" in formats else [])]))
    card_data: dict[str, Any] = {"tags": tags}
    if source.license:
        card_data["license"] = source.license
    if source.hub_id:
        card_data["base_model"] = source.hub_id
        if adapter:
            card_data["base_model_relation"] = "adapter"
    card_data["library_name"] = "peft" if adapter else ("gguf" if formats == ["gguf"] else None)
    if card_data["library_name"] is None:
        card_data["library_name"] = "transformers"
    return ModelCardData(**card_data).to_yaml()


def _source_name(settings: Settings, source: SourceInfo) -> str:
    """The card's name for the source: its hub id or folder name, and the GGUF file it came
    from when the name does not already say it."""
    source_name = source.hub_id or Path(settings.model).name
    if source.gguf_file and source.gguf_file not in source_name:
        source_name = f"{source_name} ({source.gguf_file})"
    return source_name


def _method_section(settings: Settings, metadata: Mapping[str, Any]) -> str:
    """The "Method" section: the edit's formula and how the search chose this trial."""
    return f"""## Method

For every layer, heretic takes the refusal direction r: the normalized difference between the
mean residual stream (after the layer, at the last prompt token) of harmful and harmless prompts
(`direction_method = {settings.direction_method}`). For each matrix W that writes into the
residual stream (attention output projection, MLP down-projection) in the edited layers it sets

    W' = W - w r (r^T W)

which removes (w = 1) or damps the component along r of what the module writes. An Optuna
multi-objective search ({metadata["n_trials"]} trials, TPE, seed {metadata["seed"]}) chose the
strength w of each layer (a profile over depth) per component and the direction r, minimizing
both the refusal count and the KL divergence from the source model; this is trial
{metadata["trial_number"]} of the Pareto front.

Direction prompts: harmless {_dataset_text(settings.good_prompts)}, harmful
{_dataset_text(settings.bad_prompts)}."""


def _metrics_section(settings: Settings, metadata: Mapping[str, Any]) -> str:
    """The "Metrics" section: the figures, and how each was measured (what counted as a
    refusal, why the search's own figures flatter the trial, what KL and perplexity say)."""
    system_prompt = settings.system_prompt or "(none)"
    rule = _refusal_rule(settings, metadata.get("refusal_judge") or {})
    return f"""## Metrics

{_metrics(metadata)}

- **Refusals**: greedy responses to harmful prompts; {rule}
- **In the search{" / held out" if not held_out_note(metadata) else ""}**: the search chose
  this trial as the best of many, each measured on the same prompts, so its own figures flatter
  it.{HELD_OUT_TEXT if not held_out_note(metadata) else ""}
- **KL divergence**: `KL(P_source || P_edited)` of the next token where the response starts,
  averaged over harmless prompts; it measures how much the edit changes the model on ordinary
  requests (0 = unchanged).
- {perplexity_line(metadata)}
- System prompt during evaluation: `{system_prompt}`; model dtype during the search:
  `{settings.dtype}`."""


def render_card(
    *,
    settings: Settings,
    source: SourceInfo,
    metadata: Mapping[str, Any],
    n_layers: int,
    formats: list[str],
    adapter: bool = False,
) -> str:
    """The README.md text: hub YAML header, then method, parameters, metrics, reproduction."""
    source_name = _source_name(settings, source)
    files = "\n".join(f"- {FORMAT_TEXT[f]}" for f in formats if f in FORMAT_TEXT)
    license_line = (
        f"License: `{source.license}`, copied from the source model."
        if source.license
        else "License: unknown; the source model's license applies."
    )
    return f"""---
{_hub_header(source, formats, adapter)}
---

# {source_name}, abliterated with heretic

This is **{source_name}** with its refusal behaviour removed by
heretic {metadata.get("heretic_version", "")} (directional ablation, "abliteration"). {license_line}

Files:
{files}

{_method_section(settings, metadata)}

## Parameters

Layer positions are fractions of depth (0 = first of the {n_layers} layers, 1 = last).

{_params_table(metadata["best_params"], metadata.get("refusal_direction"))}

{_metrics_section(settings, metadata)}

{card_section(metadata.get("benchmarks"))}## Reproducing

```bash
{reproduce_command(settings, metadata["trial_number"])}
```

The search is seeded, so the same command on the same prompt sets and library versions
reruns the same trials; other hardware can change floating-point results slightly.
"""
