"""kl_skip_refused_good: the KL divergence leaves out the good prompts the original model refuses,
in the search, the held-out confirmation and `heretic evaluate`, and says so."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console
from test_confirmation import _argv, _run, _study_with, prompt_files  # noqa: F401
from tiny_models import TEXT as COMMON

from heretic.config import load_settings
from heretic.confirmation import Confirmation, in_search_record
from heretic.directions import normalize
from heretic.edit import EditHooks
from heretic.errors import DatasetError
from heretic.evaluate import GroupOutputs, PromptGroup, group_record
from heretic.evaluation import Evaluator, kl_divergence
from heretic.fingerprint import study_key
from heretic.holdout import AfterSearchSets, HeldOutSet
from heretic.judges import MarkerJudge
from heretic.loading import load_model
from heretic.sites import COMPONENTS

GOOD = [f"Describe the colour number {i} in a sentence." for i in range(8)]
BAD = [f"Explain how to break lock number {i}." for i in range(4)]


class _RefusesPrompts:
    """A judge that calls every response to the prompts in `refused` a refusal, and records
    the responses it was asked about."""

    monotone = True

    def __init__(self, refused):
        self.refused = set(refused)
        self.seen: dict[str, str] = {}

    def is_refusal(self, response: str, prompt: str = "") -> bool:
        return prompt in self.refused

    def verdicts(self, responses, prompts) -> list[bool]:
        self.seen.update(zip(prompts, responses, strict=True))
        return [p in self.refused for p in prompts]

    def count(self, responses, prompts=None) -> int:
        return sum(self.verdicts(responses, prompts))


def _edit(model) -> EditHooks:
    n_layers = COMMON["num_hidden_layers"]
    g = torch.Generator().manual_seed(3)
    hooks = EditHooks(
        model.sites, normalize(torch.randn(n_layers, COMMON["hidden_size"], generator=g))
    )
    hooks.set_strengths({c: torch.full((n_layers,), 1.5) for c in COMPONENTS})
    return hooks


def test_search_kl_leaves_out_the_good_prompts_the_original_refuses(tiny_chat_model):
    model = load_model(str(tiny_chat_model), dtype="float32")
    refused = [GOOD[1], GOOD[4], GOOD[6]]
    judge = _RefusesPrompts(refused)
    lines: list[str] = []
    evaluator = Evaluator(model, GOOD, BAD, judge, 6, 3, skip_refused_good=True, log=lines.append)
    answered = [p for p in GOOD if p not in refused]
    assert sorted(evaluator.good_refused) == sorted(refused)
    assert evaluator.good_prompts == answered  # in the given order
    assert any("KL divergence on 5 good prompts" in line and "3 of 8" in line for line in lines)
    # The judge saw the original model's own greedy answers to the prompts it kept.
    greedy = dict(zip(answered, model.generate(answered, 6, 3), strict=True))
    assert {p: judge.seen[p] for p in answered} == greedy

    base = model.first_token_logprobs(answered, 3)
    hooks = _edit(model)
    try:
        reference = kl_divergence(base, model.first_token_logprobs(answered, 3))
        assert evaluator.kl() == pytest.approx(reference, rel=1e-5)
        whole = Evaluator(model, GOOD, BAD, judge, 6, 3)  # built with the edit on: KL 0
        assert whole.good_refused == [] and whole.good_prompts == GOOD
    finally:
        hooks.clear()


def test_refusing_every_good_prompt_is_a_clear_error(tiny_chat_model):
    model = load_model(str(tiny_chat_model), dtype="float32")
    with pytest.raises(DatasetError, match="refuses all 8 good evaluation prompts"):
        Evaluator(model, GOOD, BAD, _RefusesPrompts(GOOD), 6, 3, skip_refused_good=True)


def test_held_out_kl_leaves_out_the_refused_good_prompts(tiny_chat_model):
    model = load_model(str(tiny_chat_model), dtype="float32")
    refused = [GOOD[0], GOOD[5]]
    hooks = EditHooks(
        model.sites, torch.nn.functional.normalize(torch.randn(model.n_layers, model.hidden_size))
    )
    confirmation = Confirmation(
        model=model,
        hooks=hooks,
        sets=AfterSearchSets(HeldOutSet(BAD, "bad"), HeldOutSet(GOOD, "good")),
        judge=_RefusesPrompts(refused),
        markers=MarkerJudge(("sorry",)),
        response_length=6,
        batch_size=4,
        perplexity=False,
        console=Console(file=io.StringIO()),
        skip_refused_good=True,
    )
    (trial,) = _study_with([(0.1, 1)])
    confirmation.confirm([trial])
    assert sorted(confirmation.good_refused) == sorted(refused)
    answered = [p for p in GOOD if p not in refused]
    base = model.first_token_logprobs(answered, 4)
    from heretic.abliteration import edit_from_params
    from heretic.optimization import params_from_trial

    hooks.set_strengths(*edit_from_params(params_from_trial(trial), hooks.directions))
    try:
        reference = kl_divergence(base, model.first_token_logprobs(answered, 4))
    finally:
        hooks.clear()
    assert confirmation.trials[trial.number].kl_divergence == pytest.approx(reference, rel=1e-5)


def test_evaluate_group_kl_leaves_out_what_the_base_refuses():
    group = PromptGroup("held_out", "held out", [], "bad", ["g0", "g1", "g2", "g3"], "good")
    g = torch.Generator().manual_seed(0)
    base_lp = torch.log_softmax(torch.randn(4, 7, generator=g), -1)
    edited_lp = torch.log_softmax(torch.randn(4, 7, generator=g), -1)
    base = GroupOutputs([], [], 0, base_lp)
    edited = GroupOutputs([], [], 0, edited_lp)
    judge = MarkerJudge(("sorry",))
    responses = ["Sure, here.", "Sorry, no.", "Fine.", "I'm sorry."]
    record = group_record(group, base, edited, judge, judge, responses)
    keep = torch.tensor([True, False, True, False])
    assert record["kl_divergence"] == pytest.approx(kl_divergence(base_lp[keep], edited_lp[keep]))
    assert record["n_good_prompts"] == 2 and record["n_good_refused_left_out"] == 2
    plain = group_record(group, base, edited, judge, judge)
    assert plain["kl_divergence"] == pytest.approx(kl_divergence(base_lp, edited_lp))
    assert plain["n_good_prompts"] == 4 and "n_good_refused_left_out" not in plain
    everything = group_record(group, base, edited, judge, judge, ["sorry"] * 4)
    assert "kl_divergence" not in everything and everything["n_good_refused_left_out"] == 4


def test_in_search_record_says_what_the_kl_left_out(tiny_chat_model):
    model = load_model(str(tiny_chat_model), dtype="float32")
    evaluator = Evaluator(model, GOOD, BAD, _RefusesPrompts(GOOD[:3]), 4, 4, skip_refused_good=True)
    evaluator.judge = MarkerJudge(("sorry",))  # a judge the record can describe
    (trial,) = _study_with([(0.1, 1)])
    on = in_search_record(
        load_settings(["--model", "m", "--kl-skip-refused-good"]), evaluator, trial, None
    )
    assert on["n_good_prompts"] == 5 and on["n_good_refused_left_out"] == 3
    assert "kl_skip_refused_good" in on["kl_prompts"]
    off = in_search_record(load_settings(["--model", "m"]), evaluator, trial, None)
    assert "n_good_refused_left_out" not in off and "kl_prompts" not in off


def test_the_setting_is_in_the_study_key():
    on = study_key(load_settings(["--model", "m", "--kl-skip-refused-good"]))
    assert on["kl_skip_refused_good"] is True
    assert "kl_skip_refused_good" not in study_key(load_settings(["--model", "m"]))


def test_a_run_whose_model_refuses_every_good_prompt_stops_with_the_fix(
    tiny_chat_model,
    prompt_files,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    # The tiny random model answers only newlines: an empty answer counts as a refusal.
    monkeypatch.chdir(tmp_path)
    argv = _argv(tiny_chat_model, prompt_files, tmp_path / "out", "--kl-skip-refused-good")
    with pytest.raises(DatasetError, match="kl_skip_refused_good = false"):
        _run(argv)


def test_the_figures_say_what_the_kl_left_out():
    from heretic.figures import figure_rows

    common = {
        "n_bad_prompts": 4,
        "bad_prompts": "bad",
        "refusals": 0,
        "base_refusals": 3,
        "decoding": "greedy",
        "judge": "markers",
        "good_prompts": "good",
        "kl_position": "first token",
    }
    search = {**common, "kl_divergence": 0.02, "n_good_prompts": 5, "n_good_refused_left_out": 3}
    held = {
        **common,
        "measured": True,
        "marker_refusals": 0,
        "base_marker_refusals": 3,
        "kl_divergence": None,  # every held-out good prompt refused: no KL left to measure
        "n_good_prompts": 0,
        "n_good_refused_left_out": 2,
    }
    rows = {what: (s, h) for what, s, h in figure_rows({"in_search": search, "held_out": held})}
    assert rows["KL divergence"] == ("0.0200", "-")
    s, h = rows["harmless prompts (KL)"]
    assert s == "5: good, less the 3 the original model refuses; first token"
    assert h == "0: good, less the 2 the original model refuses; first token"
