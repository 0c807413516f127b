"""The generalization benchmark's shipped data and its pure parts (no model, no search)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import generalization  # noqa: E402  (a script in benchmarks/, not a package)

XSTEST = ROOT / "benchmarks" / "data" / "xstest_prompts.csv"


def test_xstest_is_shipped_whole_with_its_attribution():
    with open(XSTEST, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["id"]) for r in rows] == list(range(1, 451))
    labels = [r["label"] for r in rows]
    assert labels.count("safe") == 250 and labels.count("unsafe") == 200
    assert len(generalization.xstest("unsafe")) == 200
    assert len(generalization.xstest("safe")) == 250
    readme = (ROOT / "benchmarks" / "data" / "README.md").read_text()
    for needed in ("paul-rottger/exaggerated-safety", "CC-BY-4.0", "Röttger et al. 2024"):
        assert needed in readme


def trial(refusals: int, kl: float, number: int):
    return SimpleNamespace(user_attrs={"refusals": refusals, "kl_divergence": kl}, number=number)


def test_upstream_trial_is_chosen_by_heretics_rule():
    """Nearest the origin with refusals scaled by the base count; a point that did nothing
    (above 90% of the base refusals) is passed over even though its KL is tiny."""
    front = [trial(2, 0.30, 0), trial(10, 0.05, 1), trial(85, 0.001, 2)]
    assert generalization.choose_like_heretic(front, base_refusals=90) == 1
    assert generalization.choose_like_heretic(front, base_refusals=10) == 0
    assert generalization.choose_like_heretic([trial(85, 0.001, 0)], 90) == 0


def test_a_source_the_search_used_is_not_counted_as_held_out():
    assert generalization.used_sources("advbench") == {"advbench_rest"}
    assert "harmful_train" in generalization.used_sources("mixed")
    # Harmless prompts are never held-out harmful sources.
    assert generalization.used_sources("advbench-good2000") == {"advbench_rest"}
    assert generalization.used_sources("advbench-kl300") == {"advbench_rest"}
    for mix in generalization.MIXES:
        assert "harmful_val" not in generalization.used_sources(mix)


@pytest.mark.skipif(
    generalization.find_shared() is None, reason="needs ../shared/data (the prompt files)"
)
@pytest.mark.parametrize("mix", list(generalization.MIXES))
def test_search_and_held_out_prompts_do_not_overlap(mix):
    search = generalization.search_prompts(mix, generalization.Sizes())
    held = generalization.held_out_prompts(generalization.Sizes())
    seen = set(search["bad_prompts"]) | set(search["bad_evaluation_prompts"])
    assert not set(search["bad_prompts"]) & set(search["bad_evaluation_prompts"])
    for name, prompts in held.items():
        assert not seen & set(prompts), f"{mix}: {name} overlaps the search's prompts"
    harmless = set(search["good_prompts"]) | set(search["good_evaluation_prompts"])
    assert not harmless & set(generalization.unseen_harmless())


def test_capped_prompts_are_evenly_spread_and_match_capped_responses():
    sizes = generalization.Sizes(cap=100)
    values = [f"p{i}" for i in range(200)]
    assert generalization.spread(values, 100) == values[::2]
    assert generalization.spread(values, None) == values
    assert generalization.spread(values[:39], 100) == values[:39]
    responses = {"xstest_unsafe": values}
    assert generalization.capped(responses, sizes)["xstest_unsafe"] == values[::2]


def test_refusal_opening_probability_is_the_same_batched_and_alone(tiny_chat_model):
    """Prompts of different lengths, padded into one batch, score as each does alone; and the
    figure is the mean of the first-token probability and of the per-token geometric mean,
    computed here by hand."""
    import math

    import torch
    from refusal_openings import Opening, opening_probability, refusal_openings

    from heretic.judges import MarkerJudge
    from heretic.loading import load_model

    model = load_model(str(tiny_chat_model), dtype="float32")
    tokenizer = model.tokenizer
    prompts = ["Hi", "Tell me a long story about a dragon and a knight, please.", "How?"]
    responses = ["I'm sorry, I cannot help.", "Sure, here it is.", "Sorry, no way at all."]
    openings = refusal_openings(tokenizer, prompts, responses, MarkerJudge(("sorry",)), tokens=4)
    assert [o.prompt for o in openings] == ["Hi", "How?"]
    assert all(len(o.token_ids) == 4 for o in openings)

    def alone(opening: Opening) -> tuple[float, float]:
        ids = tokenizer(model.format_chat(opening.prompt), add_special_tokens=False)["input_ids"]
        ids = torch.tensor([ids + opening.token_ids])
        with torch.inference_mode():
            logprobs = torch.log_softmax(model.runner(input_ids=ids).logits[0].double(), -1)
        n = len(opening.token_ids)
        picked = [logprobs[-n - 1 + i, t].item() for i, t in enumerate(opening.token_ids)]
        return math.exp(picked[0]), math.exp(sum(picked) / n)

    expected = [alone(o) for o in openings]
    batched = opening_probability(model, openings, batch_size=2)
    assert batched["first"] == pytest.approx(sum(e[0] for e in expected) / 2, rel=1e-4)
    assert batched["geometric"] == pytest.approx(sum(e[1] for e in expected) / 2, rel=1e-4)
    with pytest.raises(ValueError, match="refused none"):
        opening_probability(model, [])


def test_kl_figures_read_each_column_from_its_own_prompts():
    import torch

    from heretic.evaluation import kl_divergence

    torch.manual_seed(0)
    n = 100 + 500
    base = torch.log_softmax(torch.randn(n, 7), -1)
    edited = torch.log_softmax(torch.randn(n, 7), -1)
    answered = torch.ones(generalization.N_ANSWERED, dtype=torch.bool)
    answered[[105, 150]] = False
    figures = generalization.kl_figures(base, edited, answered)
    assert figures["kl_search"] == pytest.approx(kl_divergence(base[:100], edited[:100]))
    assert figures["kl"] == pytest.approx(kl_divergence(base[100:200], edited[100:200]))
    assert figures["kl_500"] == pytest.approx(kl_divergence(base[100:], edited[100:]))
    keep = [i for i in range(100, 200) if i not in (105, 150)]
    assert figures["kl_answered"] == pytest.approx(kl_divergence(base[keep], edited[keep]))
