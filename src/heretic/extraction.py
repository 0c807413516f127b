"""Obtaining a run's refusal directions: given by the user, reused from the output folder, or
computed from the direction prompts' residuals (and saved for the next run or worker).

The cache key is `fingerprint.directions_key`; the exclusive lock on the output folder makes
local workers that start together compute them once.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from heretic.config import Settings
from heretic.directions import (
    DIRECTIONS_FILE,
    check_directions_shape,
    fit_readouts,
    load_direction_extras,
    load_directions,
    save_directions,
)
from heretic.errors import HereticError
from heretic.fingerprint import directions_differences, directions_metadata
from heretic.judges import MarkerJudge
from heretic.model import Model
from heretic.progress import step_progress, tracked
from heretic.refinements import READOUTS_KEY, DirectionSet, build_directions
from heretic.workers import exclusive_lock, pause_point


def obtain_directions(
    model: Model, prompts: dict, settings: Settings, batch_size: int, console: Console
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refusal directions and, with readout 'fitted', the fitted readouts (else None): from
    --directions, reused from the output folder, or computed.

    Computed directions are saved to OUTPUT_DIR/directions.safetensors (atomically) with the
    model's shape and the directions key (`fingerprint.directions_key`); a rerun or another
    worker with the same key loads them instead of extracting again. An exclusive lock on the
    output folder makes local workers that start together compute them once: the others wait,
    then load the file.
    """
    given = settings.directions is not None
    metadata = directions_metadata(settings, prompts, model.n_layers, model.hidden_size, given)
    if settings.directions is not None:
        directions, stored = load_directions(settings.directions)
        check_directions_shape(
            settings.directions, directions, stored, model.n_layers, model.hidden_size
        )
        for line in directions_differences(stored, metadata, given_file=True):
            console.print(f"[yellow]Warning:[/] --directions {escape(line)}", highlight=False)
        console.print(f"Using refusal directions from {settings.directions}")
        return directions, stored_readouts(settings.directions, settings)

    path = settings.output_dir / DIRECTIONS_FILE
    lock = settings.output_dir / ".directions.lock"
    with exclusive_lock(lock, lambda: console.print("Waiting for another worker's directions")):
        if path.exists():
            directions, stored = load_directions(path)
            check_directions_shape(path, directions, stored, model.n_layers, model.hidden_size)
            differences = directions_differences(stored, metadata)
            if not differences:
                console.print(f"Reusing refusal directions from {path}")
                return directions, stored_readouts(path, settings)
            console.print(
                escape(
                    f"{path} was made with other settings ({'; '.join(differences)}): recomputing"
                ),
                highlight=False,
            )
        direction_set = compute_directions(model, prompts, settings, batch_size, console)
        save_directions(path, direction_set.refusal, metadata, direction_set.extra_tensors())
        console.print(f"Saved refusal directions to {path}")
        return direction_set.refusal, direction_set.readouts


def stored_readouts(path: Path, settings: Settings) -> torch.Tensor | None:
    """The fitted readouts saved in a directions file, when readout 'fitted' needs them."""
    if settings.readout != "fitted":
        return None
    readouts = load_direction_extras(path).get(READOUTS_KEY)
    if readouts is None:
        raise HereticError(
            f"Directions file {path} holds no fitted readouts, which readout 'fitted' needs: "
            "let heretic compute the directions (drop --directions) or set readout to "
            "'direction'."
        )
    return readouts


def compute_directions(
    model: Model, prompts: dict, settings: Settings, batch_size: int, console: Console
) -> DirectionSet:
    """Residuals of the direction prompts -> refusal directions, refined as configured."""

    fitted = settings.readout == "fitted"
    module_outputs: dict[str, torch.Tensor] = {}

    def residuals_of(name: str, with_module_outputs: bool = False) -> torch.Tensor:
        with step_progress(console) as progress:
            task = progress.add_task(
                f"Residuals for {name}", total=len(prompts[name]), info="", unit="prompts"
            )

            def advance(n: int) -> None:
                progress.advance(task, n)

            if with_module_outputs:
                residuals, module_outputs[name] = model.residuals_and_module_outputs(
                    prompts[name], batch_size, advance
                )
            else:
                residuals = model.residuals(prompts[name], batch_size, advance)
        pause_point("extraction")
        if not torch.isfinite(residuals).all():
            raise HereticError(
                "The model produced NaN/inf activations: try --dtype float32 (or bfloat16)."
            )
        return residuals

    good = residuals_of("good_prompts", fitted)
    bad = residuals_of("bad_prompts", fitted)
    result = build_directions(
        good,
        bad,
        settings,
        residuals_of,
        lambda: _probe_labels(model, prompts["bad_prompts"], settings, batch_size, console),
        log=lambda line: console.print(f"  {escape(line)}", highlight=False),
        warn=lambda line: console.print(f"[yellow]Warning:[/] {escape(line)}", highlight=False),
    )
    if fitted:
        result.readouts, ridges = fit_readouts(
            module_outputs["good_prompts"],
            module_outputs["bad_prompts"],
            result.refusal,
            None if settings.readout_ridge_cv else settings.readout_ridge,
        )
        console.print(f"  fitted {ridges.numel()} readouts ({ridge_summary(ridges)})")
    return result


def ridge_summary(ridges: torch.Tensor) -> str:
    """The ridge penalties the readouts were fitted with, in a few words."""
    chosen = ridges[~ridges.isnan()]
    if len(chosen) == 0:
        return "no module writes anything"
    low, mid, high = (float(q) for q in chosen.quantile(torch.tensor([0.0, 0.5, 1.0])))
    if low == high:
        return f"ridge {low:g}"
    return f"ridge by leave-one-out cross-validation: median {mid:g}, {low:g} to {high:g}"


def _probe_labels(
    model: Model, bad: list[str], settings: Settings, batch_size: int, console: Console
) -> list[bool]:
    """Whether the original model refuses each bad direction prompt (the probes' labels)."""
    judge = MarkerJudge(tuple(settings.refusal_markers), settings.ignore_echoed_markers)
    console.print(
        f"  generating the original model's responses to the bad prompts "
        f"({settings.probe_response_length} tokens) to label the probes"
    )
    length = settings.probe_response_length
    chunks = model.refused_chunks(bad, length, batch_size, judge.is_refusal)
    return tracked(console, "Responses for the probes", bad, chunks)
