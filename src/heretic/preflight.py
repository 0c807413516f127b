"""Check what can be checked on this machine before anything touches the network.

A run reaches the network for hub prompt sets and a hub model, and without network (or with an
unreachable hub) that first contact fails with a message about the hub: a user who mistyped the
model folder or gave an empty prompt file would then be told about a dataset download instead of
their own mistake. So everything local and cheap is checked first, each failure naming the input
to fix: the model argument (an existing folder or .gguf file, or the form of a hub id), a
--directions file, the benchmark tasks (their names, task folders and local data), every local
prompt file (loaded whole: they are small) and the ids and splits of the hub prompt sets. Only
then are the hub sets downloaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from heretic.capability import check_benchmarks
from heretic.checks import check_prompt_count
from heretic.config import DatasetSpecification, Settings
from heretic.errors import DirectionsError, ModelLoadError
from heretic.model import resolve_source
from heretic.prompts import check_hub_spec, is_local, load_prompts


def check_model_argument(model: str, gguf_file: str | None, option: str = "--model") -> None:
    """A local model must exist; anything else must at least look like a hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    source = resolve_source(model, gguf_file, option)
    if Path(source.path).exists():
        return
    try:
        validate_repo_id(source.path)
    except HFValidationError as exc:
        raise ModelLoadError(
            f"{option} {model!r} is neither an existing model folder or .gguf file nor a "
            f"Hugging Face model id ({exc}). Fix {option}."
        ) from exc


def check_directions_file(path: Path | None) -> None:
    """A given directions file is read only after the model loads; its absence is known now."""
    if path is not None and not path.is_file():
        raise DirectionsError(f"Directions file {path} does not exist: fix --directions.")


def load_prompt_sets(settings: Settings, names: Sequence[str]) -> dict[str, list[str]]:
    """Load the named prompt sets, local files first, then the hub ones; in `names` order.

    Each set is checked against its split's size as soon as it is loaded, and every hub set's
    id and split are checked before the first download.
    """
    specs: dict[str, DatasetSpecification] = {name: getattr(settings, name) for name in names}
    local = [name for name, spec in specs.items() if is_local(spec.dataset)]
    hub = [name for name in names if name not in local]
    loaded: dict[str, list[str]] = {}
    for name in local:
        loaded[name] = _load_checked(specs[name], name)
    for name in hub:
        check_hub_spec(specs[name], name)
    for name in hub:
        loaded[name] = _load_checked(specs[name], name)
    return {name: loaded[name] for name in names}


def _load_checked(spec: DatasetSpecification, name: str) -> list[str]:
    prompts = load_prompts(spec, name)
    check_prompt_count(spec, prompts, name)
    return prompts


def check_local_inputs(settings: Settings) -> None:
    """The model argument, the --directions file, the judge model's argument and the benchmark
    tasks (names, folders, local data), before the prompt sets load."""
    check_model_argument(settings.model, settings.gguf_file)
    check_directions_file(settings.directions)
    if settings.refusal_judge == "model" and settings.judge_model:
        check_model_argument(settings.judge_model, None, "--judge-model")
    check_benchmarks(settings)
