"""The fast evaluation paths give the numbers the plain paths give."""

from __future__ import annotations

import torch

from heretic.evaluation import Evaluator, MarkerJudge
from heretic.model import load_model
from heretic.optimization import dominated_by

PROMPTS = [f"Write item {i} of a list about {w}." for i, w in enumerate("abcdefghijklmnop")]


def _plain_greedy(model, prompts, max_new_tokens):
    batch = model.encode(prompts)
    with torch.inference_mode():
        out = model.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    return model.tokenizer.batch_decode(
        out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )


def test_row_dropping_generation_matches_plain_greedy(tiny_chat_model):
    model = load_model(str(tiny_chat_model), dtype="float32")
    reference = _plain_greedy(model, PROMPTS, 20)
    # Rows "decide" at different times, so rows leave the batch at different steps.
    decided = lambda text: len(text) > 0 and (hash(text[:3]) % 3 == 0)  # noqa: E731
    got = model.generate(PROMPTS, 20, batch_size=16, is_decided=None)
    assert got == reference
    dropped = model.generate(PROMPTS, 20, batch_size=16, is_decided=decided)
    for ref, text in zip(reference, dropped, strict=True):
        # A dropped row is a prefix of the plain response; an undecided row is all of it.
        assert ref.startswith(text)
        if not decided(text):
            assert text == ref


class _FakeModel:
    """Canned first-token log-probs and responses, batch by batch."""

    def __init__(self, chunks: list[list[str]]):
        self.chunks = chunks
        self.batches_generated = 0

    def first_token_logprobs(self, prompts, batch_size):
        return torch.log_softmax(torch.zeros(len(prompts), 5), dim=-1)

    def generate_chunks(self, prompts, max_new_tokens, batch_size, is_decided=None):
        for chunk in self.chunks:
            self.batches_generated += 1
            yield chunk

    def generate(self, prompts, max_new_tokens, batch_size, is_decided=None):
        return [r for chunk in self.chunks for r in chunk]


def test_dominated_trials_stop_early_and_others_are_exact():
    chunks = [["sorry"] * 3 + ["ok"], ["ok"] * 4, ["sorry", "sorry", "ok", "ok"]]
    judge = MarkerJudge(("sorry",))
    model = _FakeModel(chunks)
    evaluator = Evaluator(model, ["g"] * 3, ["b"] * 12, judge, 10, 4)
    assert evaluator.base_refusals == 5

    model.batches_generated = 0
    exact = evaluator.score(dominated=lambda kl, refusals: False)
    assert (exact.refusals, exact.pruned, model.batches_generated) == (5, None, 3)

    model.batches_generated = 0
    pruned = evaluator.score(dominated=lambda kl, refusals: refusals >= 3)
    assert pruned.pruned and pruned.refusals == 3 and model.batches_generated == 1

    # Dominated only after the last batch: the count is complete, so it is a normal score.
    model.batches_generated = 0
    late = evaluator.score(dominated=lambda kl, refusals: refusals >= 5)
    assert late.pruned is None and late.refusals == 5

    over = evaluator.score(kl_threshold=1e-9, dominated=None)
    assert over.pruned is None  # KL is exactly 0 here, so not above the threshold


def test_dominated_by():
    class T:
        def __init__(self, kl, refusals):
            self.values = [kl, refusals]

    front = [T(0.1, 5), T(0.5, 1)]
    assert dominated_by(front, 0.2, 5)
    assert dominated_by(front, 0.1, 6)
    assert not dominated_by(front, 0.1, 5)  # equal is not dominated
    assert not dominated_by(front, 0.05, 50)
    assert not dominated_by(front, 0.3, 2)
    assert not dominated_by([], 9.0, 99)


def test_pruned_trials_are_not_plotted_as_scores():
    import optuna

    from heretic.finish import scored_points
    from heretic.optimization import FINISHED

    study = optuna.create_study(directions=["minimize", "minimize"])
    done = study.ask()
    study.tell(done, [0.1, 3.0])
    pruned = study.ask()
    pruned.set_user_attr("refusals", 40)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    assert [t.state for t in study.trials] == list(FINISHED)
    points = scored_points(study)
    assert [(p.number, p.kl_divergence, p.refusals) for p in points] == [(0, 0.1, 3)]
