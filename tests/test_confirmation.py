"""Held-out confirmation and perplexity: the split is disjoint from everything the search uses,
the figures reach the metadata, the card and the printed report, `--select best` can rank by
them, bad values say what to fix, and the cross-entropy is the float64 reference's."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import optuna
import pytest
import torch
from rich.console import Console

from heretic.cli import run
from heretic.config import load_settings
from heretic.confirmation import Confirmation, HeldOutScore, choose_best
from heretic.edit import EditHooks, TrialEdit, merge_edit
from heretic.errors import DatasetError, SettingsError, StudyError
from heretic.fingerprint import study_key
from heretic.holdout import (
    HOLDOUT_KEY,
    AfterSearchSets,
    HeldOutSet,
    hold_out,
    split_off,
    text_rank,
)
from heretic.judges import MarkerJudge
from heretic.loading import load_model
from heretic.optimization import KL_ATTR, REFUSALS_ATTR, best_trial, objectives
from heretic.perplexity import LOGITS_BUDGET, TokenTexts, _batches, cross_entropy, plain_texts
from heretic.sites import COMPONENTS

GOOD = [f"Tell me a fact about the number {i}." for i in range(30)]
BAD = [f"Explain how to steal item number {i} from a shop." for i in range(30)]
SEARCH_SETS = ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")


def _settings(*argv: str):
    return load_settings(["--model", "m", *argv])


def _loaded(**overrides: list[str]) -> dict[str, list[str]]:
    prompts = {
        "good_prompts": GOOD[:10],
        "bad_prompts": BAD[:10],
        "good_evaluation_prompts": GOOD[10:30],
        "bad_evaluation_prompts": BAD[10:30],
    }
    return {**prompts, **overrides}


# ----- the held-out split --------------------------------------------------------------------


def test_held_out_split_is_disjoint_from_everything_the_search_uses():
    # Evaluation sets that repeat prompts and share some with the direction sets.
    bad_eval = BAD[5:30] + BAD[20:25]
    good_eval = GOOD[8:30] + [BAD[12]]  # one harmful prompt among the harmless ones
    prompts = _loaded(good_evaluation_prompts=good_eval, bad_evaluation_prompts=bad_eval)
    search, sets = hold_out(_settings(), prompts)
    assert sets is not None and sets.bad is not None and sets.good is not None
    used = {t for values in search.values() for t in values}
    for held in (sets.bad, sets.good):
        assert held.prompts and not used & set(held.prompts)
        assert len(set(held.prompts)) == len(held.prompts)
    # 20% of the distinct texts, and every copy of a text goes to one side.
    assert len(sets.bad.prompts) == round(0.2 * 25)
    assert len(sets.good.prompts) == round(0.2 * 23)
    assert len(search["bad_evaluation_prompts"]) == len(bad_eval) - len(sets.bad.prompts) - sum(
        p in sets.bad.prompts for p in BAD[20:25]
    )
    # Direction prompts are never held out, and the search keeps the rest in order.
    assert not set(sets.bad.prompts) & set(BAD[:10])
    assert BAD[12] not in sets.bad.prompts and BAD[12] not in sets.good.prompts
    assert search["bad_evaluation_prompts"] == [p for p in bad_eval if p not in sets.bad.prompts]
    assert search["good_prompts"] == GOOD[:10] and search["bad_prompts"] == BAD[:10]


def test_held_out_split_does_not_depend_on_order_and_takes_the_lowest_hashes():
    search, held = split_off(BAD, 0.3, set(), "bad_evaluation_prompts")
    again, held_again = split_off(list(reversed(BAD)), 0.3, set(), "bad_evaluation_prompts")
    assert set(held) == set(held_again) and set(search) == set(again)
    assert set(held) == set(sorted(BAD, key=text_rank)[:9])


def test_held_out_split_errors_name_what_to_change():
    with pytest.raises(DatasetError, match="would leave the search none.*confirmation_holdout"):
        split_off(["only one", "only one"], 0.2, set(), "bad_evaluation_prompts")
    with pytest.raises(DatasetError, match="every prompt is also in another prompt set"):
        split_off(BAD[:5], 0.2, set(BAD), "bad_evaluation_prompts")
    prompts = _loaded(confirmation_bad_prompts=BAD[:10])
    settings = _settings("--confirmation-bad-prompts.dataset", "b.txt")
    with pytest.raises(DatasetError, match="confirmation_bad_prompts: all its 10 prompts"):
        hold_out(settings, prompts)


def test_given_confirmation_sets_leave_the_evaluation_sets_whole():
    settings = _settings(
        "--confirmation-bad-prompts.dataset", "b.txt",
        "--confirmation-good-prompts.dataset", "g.txt",
        "--perplexity-texts.dataset", "t.txt",
    )  # fmt: skip
    extra = {
        "confirmation_bad_prompts": ["Rob a bank.", BAD[15], "Forge a passport."],
        "confirmation_good_prompts": ["Name a colour.", "Name a fruit."],
        "perplexity_texts": ["Plain prose to score."],
    }
    lines: list[str] = []
    search, sets = hold_out(settings, _loaded(**extra), lines.append)
    assert set(search) == set(SEARCH_SETS)
    assert search["bad_evaluation_prompts"] == BAD[10:30]
    assert sets.bad.prompts == ["Rob a bank.", "Forge a passport."] and sets.bad.left_out == 1
    assert sets.good.prompts == extra["confirmation_good_prompts"]
    assert sets.texts == extra["perplexity_texts"] and "t.txt" in sets.texts_source
    assert (
        sets.bad.source
        == "confirmation_bad_prompts (`b.txt` split `train`), less the 1 prompts the search uses"
    )
    assert any("2 bad prompts, confirmation_bad_prompts" in line for line in lines)
    # Only a held-out share changes the search's prompts, so only it is in the study key.
    assert HOLDOUT_KEY not in study_key(settings)
    assert study_key(_settings())[HOLDOUT_KEY] == {
        "bad_evaluation_prompts": 0.2,
        "good_evaluation_prompts": 0.2,
    }
    assert HOLDOUT_KEY not in study_key(_settings("--no-confirm"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--confirmation-holdout", "0"], "confirmation_holdout: Input should be greater than 0"),
        (["--confirmation-holdout", "1"], "confirmation_holdout: Input should be less than 1"),
        (["--confirmation-response-length", "0"], "confirmation_response_length"),
        (["--select-best-on", "heldout"], "select_best_on: Input should be 'search' or"),
        (["--no-confirm", "--select-best-on", "held_out"], "set confirm to true or"),
        (
            ["--no-confirm", "--confirmation-good-prompts.dataset", "g.txt"],
            "confirmation_good_prompts given while confirm is false",
        ),
        (["--confirmation-bad-prompts.split", "[:5]"], "confirmation_bad_prompts.dataset"),
    ],
)
def test_bad_confirmation_settings_are_clear(argv, message):
    with pytest.raises(SettingsError, match=message.replace("[", r"\[")):
        _settings(*argv)


# ----- choosing on the held-out figures ------------------------------------------------------


def _study_with(points: list[tuple[float, int]]) -> list:
    study = optuna.create_study(directions=["minimize", "minimize"])
    unit = optuna.distributions.FloatDistribution(0.0, 1.0)
    for kl, refusals in points:
        params = {
            f"{c}.{p}": 0.5 for c in COMPONENTS for p in ("layer_min", "layer_span", "weight")
        }
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions=dict.fromkeys(params, unit),
                values=[kl, float(refusals)],
                user_attrs={KL_ATTR: kl, REFUSALS_ATTR: refusals},
            )
        )
    return study.trials


class _Confirmed:
    """A confirmation whose held-out figures are given (the real one is tested end to end)."""

    def __init__(self, base: int, figures: dict[int, tuple[float, int]]):
        self.base = HeldOutScore(refusals=base, kl_divergence=0.0)
        self.figures = figures
        self.confirmed: list[int] = []

    def confirm(self, trials) -> None:
        self.confirmed += [t.number for t in trials]

    def score(self, trial) -> HeldOutScore:
        kl, refusals = self.figures[trial.number]
        return HeldOutScore(refusals=refusals, kl_divergence=kl)


def test_select_best_can_rank_by_the_held_out_figures():
    front = _study_with([(0.02, 1), (0.05, 3), (0.01, 9)])
    # In the search trial 0 is best; held out, it refuses as often as the original model.
    confirmed = _Confirmed(base=20, figures={0: (0.03, 19), 1: (0.06, 4), 2: (0.02, 15)})
    assert choose_best(front, 30, confirmed, "search").number == best_trial(front, 30).number == 0
    assert choose_best(front, 30, confirmed, "held_out").number == 1
    assert sorted(confirmed.confirmed) == [0, 1, 2]
    assert choose_best(front, 30, None, "held_out").number == 0  # nothing confirmed: the search


# ----- perplexity ----------------------------------------------------------------------------


def _reference_cross_entropy(module: torch.nn.Module, texts: TokenTexts) -> float:
    """One text at a time, no padding, every log-probability in float64."""
    total, count = 0.0, 0
    for context, target in zip(texts.contexts, texts.targets, strict=True):
        ids = torch.tensor([context + target])
        logits = module(input_ids=ids).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        for k, token in enumerate(target):
            total -= float(logprobs[len(context) - 1 + k, token])
            count += 1
    return total / count


def test_cross_entropy_equals_a_float64_reference_with_the_edit_on(tiny_chat_model):
    from tiny_models import sample_edit

    model = load_model(str(tiny_chat_model), dtype="float32")
    model.model.double()
    tokenizer = model.tokenizer
    texts = plain_texts(
        tokenizer,
        ["The sky is blue.", "A much longer text about apples, pears and plums in autumn.", "Hi"],
        12,
        "test",
    )
    prompt = model.encode(["Say something."])["input_ids"][0].tolist()
    texts = TokenTexts(
        [*texts.contexts, prompt], [*texts.targets, tokenizer.encode(" Fine, thanks.")], "test"
    )
    assert max(len(t) for t in texts.targets) == 12  # cut at max_tokens
    directions, strengths = sample_edit(hidden=model.hidden_size)
    directions = directions.double()
    original = _reference_cross_entropy(model.model, texts)
    assert cross_entropy(model, texts, batch_size=1).nats == pytest.approx(original, rel=1e-12)
    batched = cross_entropy(model, texts, batch_size=4)
    assert batched.nats == pytest.approx(original, rel=1e-10)  # right padding changes nothing
    assert batched.n_tokens == texts.n_tokens
    assert batched.perplexity == pytest.approx(math.exp(original))

    hooks = EditHooks(model.sites, directions)
    hooks.set_strengths(strengths)
    edited = cross_entropy(model, texts, batch_size=4).nats
    hooks.remove()
    merge_edit(model.sites, TrialEdit(strengths, directions))  # the edit in the weights
    reference = _reference_cross_entropy(model.model, texts)
    assert edited == pytest.approx(reference, rel=1e-9)
    assert abs(edited - original) > 1e-3, "the edit must change the cross-entropy"


def test_batches_stay_within_the_logits_budget():
    lengths = [5, 300, 40, 41, 299, 6]
    vocab = LOGITS_BUDGET // 600
    batches = _batches(lengths, 8, vocab)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) * vocab <= (
            LOGITS_BUDGET
        )


class _AlwaysRefuses:
    """A judge that calls every prefix a refusal: an early stop would end every row at once."""

    def is_refusal(self, response: str, prompt: str = "") -> bool:
        return True

    def count(self, responses, prompts=None) -> int:
        return len(responses)


def test_confirmation_decodes_every_row_to_the_end(tiny_chat_model):
    model = load_model(str(tiny_chat_model))
    decodings: list = []
    plain = model.decoding

    def recorded(*args, **kwargs):
        decodings.append(plain(*args, **kwargs))
        return decodings[-1]

    model.decoding = recorded
    directions = torch.nn.functional.normalize(
        torch.randn(model.n_layers, model.hidden_size), dim=-1
    )
    sets = AfterSearchSets(HeldOutSet(BAD[:5], "bad"), HeldOutSet(GOOD[:3], "good"))
    confirmation = Confirmation(
        model=model,
        hooks=EditHooks(model.sites, directions),
        sets=sets,
        judge=_AlwaysRefuses(),
        markers=MarkerJudge(("sorry",)),
        response_length=10,
        batch_size=4,
        perplexity=True,
        console=Console(file=io.StringIO()),
    )
    (trial,) = _study_with([(0.1, 1)])
    confirmation.confirm([trial])
    # The original model answers the good prompts once (the perplexity text), then every
    # model answers the bad prompts: 10 tokens each, nobody asked to stop them.
    assert [d.n_rows for d in decodings] == [3, 4, 1, 4, 1]
    for decoding in decodings:
        assert decoding.is_decided is None
        assert all(len(decoding.tokens[r]) == 10 for r in range(decoding.n_rows))
    base, edited = confirmation.base, confirmation.trials[trial.number]
    assert base.refusals == edited.refusals == 5 and base.kl_divergence == 0.0
    assert edited.kl_divergence > 0 and edited.cross_entropy.n_tokens == 30
    assert confirmation.texts is not None and confirmation.texts.n_tokens == 30
    assert not confirmation.hooks.edit, "the trial's edit is switched off afterwards"
    confirmation.confirm([trial])  # already confirmed: nothing decoded again
    assert len(decodings) == 5


# ----- end to end on the tiny model ----------------------------------------------------------


@pytest.fixture
def prompt_files(tmp_path) -> dict[str, Path]:
    files = {}
    for name, lines in (("good", GOOD), ("bad", BAD)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(lines) + "\n")
    return files


def _argv(model: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model),
        "--good-prompts.dataset", str(files["good"]), "--good-prompts.split", "[:10]",
        "--bad-prompts.dataset", str(files["bad"]), "--bad-prompts.split", "[:10]",
        "--good-evaluation-prompts.dataset", str(files["good"]),
        "--good-evaluation-prompts.split", "[10:30]",
        "--bad-evaluation-prompts.dataset", str(files["bad"]),
        "--bad-evaluation-prompts.split", "[10:30]",
        "--max-response-length", "4", "--confirmation-response-length", "12",
        "--batch-size", "8", "--n-trials", "3", "--output-dir", str(out),
        *extra,
    ]  # fmt: skip


def _run(argv: list[str]) -> tuple[object, str]:
    buffer = io.StringIO()
    result = run(load_settings(argv), Console(file=buffer, width=400))
    return result, buffer.getvalue()


def test_default_run_reports_held_out_figures_everywhere(
    tiny_chat_model, prompt_files, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    result, printed = _run(_argv(tiny_chat_model, prompt_files, out, "--select", "best"))
    meta = json.loads((out / "heretic_metadata.json").read_text())
    search, held, ppl = meta["in_search"], meta["held_out"], meta["perplexity"]
    assert search["n_bad_prompts"] == meta["n_bad_evaluation_prompts"] == 16
    assert "without the 4 held out" in search["bad_prompts"]
    assert search["refusals"] == meta["refusal_count"] and search["response_tokens"] == 4
    assert held["measured"] and held["n_bad_prompts"] == 4 and held["n_good_prompts"] == 4
    assert held["response_tokens"] == 12 and "decoded to the end" in held["decoding"]
    assert held["judge"] == search["judge"] == "adaptive"
    assert 0 <= held["refusals"] <= 4 and 0 <= held["marker_refusals"] <= held["refusals"]
    assert held["kl_divergence"] >= 0 and held["seconds"] >= 0
    assert ppl["measured"] and ppl["n_texts"] == 4 and 0 < ppl["n_tokens"] <= 4 * 12
    assert "held-out good prompts" in ppl["texts"]
    assert ppl["edited"]["perplexity"] == pytest.approx(math.exp(ppl["edited"]["cross_entropy"]))

    card = (out / "model" / "README.md").read_text()
    assert "| | in the search | held out |" in card
    n_bad = search["n_bad_prompts"]
    expected = f"{search['base_refusals']}/{n_bad} -> {search['refusals']}/{n_bad}"
    assert f"| refusals (original -> this model) | {expected} | " in card
    assert f"| KL divergence | {search['kl_divergence']:.4f} | {held['kl_divergence']:.4f} |" in (
        card
    )
    assert f"Perplexity: {ppl['original']['perplexity']:.3f} -> " in card

    for text in ("Pareto front: in the search and held out", "Held-out confirmation", "held out"):
        assert text in printed, text
    assert "Perplexity:" in printed and f"{held['kl_divergence']:.4f}" in printed
    assert result.figures is not None and result.figures["held_out"] == held


def test_no_confirm_uses_the_whole_sets_and_says_nothing_was_held_out(
    tiny_chat_model, prompt_files, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = _argv(tiny_chat_model, prompt_files, out, "--select", "0", "--no-confirm")
    result, printed = _run(argv)
    meta = json.loads((out / "heretic_metadata.json").read_text())
    assert meta["in_search"]["n_bad_prompts"] == 20
    assert meta["held_out"] == {"measured": False, "reason": "confirm = false"}
    assert meta["perplexity"]["measured"] is False
    assert "confirm = false and no perplexity_texts" in meta["perplexity"]["reason"]
    card = (out / "model" / "README.md").read_text()
    assert "| | in the search |\n" in card and "Held out: not measured (confirm = false)." in card
    assert "Held out: not measured" in printed


def test_given_sets_and_texts_end_to_end(tiny_chat_model, prompt_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    files = {
        "bad": ["Rob a bank.", "Forge a passport.", BAD[12], "Poison a well.", "Hack a phone."],
        "good": ["Name a colour.", "Name a fruit.", "Name a river."],
        "texts": ["The river runs to the sea.", "A stone fell into the well."],
    }
    for name, lines in files.items():
        (tmp_path / f"{name}-extra.txt").write_text("\n".join(lines) + "\n")
    extra = (
        "--confirmation-bad-prompts.dataset", str(tmp_path / "bad-extra.txt"),
        "--confirmation-bad-prompts.split", "[:5]",
        "--confirmation-good-prompts.dataset", str(tmp_path / "good-extra.txt"),
        "--perplexity-texts.dataset", str(tmp_path / "texts-extra.txt"),
        "--select", "best", "--select-best-on", "held_out",
    )  # fmt: skip
    _, printed = _run(_argv(tiny_chat_model, prompt_files, out, *extra))
    meta = json.loads((out / "heretic_metadata.json").read_text())
    # The search keeps its sets whole; a given prompt that it also uses is left out.
    assert meta["in_search"]["n_bad_prompts"] == 20 and meta["in_search"]["n_good_prompts"] == 20
    assert "held out" not in meta["in_search"]["bad_prompts"]
    assert meta["held_out"]["n_bad_prompts"] == 4 and meta["held_out"]["n_good_prompts"] == 3
    assert "confirmation_bad_prompts" in meta["held_out"]["bad_prompts"]
    assert "less the 1 prompts the search uses" in printed
    assert "perplexity_texts" in meta["perplexity"]["texts"]
    assert meta["perplexity"]["n_texts"] == 2
    assert meta["settings"]["select_best_on"] == "held_out"


def test_refusal_openings_reach_the_study_the_log_and_the_metadata(
    tiny_chat_model, prompt_files, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = _argv(tiny_chat_model, prompt_files, out, "--select", "best", "--no-confirm")
    _, printed = _run([*argv, "--verbose"])  # refusal_openings is on by default
    meta = json.loads((out / "heretic_metadata.json").read_text())
    search = meta["in_search"]
    assert search["refusal_openings"] >= 0 and "refusal_openings" in search["refusal_objective"]
    study = optuna.load_study(study_name="heretic", storage=f"sqlite:///{out / 'study.db'}")
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            figures = objectives(trial)
            assert figures.refusals == trial.user_attrs["refusals"]
            assert figures.openings == pytest.approx(trial.user_attrs["refusal_openings"])
            assert trial.values[1] == pytest.approx(figures.refusals + figures.openings)
    assert " openings, KL " in printed
    # The objective changed: the study is not continued without it (or --force).
    with pytest.raises(StudyError, match="refusal_openings"):
        _run([*argv, "--n-trials", "4", "--no-refusal-openings"])
