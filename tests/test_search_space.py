"""Search spaces (range and tent profiles, per-layer and global directions) and warm starts."""

from __future__ import annotations

import optuna
import pytest
import torch
from tiny_models import TEXT as COMMON
from tiny_models import tiny_model

from heretic.abliteration import (
    EditParams,
    TentParams,
    edit_from_params,
    interpolated_direction,
    layer_strengths,
)
from heretic.config import Settings
from heretic.directions import normalize
from heretic.discovery import discover_sites
from heretic.edit import EditHooks, TrialEdit, merge_edit, restore_weights
from heretic.errors import StudyError
from heretic.evaluation import Score
from heretic.fingerprint import check_study_key, study_key
from heretic.optimization import (
    OBJECTIVES,
    PROFILE_PARAMS,
    WARM_START_ATTR,
    WARM_STARTS,
    Objectives,
    SearchSpace,
    WarmStart,
    best_trial,
    enqueue_warm_starts,
    model_family,
    objectives,
    open_study,
    params_from_trial,
    pareto_front,
    run_search,
)
from heretic.sites import ATTN, COMPONENTS, MLP

# ----- the tent profile ----------------------------------------------------------------------


def test_tent_is_peak_at_its_position_floor_at_width_and_zero_beyond():
    # 11 layers: positions 0, 0.1, ..., 1. Peak 1.2 at 0.5, floor 0.4 at distance 0.2.
    s = layer_strengths(TentParams(1.2, 0.5, 0.4, 0.2), 11).tolist()
    assert s[5] == pytest.approx(1.2)  # the peak
    assert s[4] == pytest.approx(0.8) and s[6] == pytest.approx(0.8)  # halfway down
    assert s[3] == pytest.approx(0.4) and s[7] == pytest.approx(0.4)  # the floor, at width
    assert s[:3] == [0, 0, 0] and s[8:] == [0, 0, 0]  # beyond the width


def test_tent_between_layers_and_at_the_edges():
    # The peak need not sit on a layer; a peak at the last layer is a half tent.
    s = layer_strengths(TentParams(1.0, 0.95, 0.0, 0.5), 11).tolist()
    assert s[10] == pytest.approx(0.9) and s[9] == pytest.approx(0.9)
    assert s[5] == pytest.approx(0.1) and s[4] == 0
    # A floor above the peak makes the strength grow away from the peak.
    s = layer_strengths(TentParams(0.5, 0.0, 1.5, 1.0), 3).tolist()
    assert s == pytest.approx([0.5, 1.0, 1.5])
    # Zero width: only a layer exactly at the peak.
    assert layer_strengths(TentParams(1.0, 0.5, 0.0, 0.0), 3).tolist() == [0, 1, 0]


# ----- the fractional direction index --------------------------------------------------------


def _directions(n_layers: int, hidden: int, seed: int = 1) -> torch.Tensor:
    return normalize(torch.randn(n_layers, hidden, generator=torch.Generator().manual_seed(seed)))


def test_integer_direction_index_is_that_layers_direction():
    directions = _directions(5, 16)
    for k in range(5):
        torch.testing.assert_close(interpolated_direction(directions, float(k)), directions[k])


def test_halfway_direction_index_is_the_normalized_mean():
    directions = _directions(5, 16)
    got = interpolated_direction(directions, 2.5)
    torch.testing.assert_close(got, normalize(directions[2] + directions[3]))
    assert got.norm().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        interpolated_direction(directions, 4.5)


def test_global_direction_is_used_at_every_layer():
    directions = _directions(4, 8)
    params = EditParams({c: TentParams(1.0, 0.5, 0.5, 0.5) for c in COMPONENTS}, 1.25)
    _, per_layer = edit_from_params(params, directions)
    expected = interpolated_direction(directions, 1.25)
    assert per_layer.shape == directions.shape
    for row in per_layer:
        torch.testing.assert_close(row, expected)
    per_layer_params = EditParams(params.components, None)
    torch.testing.assert_close(edit_from_params(per_layer_params, directions)[1], directions)


def test_tent_global_trial_merged_gives_the_hooks_logits():
    """What the search scored (hooks with the trial's direction) is what gets saved (merged)."""
    model = tiny_model("llama", num_hidden_layers=3)
    modules = discover_sites(model)
    directions = _directions(3, COMMON["hidden_size"])
    params = EditParams(
        {ATTN: TentParams(1.3, 0.5, 0.3, 0.5), MLP: TentParams(0.9, 1.0, 0.6, 0.6)}, 0.7
    )
    strengths, trial_directions = edit_from_params(params, directions)
    ids = torch.randint(0, COMMON["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        hooks = EditHooks(modules, directions)
        hooks.set_strengths(strengths, trial_directions)
        hooked = model(input_ids=ids).logits
        hooks.clear()  # back to no edit and the installed directions, for free
        torch.testing.assert_close(model(input_ids=ids).logits, base, atol=0, rtol=0)
        hooks.remove()
        originals = merge_edit(modules, TrialEdit(strengths, trial_directions))
        merged = model(input_ids=ids).logits
        restore_weights(modules, originals)
    assert not torch.allclose(base, hooked, atol=1e-4)
    torch.testing.assert_close(merged, hooked, atol=2e-4, rtol=2e-4)


# ----- sampling and reading back -------------------------------------------------------------


@pytest.mark.parametrize(
    "profile, scope", [("tent", "global"), ("tent", "search"), ("range", "per_layer")]
)
def test_params_from_trial_rebuilds_what_was_sampled(profile, scope):
    study = optuna.create_study(directions=["minimize", "minimize"])
    space = SearchSpace(layer_profile=profile, direction_scope=scope, n_layers=30)
    for _ in range(6):
        trial = study.ask()
        sampled = space.suggest(trial)
        study.tell(trial, [0.0, 0.0])
        assert params_from_trial(study.trials[-1]) == sampled
        if scope == "global":
            assert 0.4 * 29 <= sampled.direction_index <= 0.9 * 29
        if profile == "tent":
            for p in sampled.components.values():
                assert isinstance(p, TentParams) and 0 <= p.floor_weight <= p.peak_weight
    if scope == "per_layer":
        assert all(params_from_trial(t).direction_index is None for t in study.trials)


@pytest.mark.parametrize("profile", ["tent", "range"])
@pytest.mark.parametrize("scope", ["per_layer", "global", "search"])
def test_a_trial_samples_exactly_the_parameters_of_the_table(profile, scope):
    study = optuna.create_study(directions=["minimize", "minimize"])
    space = SearchSpace(layer_profile=profile, direction_scope=scope, n_layers=30)
    trial = study.ask()
    space.suggest(trial)
    bounds = space.bounds()
    expected = {f"{c}.{name}" for c in COMPONENTS for name in PROFILE_PARAMS[profile]}
    if scope != "per_layer":
        expected.add("direction_index")
    assert set(bounds) == expected
    assert set(trial.params) == expected | ({"direction_scope"} if scope == "search" else set())
    for name, (low, high) in bounds.items():
        assert low <= trial.params[name] <= high, name


def test_a_trial_without_heretics_parameters_is_named():
    study = optuna.create_study(directions=["minimize", "minimize"])
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    study.tell(trial, [0.0, 0.0])
    with pytest.raises(StudyError, match="Trial 0 has none of heretic's edit parameters \\(x\\)"):
        params_from_trial(study.trials[0])


def test_global_scope_without_layer_count_is_refused():
    with pytest.raises(ValueError, match="layer count"):
        SearchSpace(direction_scope="global")


# ----- warm starts ---------------------------------------------------------------------------


class _Config:
    def __init__(self, model_type: str | None, architectures: list[str] | None = None):
        self.model_type = model_type
        self.architectures = architectures


def test_family_comes_from_the_config_not_the_name():
    assert model_family(_Config("llama", ["LlamaForCausalLM"])) == "llama"
    assert model_family(_Config(None, ["LlamaForCausalLM"])) == "llama"
    assert model_family(_Config(None, ["SomethingNewForCausalLM"])) is None


def test_measured_family_gets_its_warm_starts_first():
    space = SearchSpace(n_layers=30)  # the defaults
    study = optuna.create_study(directions=["minimize", "minimize"])
    queued = enqueue_warm_starts(study, space, model_family(_Config("llama")))
    assert queued, "the llama family has a measured profile for the default space"
    trial = study.ask()
    assert trial.user_attrs[WARM_START_ATTR] == "llama"
    assert space.suggest(trial) == params_from_trial_like(trial)
    # A study that already holds them does not get them again.
    assert enqueue_warm_starts(study, space, "llama") == []


def params_from_trial_like(trial: optuna.Trial):
    study = trial.study
    study.tell(trial, [0.0, 0.0])
    return params_from_trial(study.trials[trial.number])


def test_unmeasured_family_and_other_spaces_get_none(monkeypatch):
    study = optuna.create_study(directions=["minimize", "minimize"])
    assert "gpt_neox" not in WARM_STARTS
    assert enqueue_warm_starts(study, SearchSpace(n_layers=30), "gpt_neox") == []
    assert enqueue_warm_starts(study, SearchSpace(n_layers=30), None) == []
    # A profile for another space is not forced into this one.
    tent = WarmStart(
        "tent",
        {
            c: {"peak_weight": 1.0, "peak_position": 0.8, "floor_fraction": 0.5, "width": 0.3}
            for c in COMPONENTS
        },  # fmt: skip
        0.6,
        "test",
    )
    monkeypatch.setitem(WARM_STARTS, "testfamily", [tent])
    assert enqueue_warm_starts(study, SearchSpace(layer_profile="range", n_layers=30),
                               "testfamily") == []  # fmt: skip
    tent_per_layer = SearchSpace(layer_profile="tent", direction_scope="per_layer", n_layers=30)
    assert enqueue_warm_starts(study, tent_per_layer, "testfamily") == []
    assert study.trials == []
    # ...but the same profile fits a per-trial direction choice.
    queued = enqueue_warm_starts(
        study,
        SearchSpace(layer_profile="tent", direction_scope="search", n_layers=30),
        "testfamily",
    )
    assert queued[0]["direction_scope"] == "global"
    assert queued[0]["direction_index"] == pytest.approx(0.6 * 29)


# ----- the fingerprint -----------------------------------------------------------------------


def test_resumed_study_with_another_search_space_is_refused(tmp_path):
    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "s", 0, 1, None)
    check_study_key(study, study_key(Settings(model="m", search_space="tent")))
    with pytest.raises(StudyError, match="search_space: study has 'tent', this run has 'range'"):
        check_study_key(study, study_key(Settings(model="m", search_space="range")))
    with pytest.raises(StudyError, match="direction_scope"):
        check_study_key(
            study,
            study_key(
                Settings(
                    model="m", search_space="tent", direction_scope="search", readout="direction"
                )
            ),
        )
    same = Settings(model="m", search_space="tent")
    assert check_study_key(study, study_key(same)) == []


# ----- objectives, and studies made by earlier versions --------------------------------------


def _old_study(url: str, metric_names: list[str] | None = None) -> None:
    """A study as heretic made it before its objectives were named: two minimized values per
    trial, read by position."""
    study = optuna.create_study(
        study_name="heretic", storage=url, directions=["minimize", "minimize"]
    )
    if metric_names is not None:
        study.set_metric_names(metric_names)
    distribution = optuna.distributions.FloatDistribution(0.0, 1.0)
    for kl, refusals in ((0.2, 3.0), (0.05, 9.0), (0.3, 4.0)):
        params = {f"{c}.{n}": 0.5 for c in COMPONENTS for n in ("layer_min", "layer_span")}
        params.update({f"{c}.weight": 1.0 for c in COMPONENTS})
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=dict.fromkeys(params, distribution),
                values=[kl, refusals],
            )
        )


def test_a_study_made_before_the_objectives_were_named_resumes(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _old_study(url)
    study = open_study(url, "heretic", 0, 1, None)
    assert tuple(study.metric_names) == OBJECTIVES
    assert [objectives(t) for t in pareto_front(study)] == [
        Objectives(0.2, 3),
        Objectives(0.05, 9),
    ]
    assert best_trial(pareto_front(study), base_refusals=10).number == 0
    assert params_from_trial(study.trials[0]).components[ATTN].weight == 1.0

    def score(params, dominated):
        return Score(kl_divergence=0.1, refusals=2)

    assert run_search(study, 4, SearchSpace(n_layers=4), score) == 1
    assert objectives(study.trials[-1]) == Objectives(0.1, 2)
    assert objectives(pareto_front(open_study(url, "heretic", 0, 1, None))[0]).refusals == 2


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_a_study_of_other_objectives_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    _old_study(url, ["loss", "latency"])
    with pytest.raises(StudyError, match="measures loss, latency, not heretic's kl_divergence"):
        open_study(url, "heretic", 0, 1, None)


# ----- end to end ----------------------------------------------------------------------------


def test_tent_global_run_saves_the_trials_direction(tiny_chat_model, tmp_path, monkeypatch):
    """A tent/global study on the tiny model runs, saves and exports: no warm start (the llama
    profile is for another space), and the metadata and card record the tent and the global
    direction. (That merging a tent/global trial gives the hooks' logits is tested above.)"""
    import json

    from test_pipeline import BAD, GOOD, _argv, _quiet

    from heretic.cli import run
    from heretic.config import load_settings

    monkeypatch.chdir(tmp_path)
    files = {}
    for name, lines in (("good", GOOD), ("bad", BAD)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    extra = ("--n-trials", "2", "--select", "best", "--search-space", "tent",
             "--direction-scope", "global", "--readout", "direction",
             "--export", "model,adapter")  # fmt: skip
    result = run(load_settings(_argv(tiny_chat_model, files, out, *extra)), _quiet())
    meta = json.loads((out / "heretic_metadata.json").read_text())
    assert set(meta["best_params"][ATTN]) == {"peak_weight", "peak_position", "floor_weight",
                                              "width"}  # fmt: skip
    assert 0 <= meta["refusal_direction"]["layer_index"] <= 1
    card = (out / "model" / "README.md").read_text()
    assert "peak strength" in card and "interpolated at layer index" in card
    study = optuna.load_study(study_name="heretic", storage=f"sqlite:///{out / 'study.db'}")
    assert all(WARM_START_ATTR not in t.user_attrs for t in study.trials)
    assert result.chosen_trial is not None
