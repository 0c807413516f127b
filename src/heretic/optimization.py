"""The search: an Optuna multi-objective study over edit parameters, minimizing (KL, refusals).

The study lives in `storage` (SQLite by default), so running the same command again resumes it:
finished trials are kept, and only the missing ones up to `n_trials` run. The objective is a
plain function of the parameters; everything model-specific comes in as a callable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from heretic.abliteration import ComponentParams
from heretic.errors import StudyError
from heretic.evaluation import Score
from heretic.model import COMPONENTS

KL_ATTR = "kl_divergence"
REFUSALS_ATTR = "refusals"


@dataclass(frozen=True)
class SearchSpace:
    """Bounds of the design's per-component parameters."""

    min_weight: float = 0.0
    max_weight: float = 1.5

    def suggest(self, trial: optuna.Trial) -> dict[str, ComponentParams]:
        params = {}
        for component in COMPONENTS:
            # layer_max is sampled as a span above layer_min, so every sample is a valid range.
            layer_min = trial.suggest_float(f"{component}.layer_min", 0.0, 1.0)
            span = trial.suggest_float(f"{component}.layer_span", 0.0, 1.0)
            weight = trial.suggest_float(f"{component}.weight", self.min_weight, self.max_weight)
            params[component] = ComponentParams(layer_min, min(1.0, layer_min + span), weight)
        return params


def params_from_trial(trial: FrozenTrial) -> dict[str, ComponentParams]:
    """Rebuild the edit parameters a finished trial was scored with."""
    p = trial.params
    return {
        c: ComponentParams(
            p[f"{c}.layer_min"],
            min(1.0, p[f"{c}.layer_min"] + p[f"{c}.layer_span"]),
            p[f"{c}.weight"],
        )
        for c in COMPONENTS
    }


def open_study(storage: str, study_name: str, seed: int, n_startup_trials: int) -> optuna.Study:
    """Create the study or load it from storage to resume.

    The sampler's seed is offset by the number of trials already in the study, so a resumed run
    does not replay the random startup samples of the first run.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        existing = optuna.load_study(study_name=study_name, storage=storage)
        n_existing = len(existing.trials)
    except KeyError:
        n_existing = 0
    except Exception as e:  # storage unreachable, bad URL, unreadable file
        raise StudyError(f"Cannot open study storage {storage}: {e}") from e
    sampler = optuna.samplers.TPESampler(
        seed=seed + n_existing,
        n_startup_trials=n_startup_trials,
        multivariate=True,
    )
    try:
        return optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            directions=["minimize", "minimize"],
            load_if_exists=True,
        )
    except ValueError as e:
        raise StudyError(
            f"Study '{study_name}' in {storage} is not a (KL, refusals) heretic study: {e}. "
            "Use another --study-name or --storage."
        ) from e


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def run_search(
    study: optuna.Study,
    n_trials: int,
    space: SearchSpace,
    score: Callable[[dict[str, ComponentParams]], Score],
    on_trial: Callable[[FrozenTrial, int], None] | None = None,
) -> int:
    """Run trials until the study holds `n_trials` finished ones; returns how many ran now."""
    ran = 0
    while len(finished_trials(study)) < n_trials:
        trial = study.ask()
        params = space.suggest(trial)
        try:
            result = score(params)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        if not math.isfinite(result.kl_divergence):
            study.tell(trial, state=TrialState.FAIL)
            raise StudyError(
                f"Trial {trial.number} gave a non-finite KL divergence ({result.kl_divergence}): "
                "the model produces NaN/inf; try --dtype float32."
            )
        trial.set_user_attr(KL_ATTR, result.kl_divergence)
        trial.set_user_attr(REFUSALS_ATTR, result.refusals)
        frozen = study.tell(trial, [result.kl_divergence, float(result.refusals)])
        ran += 1
        if on_trial is not None:
            on_trial(frozen, len(finished_trials(study)))
    return ran


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Non-dominated finished trials, sorted by refusals then KL."""
    return sorted(study.best_trials, key=lambda t: (t.values[1], t.values[0]))


def best_trial(front: list[FrozenTrial], base_refusals: int) -> FrozenTrial:
    """The front trial nearest the origin, with refusals scaled by the base refusal count."""
    if not front:
        raise StudyError("The study has no finished trials to choose from.")
    scale = max(base_refusals, 1)
    return min(front, key=lambda t: math.hypot(t.values[0], t.values[1] / scale))


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    for t in finished_trials(study):
        if t.number == number:
            return t
    numbers = ", ".join(str(t.number) for t in finished_trials(study)) or "none"
    raise StudyError(f"Trial {number} is not a finished trial of this study (finished: {numbers}).")
