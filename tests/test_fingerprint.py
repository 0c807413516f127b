"""The run's identity: the directions key is part of the study key, and both come from one
declaration that covers every setting the directions are computed from."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from rich.console import Console

from heretic.config import DatasetSpecification, Settings
from heretic.errors import StudyError
from heretic.fingerprint import (
    FINGERPRINT_ATTR,
    PARTS,
    PROBING,
    Part,
    check_study_key,
    declaration_problems,
    directions_differences,
    directions_key,
    directions_metadata,
    is_prompt_set,
    study_key,
)
from heretic.holdout import HOLDOUT_KEY
from heretic.optimization import open_study
from heretic.sites import COMPONENTS

DATA = Path(__file__).parent / "data"
DIRECTION_SETS = ("good_prompts", "bad_prompts")


def _settings(**overrides) -> Settings:
    return Settings(model="m", **overrides)


def _prompts(settings: Settings, salt: str = "") -> dict[str, list[str]]:
    """Prompt texts for every set, which depend on where the set comes from (and `salt`)."""
    return {
        name: [f"{getattr(settings, name).dataset}:{getattr(settings, name).split}{salt}"]
        for name in Settings.model_fields
        if is_prompt_set(name)
    }


def _alternative(name: str, settings: Settings) -> Settings:
    """`settings` with `name` set to another value that the setting's definition allows."""
    current = getattr(settings, name)
    annotation = Settings.model_fields[name].annotation
    if annotation is bool:
        candidates: list[object] = [not current]
    elif annotation == bool | None:  # a switch that may stay unset
        candidates = [v for v in (True, False) if v != current]
    elif typing.get_origin(annotation) is typing.Literal:
        candidates = [v for v in typing.get_args(annotation) if v != current]
    elif annotation is DatasetSpecification:
        candidates = [current.model_copy(update={"split": current.split + "[:7]"})]
    elif isinstance(current, list):
        candidates = [[*current, "another marker"]]
    elif annotation is int:
        candidates = [current + 1, current - 1, current * 2]
    elif annotation is float:
        candidates = [current * 0.5, current * 2, current + 1]
    else:  # a string or None
        candidates = ["something else"]
    for value in candidates:
        try:
            other = Settings.model_validate({**settings.model_dump(), name: value})
        except ValidationError:
            continue
        if getattr(other, name) != current:
            return other
    raise AssertionError(f"no other valid value found for {name}")


def _where_it_counts(part: Part) -> Settings:
    """Settings under which `part` counts and changes the directions (its switches on)."""
    on = {}
    for condition in (part.when, part.directions):
        if isinstance(condition, tuple):
            on[condition[0]] = condition[1]
    return _settings(**on)


# ----- the declaration -----------------------------------------------------------------------


def test_the_declaration_matches_the_settings_definitions():
    assert declaration_problems() == []
    bad = (
        Part("no_such_setting"),
        Part("readout", directions=True),
        Part("readout_ridge", directions=True, when=("readout", "fited")),
        Part("probe_l2", directions=True, when=PROBING),
        Part("seed", only_when_on=True),
    )
    problems = declaration_problems(bad)
    assert "no_such_setting is not a setting" in problems
    assert "readout_ridge: readout == 'fited' is not a choice it has" in problems
    assert "probe_l2 depends on use_supervised_probing, which is not declared so" in problems
    assert "seed is recorded only when on but is no switch" in problems


@pytest.mark.parametrize("part", [p for p in PARTS if p.directions], ids=lambda p: p.name)
def test_every_setting_that_changes_the_directions_changes_the_study_key(part):
    before = _where_it_counts(part)
    after = _alternative(part.name, before)
    prompts_before, prompts_after = _prompts(before), _prompts(after)
    assert directions_key(before, prompts_before) != directions_key(after, prompts_after)
    assert study_key(before) != study_key(after)
    # The directions key is the study key restricted to the parts that change the directions.
    for settings, prompts in ((before, prompts_before), (after, prompts_after)):
        key, study = directions_key(settings, prompts), study_key(settings)
        assert set(key) <= set(study)
        assert all(key[n] == study[n] for n in key if not is_prompt_set(n))


def test_new_prompt_text_from_the_same_source_changes_the_directions_key():
    settings = _settings()
    assert directions_key(settings, _prompts(settings)) != directions_key(
        settings, _prompts(settings, salt=" edited")
    )


def test_with_probing_a_new_seed_changes_both_keys(tmp_path):
    """The probes' folds follow the seed: a new --seed recomputes the directions, so the study
    scored with the old ones must not go on silently."""
    first = _settings(use_supervised_probing=True, seed=1)
    second = _settings(use_supervised_probing=True, seed=2)
    assert directions_key(first, _prompts(first)) != directions_key(second, _prompts(second))
    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "s", 0, 1, None)
    check_study_key(study, study_key(first))
    with pytest.raises(StudyError, match="seed: study has 1, this run has 2"):
        check_study_key(study, study_key(second))
    # Without probing the seed only steers the sampler: a study may go on with another one.
    assert study_key(_settings(seed=1)) == study_key(_settings(seed=2))
    assert directions_key(_settings(seed=1), _prompts(first)) == directions_key(
        _settings(seed=2), _prompts(first)
    )


# ----- what the directions are computed from -------------------------------------------------


class _Recording:
    """Settings that remember which of their fields were read."""

    def __init__(self, settings: Settings) -> None:
        self._settings, self.read = settings, set()

    def __getattr__(self, name: str):
        if name in Settings.model_fields:
            self.read.add(name)
        return getattr(self._settings, name)


class _FakeModel:
    """Residuals with a planted refusal direction; it refuses every other bad prompt."""

    n_layers, hidden = 3, 16

    def __init__(self) -> None:
        self.rng = torch.Generator().manual_seed(0)
        self.u = torch.nn.functional.normalize(torch.randn(3, 16, generator=self.rng), dim=-1)

    def residuals(self, prompts, batch_size, advance=None) -> torch.Tensor:
        x = torch.randn(len(prompts), self.n_layers, self.hidden, generator=self.rng) + 2.0
        shifted = torch.tensor([p.startswith("bad") and i % 2 == 0 for i, p in enumerate(prompts)])
        return x + 3.0 * shifted.view(-1, 1, 1) * self.u

    def residuals_and_module_outputs(self, prompts, batch_size, advance=None):
        n = len(prompts)
        outputs = torch.randn(n, self.n_layers, len(COMPONENTS), self.hidden, generator=self.rng)
        return self.residuals(prompts, batch_size), outputs

    def refused_chunks(self, prompts, length, batch_size, is_refusal):
        yield [i % 2 == 0 for i in range(len(prompts))]


@pytest.mark.parametrize("readout", ["direction", "fitted"])
def test_every_setting_the_directions_are_computed_from_is_declared(readout):
    """Computing the directions with every refinement on reads only declared settings (besides
    the ones that only decide what is logged or how fast it runs)."""
    from heretic.extraction import compute_directions

    settings = _settings(
        readout=readout,
        use_supervised_probing=True,
        ensemble_probe_pca=True,
        orthogonalize_directions=True,
        use_sacred_directions=True,
        n_sacred_directions=2,
    )
    names = ("good", "bad", "helpful", "unhelpful", "sacred", "base")
    sets = (*DIRECTION_SETS, "helpful_prompts", "unhelpfulness_prompts", "sacred_prompts")
    prompts = {
        name: [f"{tag} {i}" for i in range(40)]
        for name, tag in zip((*sets, "sacred_baseline_prompts"), names, strict=True)
    }
    recording = _Recording(settings)
    compute_directions(_FakeModel(), prompts, recording, 8, Console(file=None, quiet=True))
    declared = {p.name for p in PARTS if p.directions}
    display_only = {"sacred_overlap_threshold"}  # a warning's threshold, not an input
    assert recording.read - display_only <= declared
    assert {"probe_weight", "seed", "ignore_echoed_markers", "sacred_alpha"} <= recording.read


# ----- the directions file -------------------------------------------------------------------


def test_a_directions_file_names_what_differs():
    settings = _settings()
    prompts = _prompts(settings)
    stored = directions_metadata(settings, prompts, 3, 16)
    other = _settings(direction_method="pca", use_supervised_probing=True)
    current = directions_metadata(other, _prompts(other, salt="x"), 3, 16)
    differences = directions_differences(stored, current)
    assert "direction_method: file has 'mean_difference', this run has 'pca'" in differences
    assert "good_prompts: the file was made from other prompts" in differences
    assert any(line.startswith("use_supervised_probing:") for line in differences)
    assert directions_differences(stored, stored) == []
    # A file given with --directions is compared on what every directions file depends on.
    given = directions_metadata(other, _prompts(other, salt="x"), 3, 16, given_file=True)
    assert not any("probe" in line for line in directions_differences(stored, given, True))
    # A file made before the key existed is recomputed, saying why.
    old = {"model": "m", "direction_method": "mean_difference", "prompts_sha256": "0"}
    assert "earlier heretic" in directions_differences(old, stored)[0]


# ----- studies made by earlier versions ------------------------------------------------------


def test_studies_recorded_before_this_module_still_match():
    """The study keys that heretic recorded before this module (tests/data) are what this
    version computes for the same settings, except `seed` now joins a probing study's key, and
    the held-out confirmation's share of the evaluation sets joins the key while it is taken
    (its search scores on fewer prompts; with --no-confirm the old keys match as they were), and
    so does `refusal_openings` while it is on (the refusal objective is no longer the count),
    and the default good_prompts is 2000 prompts, not 400 (other directions: an old study with
    the old default does not resume under the new one)."""
    recorded = json.loads((DATA / "study_fingerprints_v1.json").read_text())["studies"]
    assert len(recorded) >= 7
    old_good = DatasetSpecification(
        dataset="mlabonne/harmless_alpaca", split="train[:400]", column="text"
    )
    old = {"confirm": False, "refusal_openings": False, "good_prompts": old_good}
    for study in recorded:
        settings = _settings(**study["overrides"])
        expected = dict(study["fingerprint"])
        if settings.use_supervised_probing:
            expected["seed"] = settings.seed
        assert study_key(settings.model_copy(update=old)) == expected
        expected[HOLDOUT_KEY] = {"bad_evaluation_prompts": 0.2, "good_evaluation_prompts": 0.2}
        expected["refusal_openings"] = True
        expected["good_prompts"] = {**expected["good_prompts"], "split": "train[:2000]"}
        assert study_key(settings) == expected, study["overrides"]
        assert study_key(settings.model_copy(update={"good_prompts": old_good})) != expected


def test_a_study_remembers_forced_changes(tmp_path):
    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "s", 0, 1, None)
    check_study_key(study, study_key(_settings(max_weight=2.0)))
    forced = check_study_key(study, study_key(_settings(max_weight=1.5)), force=True)
    assert forced == ["max_weight: study has 2.0, this run has 1.5"]
    assert study.user_attrs[FINGERPRINT_ATTR]["max_weight"] == 1.5
    assert check_study_key(study, study_key(_settings(max_weight=1.5))) == []
