"""The search: an Optuna multi-objective study over edit parameters, minimizing (KL, refusals).

The study lives in `storage` (SQLite by default), so running the same command again resumes it:
finished trials are kept, and only the missing ones up to `n_trials` run. The objective is a
plain function of the parameters; everything model-specific comes in as a callable.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import optuna
from optuna.trial import FrozenTrial, TrialState

from heretic.abliteration import ComponentParams, EditParams, LayerProfile, TentParams
from heretic.errors import StudyError
from heretic.evaluation import Score
from heretic.sites import ATTN, COMPONENTS, MLP
from heretic.workers import (
    DEFAULT_HEARTBEAT_INTERVAL,
    Heartbeat,
    claim_trial,
    claimed_count,
    make_storage,
    redact,
)

KL_ATTR = "kl_divergence"
REFUSALS_ATTR = "refusals"
OBJECTIVES = (KL_ATTR, REFUSALS_ATTR)
"""The study's objectives (both minimized, and the study's metric names), in the order Optuna
keeps a trial's values; `objectives` reads them."""


OPENINGS_ATTR = "refusal_openings"
"""Trial user attribute (with `refusal_openings`): the openings part of the refusal objective
(`evaluation.Score.openings`)."""


class Objectives(NamedTuple):
    kl_divergence: float
    refusals: int
    openings: float = 0.0
    """The margin the refusal objective adds to the count (0 without `refusal_openings`)."""

    @property
    def refusal_objective(self) -> float:
        """What the search minimizes besides the KL divergence: the count plus the openings."""
        return self.refusals + self.openings


def objectives(trial: FrozenTrial) -> Objectives:
    """A scored trial's KL divergence, refusal count and openings: the one reader of
    `trial.values`. The study's refusal objective is the count plus the openings; the count is
    also kept as a user attribute (an objective is the count alone in studies without it)."""
    kl_divergence, objective = trial.values
    refusals = int(trial.user_attrs.get(REFUSALS_ATTR, round(objective)))
    return Objectives(float(kl_divergence), refusals, float(objective) - refusals)


LAYER_PROFILES = ("range", "tent")
"""`search_space` values: how strength varies over depth (see `abliteration`)."""
DIRECTION_SCOPES = ("per_layer", "global", "search")
"""`direction_scope` values: each layer's own direction, one interpolated global direction, or
a per-trial choice between the two."""
DEFAULT_LAYER_PROFILE = "range"
DEFAULT_DIRECTION_SCOPE = "per_layer"
"""The defaults, chosen by measurement (docs/quality.md): on the organism at 20
trials the range space with per-layer directions was measured at least as good as upstream's
front; the tent with a global direction could not be measured at the full budget in time."""

TENT_PEAK_MIN = 0.8
"""Smallest tent peak searched (unless max_weight is lower): weaker peaks left most refusals in
place on every model measured, so random startup trials there are wasted."""
TENT_PEAK_POSITION = (0.6, 1.0)
TENT_MAX_WIDTH = 0.6
DIRECTION_POSITION = (0.4, 0.9)
"""Ranges (fractions of depth) for the tent's peak, its width and the global direction's layer:
refusal is told apart best a little past the middle of the stack (Arditi et al. 2024,
arXiv:2406.11717); upstream Heretic searches the same ranges."""


PROFILE_PARAMS: dict[str, tuple[str, ...]] = {
    "tent": ("peak_weight", "peak_position", "floor_fraction", "width"),
    "range": ("layer_min", "layer_span", "weight"),
}
"""Each layer profile's Optuna parameters per component (named `COMPONENT.PARAM`), in the
order they are sampled. `SearchSpace.bounds` gives their ranges and `decode_profile` the
profile they stand for: the three places that know a parameter's name."""
DIRECTION_SCOPE_PARAM = "direction_scope"
DIRECTION_INDEX_PARAM = "direction_index"


def param_name(component: str, param: str) -> str:
    return f"{component}.{param}"


def decode_profile(layer_profile: str, values: Mapping[str, float]) -> LayerProfile:
    """One component's profile from its parameters (`PROFILE_PARAMS`, without the prefix).

    The tent's floor is sampled as a fraction of its peak and the range's end as a span above
    its start, so that every sample is valid under multivariate TPE (which cannot handle
    bounds that depend on other parameters)."""
    if layer_profile == "tent":
        peak = values["peak_weight"]
        return TentParams(
            peak, values["peak_position"], values["floor_fraction"] * peak, values["width"]
        )
    start = values["layer_min"]
    return ComponentParams(start, min(1.0, start + values["layer_span"]), values["weight"])


@dataclass(frozen=True)
class SearchSpace:
    """What a trial samples: a strength profile per component and the direction it removes.

    `layer_profile` "range": the design's `layer_min`, `layer_span` (layer_max = min + span) and
    `weight` in [min_weight, max_weight]. "tent": `peak_weight`, `peak_position`,
    `floor_fraction` (floor weight / peak weight, so every sample is valid under multivariate
    TPE, which cannot handle bounds that depend on other parameters) and `width`.
    `direction_scope` "global" samples `direction_index` (a fractional layer); "search" also
    samples `direction_scope` per trial, and samples `direction_index` even for per-layer
    trials, again for multivariate TPE's sake. `n_layers` sets the index's range.
    """

    min_weight: float = 0.0
    max_weight: float = 2.5
    layer_profile: str = DEFAULT_LAYER_PROFILE
    direction_scope: str = DEFAULT_DIRECTION_SCOPE
    n_layers: int = 0

    def __post_init__(self) -> None:
        if self.layer_profile not in LAYER_PROFILES:
            raise ValueError(
                f"unknown search space {self.layer_profile!r} (choose from {LAYER_PROFILES})"
            )
        if self.direction_scope not in DIRECTION_SCOPES:
            raise ValueError(
                f"unknown direction scope {self.direction_scope!r} (choose from {DIRECTION_SCOPES})"
            )
        if self.direction_scope != "per_layer" and self.n_layers < 2:
            raise ValueError(
                f"direction scope {self.direction_scope!r} needs the model's layer count "
                f"(n_layers >= 2, got {self.n_layers})"
            )

    @property
    def peak_bounds(self) -> tuple[float, float]:
        low = max(self.min_weight, TENT_PEAK_MIN) if self.max_weight > TENT_PEAK_MIN else 0.0
        return low, self.max_weight

    @property
    def width_bounds(self) -> tuple[float, float]:
        # At least one layer's spacing, so a tent always reaches a layer next to its peak.
        one_layer = 1.0 / (self.n_layers - 1) if self.n_layers > 1 else 0.05
        return min(one_layer, TENT_MAX_WIDTH), TENT_MAX_WIDTH

    @property
    def direction_bounds(self) -> tuple[float, float]:
        last = self.n_layers - 1
        return DIRECTION_POSITION[0] * last, DIRECTION_POSITION[1] * last

    def component_bounds(self) -> dict[str, tuple[float, float]]:
        """Each profile parameter's range (without the component prefix), in sampling order."""
        if self.layer_profile == "tent":
            ranges = (self.peak_bounds, TENT_PEAK_POSITION, (0.0, 1.0), self.width_bounds)
        else:
            ranges = ((0.0, 1.0), (0.0, 1.0), (self.min_weight, self.max_weight))
        return dict(zip(PROFILE_PARAMS[self.layer_profile], ranges, strict=True))

    def bounds(self) -> dict[str, tuple[float, float]]:
        """Every float parameter a trial in this space samples, with its range."""
        per_component = self.component_bounds()
        bounds = {
            param_name(c, name): range_
            for c in COMPONENTS
            for name, range_ in per_component.items()
        }
        if self.direction_scope != "per_layer":
            bounds[DIRECTION_INDEX_PARAM] = self.direction_bounds
        return bounds

    def suggest(self, trial: optuna.Trial) -> EditParams:
        components: dict[str, LayerProfile] = {}
        for c in COMPONENTS:
            values = {
                name: trial.suggest_float(param_name(c, name), *range_)
                for name, range_ in self.component_bounds().items()
            }
            components[c] = decode_profile(self.layer_profile, values)
        index = None
        if self.direction_scope != "per_layer":
            scope = "global"
            if self.direction_scope == "search":
                scope = trial.suggest_categorical(DIRECTION_SCOPE_PARAM, ["global", "per_layer"])
            index = trial.suggest_float(DIRECTION_INDEX_PARAM, *self.direction_bounds)
            if scope == "per_layer":
                index = None
        return EditParams(components, index)

    def trial_params(self, profile: WarmStart) -> dict[str, Any] | None:
        """The Optuna parameters of a warm-start profile in this space, or None when the
        profile belongs to another space or falls outside this one's bounds."""
        if profile.layer_profile != self.layer_profile:
            return None
        if (profile.direction_position is None) != (self.direction_scope == "per_layer"):
            if self.direction_scope != "search":
                return None
        params: dict[str, Any] = {
            param_name(c, name): value
            for c in COMPONENTS
            for name, value in profile.components[c].items()
        }
        bounds = self.bounds()
        if self.direction_scope != "per_layer":
            position = profile.direction_position
            if self.direction_scope == "search":
                params[DIRECTION_SCOPE_PARAM] = "per_layer" if position is None else "global"
            if position is None:  # per-layer trial in a "search" space: any valid index
                position = sum(DIRECTION_POSITION) / 2
            params[DIRECTION_INDEX_PARAM] = position * (self.n_layers - 1)
        if set(params) - {DIRECTION_SCOPE_PARAM} != set(bounds):
            return None
        for name, (low, high) in bounds.items():
            if not low - 1e-9 <= params[name] <= high + 1e-9:
                return None
        return params


def params_from_trial(trial: FrozenTrial) -> EditParams:
    """Rebuild the edit parameters a finished trial was scored with (from its parameter names,
    so a study remembers its own space whatever the current settings say)."""
    p = trial.params
    layer_profile = next(
        (lp for lp, names in PROFILE_PARAMS.items() if param_name(COMPONENTS[0], names[0]) in p),
        None,
    )
    if layer_profile is None:
        raise StudyError(
            f"Trial {trial.number} has none of heretic's edit parameters ({', '.join(p)}): the "
            "study was not made by heretic; use another --study-name or --storage."
        )
    components = {
        c: decode_profile(
            layer_profile, {name: p[param_name(c, name)] for name in PROFILE_PARAMS[layer_profile]}
        )
        for c in COMPONENTS
    }
    index = p.get(DIRECTION_INDEX_PARAM)
    if p.get(DIRECTION_SCOPE_PARAM, "global") != "global":
        index = None
    return EditParams(components, index)


@dataclass(frozen=True)
class WarmStart:
    """A known-good trial for a model family, in depth fractions (so it fits any depth).

    `components` maps each component to its Optuna parameters without the component prefix
    (tent: peak_weight, peak_position, floor_fraction, width; range: layer_min, layer_span,
    weight); `direction_position` is the global direction's layer as a fraction of depth, or
    None for per-layer directions. `measured` says where the numbers come from.
    """

    layer_profile: str
    components: dict[str, dict[str, float]]
    direction_position: float | None
    measured: str


WARM_STARTS: dict[str, list[WarmStart]] = {
    "llama": [
        WarmStart(
            "range",
            {
                ATTN: {"layer_min": 0.708, "layer_span": 0.719, "weight": 1.010},
                MLP: {"layer_min": 0.707, "layer_span": 0.267, "weight": 2.269},
            },
            None,
            measured="SmolLM2-135M-Instruct organism (LlamaForCausalLM, 30 layers), 2026-11-26, "
            "default edit (fitted readouts, good-mean orthogonalization, max_weight 2.5, echoed "
            "markers ignored): `benchmarks/quality.py --n-trials 20 --label final --set "
            "use_warm_start_params=false`, its best trial (14): 1/100 refusals (base 89 by the "
            "adaptive judge; 1 by upstream's rule, base 79) at KL 0.032",
        ),
    ],
}
"""Warm-start profiles per model family (`model_family`). Only families measured here have
any (see docs/search-space.md); an unmeasured family starts cold."""

FAMILY_ARCHITECTURES = {"LlamaForCausalLM": "llama"}
"""Architecture class names whose family differs from a lower-cased `model_type`."""


def model_family(config: Any) -> str | None:
    """The model's family from its config (`model_type`, else `architectures`), never from its
    name: a fine-tune called "my-llama" of another architecture is not a Llama."""
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type:
        return model_type.lower()
    for architecture in getattr(config, "architectures", None) or []:
        if architecture in FAMILY_ARCHITECTURES:
            return FAMILY_ARCHITECTURES[architecture]
    return None


WARM_START_ATTR = "warm_start"


def enqueue_warm_starts(
    study: optuna.Study, space: SearchSpace, family: str | None
) -> list[dict[str, Any]]:
    """Queue the family's known-good trials as the study's first ones; returns those queued.

    Only a study holding fewer trials than the family has profiles gets them (a resumed study
    has had its chance), and a profile already in the study is not queued twice.
    """
    fitting = [space.trial_params(p) for p in WARM_STARTS.get(family or "", [])]
    queued = [params for params in fitting if params is not None]
    if not queued or len(study.get_trials(deepcopy=False)) >= len(queued):
        return []
    for params in queued:
        study.enqueue_trial(params, user_attrs={WARM_START_ATTR: family}, skip_if_exists=True)
    return queued


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random state is reseeded from `seed + trial.number` before every trial.

    A trial's random draws then depend on the seed, its number and the history, not on which
    process asks: a resumed run does not replay the first run's startup samples (new numbers),
    and several workers started at the same moment do not sample the same parameters.
    """

    def __init__(self, *, seed: int, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self._base_seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        seed = (self._base_seed + trial.number) % 2**32
        for owner in (self, getattr(self, "_random_sampler", None)):
            state = getattr(owner, "_rng", None)
            if state is not None:
                state.rng.seed(seed)
        super().before_trial(study, trial)


def open_study(
    storage: str | optuna.storages.BaseStorage,
    study_name: str,
    seed: int,
    n_startup_trials: int,
    heartbeat_interval: int | None = DEFAULT_HEARTBEAT_INTERVAL,
) -> optuna.Study:
    """Create the study or load it from storage to resume (or to join other workers).

    A storage URL becomes an RDB storage with heartbeats (`workers.make_storage`), so running
    trials of dead workers can be told apart from live ones.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if isinstance(storage, str):
        url = redact(storage)
        storage = make_storage(storage, heartbeat_interval)
    else:
        url = type(storage).__name__
    sampler = TrialSeededTPESampler(
        seed=seed,
        n_startup_trials=n_startup_trials,
        multivariate=True,
    )
    try:
        study = optuna.create_study(
            study_name=study_name,
            storage=storage,
            sampler=sampler,
            directions=["minimize"] * len(OBJECTIVES),
            load_if_exists=True,
        )
        _name_objectives(study, url)
        return study
    except ValueError as e:
        raise StudyError(
            f"Study '{study_name}' in {url} is not a (KL, refusals) heretic study: {e}. "
            "Use another --study-name or --storage."
        ) from e
    except StudyError:
        raise
    except Exception as e:  # the database went away between connecting and creating
        raise StudyError(f"Cannot open study '{study_name}' in {url}: {e}") from e


def _name_objectives(study: optuna.Study, url: str) -> None:
    """Name the objectives of a new study, and of one made before heretic named them."""
    names = study.metric_names
    if names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(OBJECTIVES))
    elif tuple(names) != OBJECTIVES:
        raise StudyError(
            f"Study '{study.study_name}' in {url} measures {', '.join(names)}, not heretic's "
            f"{', '.join(OBJECTIVES)}: use another --study-name or --storage."
        )


PRUNED_ATTR = "pruned"
UNANSWERED_ATTR = "unanswered"
"""Trial user attribute: responses still thinking at max_thinking_tokens (among the refusals)."""
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count towards n_trials: scored, or pruned because they could not win."""
    return [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials with full-fidelity scores (the only ones that can be on the Pareto front)."""
    return [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]


def dominated_by(front: list[FrozenTrial], kl: float, refusal_objective: float) -> bool:
    """True when some front point is at least as good on both objectives and better on one."""
    points = [objectives(t) for t in front]
    return any(
        p.kl_divergence <= kl
        and p.refusal_objective <= refusal_objective
        and (p.kl_divergence < kl or p.refusal_objective < refusal_objective)
        for p in points
    )


def run_search(
    study: optuna.Study,
    n_trials: int,
    space: SearchSpace,
    score: Callable[[EditParams, Callable[[float, float], bool]], Score],
    on_trial: Callable[[FrozenTrial, int], None] | None = None,
    base_refusals: int | None = None,
) -> int:
    """Run trials until the study holds `n_trials` finished ones; returns how many ran now.

    `score(params, dominated)` gets a predicate telling whether a (KL, lower bound of the
    refusal objective) point is already beaten by the study's Pareto front, so it can stop
    counting early. The refusal objective is the count plus the score's openings, when
    measured (`Score.objective`).

    With `base_refusals`, every scored trial gets the constraint `DO_NOTHING_CONSTRAINT`
    (refusals - 90% of the base count, feasible at <= 0): a trial that barely edits the model
    has the lowest KL of all and would sit on the front and draw TPE's sampling toward
    editing nothing. As infeasible, TPE ranks it below every feasible trial and the front
    (`pareto_front`) leaves it out.

    Trials other workers are running count as well (`claimed_count`), so several workers on one
    study stop together; each may start one trial beyond n_trials when they ask at the same
    instant. Each trial records its worker and a heartbeat, so a crash leaves it recoverable.
    """
    ran = 0
    while claimed_count(study) < n_trials:
        trial = study.ask()
        claim_trial(trial)
        params = space.suggest(trial)
        front = study.best_trials if completed_trials(study) else []
        try:
            with Heartbeat(study, trial):
                result = score(params, lambda kl, n, front=front: dominated_by(front, kl, n))
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
        if result.openings is not None:
            trial.set_user_attr(OPENINGS_ATTR, result.openings)
        if result.unanswered:
            trial.set_user_attr(UNANSWERED_ATTR, result.unanswered)
        if result.pruned:
            trial.set_user_attr(PRUNED_ATTR, result.pruned)
            frozen = study.tell(trial, state=TrialState.PRUNED)
        else:
            if base_refusals is not None:
                excess = result.refusals - DO_NOTHING_FRACTION * base_refusals
                trial.set_constraint(DO_NOTHING_CONSTRAINT, excess)
            values = {KL_ATTR: result.kl_divergence, REFUSALS_ATTR: result.objective}
            frozen = study.tell(trial, [values[name] for name in OBJECTIVES])
        ran += 1
        if on_trial is not None:
            on_trial(frozen, len(finished_trials(study)))
    return ran


DO_NOTHING_FRACTION = 0.9
"""A trial keeping more than this fraction of the original refusals counts as "did nothing"."""
DO_NOTHING_CONSTRAINT = "did_nothing"
"""Name of the trial constraint `run_search` sets (> 0: the trial did nothing)."""


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """Non-dominated fully scored trials that did something, sorted by refusal objective
    (count, plus openings when measured) then KL.

    Trials infeasible under `DO_NOTHING_CONSTRAINT` are left out; when every scored trial is
    (a search that has not removed a tenth of the refusals yet), the front of all of them is
    returned, so there is still something to show and `best_trial` can say what it is.
    """
    front = study.best_trials
    if not front:
        scored = completed_trials(study)
        front = [
            t
            for t in scored
            if not dominated_by(
                scored, objectives(t).kl_divergence, objectives(t).refusal_objective
            )
        ]
    return sorted(
        front, key=lambda t: (objectives(t).refusal_objective, objectives(t).kl_divergence)
    )


def did_nothing(
    trial: FrozenTrial,
    base_refusals: int,
    score: Callable[[FrozenTrial], Objectives] = objectives,
) -> bool:
    """True when the trial's refusals are not clearly below the original model's.

    A trial that barely edits the model has a tiny KL divergence and (almost) the base
    refusal count; it is on the Pareto front (nothing has lower KL) and, with few refusals to
    remove, can even be the point nearest the origin. It is never the edit anyone wants.
    `score` reads a trial's figures (the search's by default; the held-out confirmation's
    with the original model's held-out count as `base_refusals`).
    """
    return score(trial).refusals > DO_NOTHING_FRACTION * base_refusals


def best_trial(
    front: list[FrozenTrial],
    base_refusals: int,
    score: Callable[[FrozenTrial], Objectives] = objectives,
) -> FrozenTrial:
    """The front trial nearest the origin, with the refusal objective (the count, plus the
    openings when measured) scaled by the base refusal count.

    Trials that did nothing (`did_nothing`: refusals above 90% of the base count) are passed
    over whenever the front has any other point; only a front made of them alone yields one.
    `score` as for `did_nothing`.
    """
    if not front:
        raise StudyError("The study has no finished trials to choose from.")
    scale = max(base_refusals, 1)
    candidates = [t for t in front if not did_nothing(t, base_refusals, score)] or front

    def distance(trial: FrozenTrial) -> float:
        figures = score(trial)
        return math.hypot(figures.kl_divergence, figures.refusal_objective / scale)

    return min(candidates, key=distance)


def trial_by_number(study: optuna.Study, number: int) -> FrozenTrial:
    for t in completed_trials(study):
        if t.number == number:
            return t
    numbers = ", ".join(str(t.number) for t in completed_trials(study)) or "none"
    raise StudyError(
        f"Trial {number} is not a fully scored trial of this study (scored: {numbers})."
    )
