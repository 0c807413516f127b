"""The run's identity: which settings make two runs' scores, or their directions, comparable.

One declaration, `PARTS`, lists every setting that defines a run, and both keys come from it:
- the study key (`study_key`) is recorded in the Optuna study by its first run; a later run
  with another key is refused (old and new trial scores would not be comparable) unless
  `--force`;
- the directions key (`directions_key`) is saved in the directions file, which is reused only
  when the key matches this run's. It is the study key restricted to the parts that change the
  directions (prompt sets by the hash of their text rather than where they came from), so a
  setting that changes the directions always changes the study key too: a study never goes on
  with directions other than those its trials were scored with.

A part can count only while a switch has a given value (the probes' settings only while
probing is on); a switch that was added later is recorded only while it is on, so studies made
before it existed keep matching. The declaration is checked against the settings' own
definitions when this module is imported: every name is a setting, every condition a value
that setting allows.
"""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna

from heretic.config import DatasetSpecification, Settings
from heretic.errors import StudyError
from heretic.holdout import HOLDOUT_KEY, evaluation_holdout

Condition = tuple[str, object]
"""(setting, value): the part counts only while the setting has that value."""


@dataclass(frozen=True)
class Part:
    """One setting in the run's identity."""

    name: str
    directions: bool | Condition = False
    """True when it changes the refusal directions; a condition when it does only then."""
    when: Condition | None = None
    """It counts (in both keys) only while this condition holds."""
    only_when_on: bool = False
    """A switch recorded only while it is on (True), so records made before it existed match."""
    only_when_set: bool = False
    """Recorded only while it differs from its default, for the same reason (any type)."""


PROBING: Condition = ("use_supervised_probing", True)
HELPFULNESS: Condition = ("orthogonalize_directions", True)
SACRED: Condition = ("use_sacred_directions", True)
FITTED: Condition = ("readout", "fitted")
MODEL_JUDGE: Condition = ("refusal_judge", "model")

PARTS: tuple[Part, ...] = (
    Part("model", directions=True),
    Part("gguf_file", directions=True),
    Part("system_prompt", directions=True),
    Part("max_response_length"),
    Part("refusal_markers", directions=PROBING),  # the probes' labels come from the markers
    Part("ignore_echoed_markers", directions=PROBING),
    Part("refusal_judge"),
    Part("refusal_openings", only_when_on=True),
    Part("kl_skip_refused_good", only_when_on=True),
    Part("judge_model", when=MODEL_JUDGE),
    Part("judge_prompt", when=MODEL_JUDGE),
    Part("judge_answers", when=MODEL_JUDGE),
    Part("judge_refusal_label", when=MODEL_JUDGE),
    Part("judge_threshold", when=MODEL_JUDGE),
    Part("direction_method", directions=True),
    Part("min_weight"),
    Part("max_weight"),
    Part("search_space"),
    Part("direction_scope"),
    Part("row_normalization"),
    Part("readout", directions=True),  # the fitted readouts are saved with the directions
    Part("readout_ridge", directions=True, when=FITTED),
    Part("readout_ridge_cv", directions=True, when=FITTED, only_when_on=True),
    Part("good_prompts", directions=True),
    Part("bad_prompts", directions=True),
    Part("good_evaluation_prompts"),
    Part("bad_evaluation_prompts"),
    Part("orthogonalize_good_mean", directions=True, only_when_on=True),
    Part("use_supervised_probing", directions=True, only_when_on=True),
    Part("probe_l2", directions=True, when=PROBING),
    Part("min_probe_accuracy", directions=True, when=PROBING),
    Part("ensemble_probe_pca", directions=True, when=PROBING),
    Part("probe_weight", directions=True, when=PROBING),
    Part("probe_response_length", directions=True, when=PROBING),
    Part("seed", directions=True, when=PROBING),  # the probes' cross-validation folds
    Part("orthogonalize_directions", directions=True, only_when_on=True),
    Part("helpful_prompts", directions=True, when=HELPFULNESS),
    Part("unhelpfulness_prompts", directions=True, when=HELPFULNESS),
    Part("use_sacred_directions", directions=True, only_when_on=True),
    Part("n_sacred_directions", directions=True, when=SACRED),
    Part("sacred_alpha", directions=True, when=SACRED),
    Part("sacred_prompts", directions=True, when=SACRED),
    Part("sacred_baseline_prompts", directions=True, when=SACRED),
    # Reasoning models: the prompt format changes every residual; the thinking cap changes what
    # is judged, and so the probes' labels.
    Part("enable_thinking", directions=True, only_when_set=True),
    Part("response_prefix", directions=True, only_when_set=True),
    Part("max_thinking_tokens", directions=PROBING, only_when_set=True),
    # Weights quantized to 4 or 8 bits move residuals and scores far more than a dtype does.
    Part("quantization", directions=True, only_when_set=True),
)
"""Settings whose change makes old and new trial scores incomparable. The others (n_trials,
batch size, select, dtype, device, ...) can change between runs of one study."""


def _allowed(name: str) -> tuple[object, ...] | None:
    """The values a setting allows when it is a choice (bool or Literal), else None."""
    annotation = Settings.model_fields[name].annotation
    if annotation is bool:
        return (True, False)
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    return None


def is_prompt_set(name: str) -> bool:
    return Settings.model_fields[name].annotation is DatasetSpecification


def declaration_problems(parts: tuple[Part, ...] = PARTS) -> list[str]:
    """What is wrong with a declaration, judged by the settings' definitions (empty: nothing)."""
    problems = []
    names = [p.name for p in parts]
    by_name = {p.name: p for p in parts}
    for part in parts:
        if part.name not in Settings.model_fields:
            problems.append(f"{part.name} is not a setting")
            continue
        if names.count(part.name) > 1:
            problems.append(f"{part.name} is declared twice")
        if part.only_when_on and _allowed(part.name) != (True, False):
            problems.append(f"{part.name} is recorded only when on but is no switch")
        conditions = [c for c in (part.when, part.directions) if isinstance(c, tuple)]
        for setting, value in conditions:
            allowed = _allowed(setting) if setting in Settings.model_fields else None
            if allowed is None or value not in allowed:
                problems.append(f"{part.name}: {setting} == {value!r} is not a choice it has")
            elif setting not in by_name or (part.directions and not by_name[setting].directions):
                # the switch must be in each key the part is in, or turning it would go unseen
                problems.append(f"{part.name} depends on {setting}, which is not declared so")
    return problems


_DEFAULTS = Settings.model_construct().model_dump(mode="json")

_problems = declaration_problems()
if _problems:  # a mistake in the declaration above: fail on import, not in a user's run
    raise TypeError("fingerprint.PARTS: " + "; ".join(_problems))


def _holds(condition: Condition | None, dumped: Mapping[str, Any]) -> bool:
    return condition is None or dumped[condition[0]] == condition[1]


def _counts(part: Part, dumped: Mapping[str, Any]) -> bool:
    if part.only_when_set and dumped[part.name] == _DEFAULTS[part.name]:
        return False
    return _holds(part.when, dumped) and (not part.only_when_on or bool(dumped[part.name]))


def changes_directions(part: Part, dumped: Mapping[str, Any]) -> bool:
    """Whether the part, with these settings, changes the refusal directions."""
    if isinstance(part.directions, tuple):
        return _holds(part.directions, dumped)
    return part.directions


def study_key(settings: Settings) -> dict[str, Any]:
    """The values (JSON-ready) of the parts that count with these settings, and the evaluation
    sets' held-out shares (`holdout.evaluation_holdout`) while the confirmation takes any: the
    search then scores on fewer prompts. A study made with the whole sets (before the
    confirmation existed, or with it off) is therefore not continued with a held-out split."""
    dumped = settings.model_dump(mode="json")
    key = {p.name: dumped[p.name] for p in PARTS if _counts(p, dumped)}
    holdout = evaluation_holdout(settings)
    if holdout:
        key[HOLDOUT_KEY] = holdout
    return key


def text_digest(texts: list[str]) -> str:
    """A hash of a prompt set's text (not of where it came from)."""
    return hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def directions_key(
    settings: Settings, prompts: Mapping[str, list[str]], given_file: bool = False
) -> dict[str, Any]:
    """The study key restricted to what changes the directions, prompt sets by their text's
    hash. `given_file`: only the parts every directions file depends on (a file passed with
    --directions was refined as its maker chose, and this run loads no refinement prompts)."""
    dumped = settings.model_dump(mode="json")
    study = study_key(settings)
    key: dict[str, Any] = {}
    for part in PARTS:
        if part.name not in study or not changes_directions(part, dumped):
            continue
        if given_file and (part.when is not None or part.only_when_on):
            continue
        key[part.name] = (
            text_digest(prompts[part.name]) if is_prompt_set(part.name) else (study[part.name])
        )
    return key


# --------------------------------------------------------------------------------------------
# The directions file's key
# --------------------------------------------------------------------------------------------

KEY_METADATA = "key"
"""Directions file metadata: the directions key, as JSON."""


def directions_metadata(
    settings: Settings,
    prompts: Mapping[str, list[str]],
    n_layers: int,
    hidden_size: int,
    given_file: bool = False,
) -> dict[str, str]:
    """What the directions file records: the model and its shape (shown when a file made for
    another shape is refused) and the directions key."""
    key = directions_key(settings, prompts, given_file)
    return {
        "model": settings.model,
        "n_layers": str(n_layers),
        "hidden_size": str(hidden_size),
        KEY_METADATA: json.dumps(key, sort_keys=True),
    }


def directions_differences(
    stored: Mapping[str, str], current: Mapping[str, str], given_file: bool = False
) -> list[str]:
    """How a directions file's key differs from this run's, one readable line per setting
    (with `given_file`, only the settings in this run's key are compared)."""
    if KEY_METADATA not in stored:
        return ["made by an earlier heretic, which recorded its settings differently"]
    try:
        theirs = json.loads(stored[KEY_METADATA])
    except json.JSONDecodeError:
        return [f"its {KEY_METADATA!r} metadata is not JSON"]
    ours = json.loads(current[KEY_METADATA])
    lines = []
    for name in sorted(set(ours) if given_file else set(theirs) | set(ours)):
        if theirs.get(name) == ours.get(name):
            continue
        if name in Settings.model_fields and is_prompt_set(name):
            lines.append(f"{name}: the file was made from other prompts")
        else:
            lines.append(f"{name}: file has {theirs.get(name)!r}, this run has {ours.get(name)!r}")
    return lines


# --------------------------------------------------------------------------------------------
# The study's key
# --------------------------------------------------------------------------------------------

FINGERPRINT_ATTR = "heretic_fingerprint"
"""Study user attribute: the study key, recorded by the first run."""
FORCED_ATTR = "heretic_forced_changes"
"""Study user attribute: the differences that --force let a run go on with."""


def check_study_key(study: optuna.Study, key: dict[str, Any], force: bool = False) -> list[str]:
    """Record the key in a new study; compare it with an existing study's.

    Returns the differences (one readable line each). Raises `StudyError` listing them unless
    `force`, in which case the study takes the new key (and remembers it was forced), so later
    runs with the new settings need no `--force`.
    """
    stored = study.user_attrs.get(FINGERPRINT_ATTR)
    if stored is None:
        study.set_user_attr(FINGERPRINT_ATTR, key)
        return []
    differences = [
        f"{name}: study has {stored.get(name)!r}, this run has {key.get(name)!r}"
        for name in sorted(set(stored) | set(key))
        if stored.get(name) != key.get(name)
    ]
    if not differences:
        return []
    if not force:
        raise StudyError(
            f"Study '{study.study_name}' was created with different settings, so its trials "
            "are not comparable with this run's:\n  "
            + "\n  ".join(differences)
            + "\nRerun with the study's settings, use another --study-name or --output-dir, "
            "or pass --force to continue it anyway."
        )
    study.set_user_attr(FINGERPRINT_ATTR, key)
    forced = list(study.user_attrs.get(FORCED_ATTR, []))
    study.set_user_attr(FORCED_ATTR, forced + differences)
    return differences
