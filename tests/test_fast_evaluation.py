"""The fast evaluation paths give the numbers the plain paths give."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import TEXT as COMMON
from tiny_models import plain_greedy, tiny_model

from heretic.abliteration import first_edited_layer
from heretic.directions import normalize
from heretic.edit import EditHooks
from heretic.evaluation import Evaluator
from heretic.judges import MarkerJudge
from heretic.loading import load_model
from heretic.model import Model, ModelSource
from heretic.optimization import dominated_by, objectives
from heretic.sites import ATTN, COMPONENTS, MLP

PROMPTS = [f"Write item {i} of a list about {w}." for i, w in enumerate("abcdefghijklmnop")]


def test_row_dropping_generation_matches_plain_greedy(tiny_chat_model):
    model = load_model(str(tiny_chat_model), dtype="float32")
    reference = plain_greedy(model, PROMPTS, 20)
    # Rows "decide" at different times, so rows leave the batch at different steps.
    decided = lambda text, _prompt="": len(text) > 0 and (hash(text[:3]) % 3 == 0)  # noqa: E731
    got = model.generate(PROMPTS, 20, batch_size=16, is_decided=None)
    assert got == reference
    dropped = model.generate(PROMPTS, 20, batch_size=16, is_decided=decided)
    for ref, text in zip(reference, dropped, strict=True):
        # A dropped row is a prefix of the plain response; an undecided row is all of it.
        assert ref.startswith(text)
        if not decided(text):
            assert text == ref


class _FakeDecoding:
    """Canned responses: row i's text is final after `steps[i]` steps (tokens are words)."""

    def __init__(self, texts: list[str], steps: list[int], log: list[int], batch: int):
        self.texts, self.steps, self.log, self.batch = texts, steps, log, batch
        self.n_steps = 0
        self.produced = 0

    @property
    def done(self) -> bool:
        return self.n_steps >= max(self.steps)

    def step(self) -> list[int]:
        self.n_steps += 1
        self.produced += 8
        self.log.append(self.batch)
        return [i for i, s in enumerate(self.steps) if s == self.n_steps]

    def response(self, row: int) -> str:
        return self.texts[row] if self.n_steps >= self.steps[row] else ""

    def prompt(self, row: int) -> str:
        return ""

    def responses(self) -> list[str]:
        return [self.response(i) for i in range(len(self.texts))]

    @property
    def n_rows(self) -> int:
        return len(self.texts)

    def unanswered(self, row: int) -> bool:
        return False


class _FakeModel:
    """Canned first-token log-probs; bad prompts are 'b<i>' and get the canned rows of i."""

    reader = SimpleNamespace(may_think=False)  # a model that does not think

    def __init__(self, rows: list[tuple[str, int]]):
        self.rows = rows
        self.steps_log: list[int] = []

    def length_order(self, prompts):
        return list(range(len(prompts)))

    def first_token_logprobs(self, prompts, batch_size, **_kwargs):
        return torch.log_softmax(torch.zeros(len(prompts), 5), dim=-1)

    def decoding(self, prompts, max_new_tokens, is_decided=None, check_every=8):
        rows = [self.rows[int(p[1:])] for p in prompts]
        batch = int(prompts[0][1:]) // 4
        return _FakeDecoding([t for t, _ in rows], [s for _, s in rows], self.steps_log, batch)


def _bad(n):
    return [f"b{i}" for i in range(n)]


def test_dominated_trials_stop_early_and_others_are_exact():
    # Three batches of 4; refusals are decided at step 1, answers end at step 3.
    rows = [("sorry", 1)] * 3 + [("ok", 3)] + [("ok", 3)] * 4 + [("sorry", 1)] * 2 + [("ok", 3)] * 2
    judge = MarkerJudge(("sorry",))
    model = _FakeModel(rows)
    evaluator = Evaluator(model, ["g"] * 3, _bad(12), judge, 24, 4)
    assert evaluator.base_refusals == 5
    assert evaluator.base_responses == [t for t, _ in rows]

    model.steps_log.clear()
    exact = evaluator.score(dominated=lambda kl, refusals: False)
    assert (exact.refusals, exact.pruned) == (5, None)
    assert model.steps_log == [0] * 3 + [1] * 3 + [2] * 3

    # Pruned as soon as a step's final responses reach the bound: step 1 of batch 0.
    model.steps_log.clear()
    pruned = evaluator.score(dominated=lambda kl, refusals: refusals >= 3)
    assert pruned.pruned and pruned.refusals == 3 and model.steps_log == [0]

    # The last refusals are final at step 1 of batch 2, before its answers end.
    model.steps_log.clear()
    late = evaluator.score(dominated=lambda kl, refusals: refusals >= 5)
    assert late.pruned == "dominated after 10/12 responses" and model.steps_log == [0] * 3 + [
        1
    ] * 3 + [2]

    # A bound that is reached only when every response is final: a normal, complete score.
    rows[-1] = ("sorry", 3)
    final = evaluator.score(dominated=lambda kl, refusals: refusals >= 6)
    assert final.pruned is None and final.refusals == 6

    over = evaluator.score(kl_threshold=1e-9, dominated=None)
    assert over.pruned is None  # KL is exactly 0 here, so not above the threshold


def test_screening_decodes_every_batch_first_and_keeps_scores_exact():
    rows = [("ok", 3)] * 4 + [("ok", 3)] * 4 + [("sorry", 1)] * 4
    judge = MarkerJudge(("sorry",))
    model = _FakeModel(rows)
    plain = Evaluator(model, ["g"], _bad(12), judge, 24, 4)
    screened = Evaluator(model, ["g"], _bad(12), judge, 24, 4, screening_tokens=8)

    model.steps_log.clear()
    assert screened.score(dominated=lambda kl, n: False).refusals == 4
    # One step of every batch first, then each batch to the end.
    assert model.steps_log == [0, 1, 2, 0, 0, 1, 1]

    # The refusals of the last batch are seen after 3 steps instead of 7.
    model.steps_log.clear()
    early = screened.score(dominated=lambda kl, n: n >= 4)
    assert early.pruned and model.steps_log == [0, 1, 2]
    model.steps_log.clear()
    late = plain.score(dominated=lambda kl, n: n >= 4)
    assert late.pruned is None and len(model.steps_log) == 7


def test_screening_gives_the_plain_scores_on_a_real_model(tiny_chat_model):
    model = load_model(str(tiny_chat_model), dtype="float32")
    judge = MarkerJudge(("a", "e"))  # tiny random models babble: some rows decide early
    plain = Evaluator(model, PROMPTS[:5], PROMPTS, judge, 20, 16)
    screened = Evaluator(model, PROMPTS[:5], PROMPTS, judge, 20, 6, screening_tokens=8)
    assert plain.base_responses == screened.base_responses
    assert plain.score().refusals == screened.score(dominated=lambda kl, n: False).refusals
    # Responses come back in prompt order, whatever order the length-sorted batches ran in.
    reference = plain_greedy(model, PROMPTS, 20)
    for ref, text in zip(reference, plain.base_responses, strict=True):
        assert ref.startswith(text)


def test_dominated_by():
    class T:
        def __init__(self, kl, objective, refusals=None):
            self.values = [kl, objective]
            self.user_attrs = {} if refusals is None else {"refusals": refusals}

    front = [T(0.1, 5), T(0.5, 1)]
    assert dominated_by(front, 0.2, 5)
    assert dominated_by(front, 0.1, 6)
    assert not dominated_by(front, 0.1, 5)  # equal is not dominated
    assert not dominated_by(front, 0.05, 50)
    assert not dominated_by(front, 0.3, 2)
    assert not dominated_by([], 9.0, 99)
    # With openings the refusal objective is the count plus a margin: trials tied at 0
    # refusals are ordered by it.
    margin = [T(0.1, 0.4, refusals=0)]
    assert dominated_by(margin, 0.2, 0.5)
    assert not dominated_by(margin, 0.2, 0.3)
    assert objectives(margin[0]).refusals == 0
    assert objectives(margin[0]).openings == pytest.approx(0.4)


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


@pytest.mark.parametrize(
    "name", ["gemma3_text", "llama", "mistral", "mixtral", "phi3", "qwen2", "qwen3", "qwen3_moe"]
)
def test_skipping_unedited_layers_gives_the_same_log_probs(name, chat_tokenizer_dir):
    """Bit-identical KL passes whether or not the layers below the edit are replayed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    net = tiny_model(name, vocab_size=len(tokenizer), num_hidden_layers=5)
    model = Model(net, tokenizer, source=ModelSource(name, None), system_prompt="Be brief.")
    judge = MarkerJudge(("sorry",))
    good = PROMPTS[:7]
    logged: list[str] = []
    evaluator = Evaluator(
        model, good, PROMPTS[:2], judge, 2, 3, layer_skip_bytes=2**30, log=logged.append
    )
    assert evaluator.layer_outputs is not None, logged
    assert evaluator.layer_outputs.layers == [0, 1, 2, 3]  # never the last layer
    assert "skip unedited layers" in logged[0]

    g = torch.Generator().manual_seed(1)
    hooks = EditHooks(model.sites, normalize(torch.randn(5, COMMON["hidden_size"], generator=g)))
    for first in range(5):
        strengths = {c: torch.zeros(5) for c in COMPONENTS}
        strengths[ATTN][first:] = 0.9
        strengths[MLP][min(first + 1, 4)] = 1.1
        hooks.set_strengths(strengths)
        assert first_edited_layer(strengths) == first
        sorted_good = evaluator._good_sorted
        plain = model.first_token_logprobs(sorted_good, 3)
        skipped = model.first_token_logprobs(
            sorted_good, 3, resume=evaluator.layer_outputs, start_layer=first
        )
        assert torch.equal(plain, skipped), (name, first)
        assert evaluator.kl(first) == evaluator.kl(0) > 0
    hooks.remove()
    # After replays every layer runs its own forward again.
    torch.testing.assert_close(
        model.first_token_logprobs(evaluator._good_sorted, 3),
        evaluator.base_logprobs,
        rtol=0,
        atol=0,
    )


def test_layer_skip_is_switched_off_when_the_replay_differs(tiny_chat_model, monkeypatch):
    model = load_model(str(tiny_chat_model), dtype="float32")
    real = Model.first_token_logprobs

    def perturbed(self, prompts, batch_size, **kwargs):
        out = real(self, prompts, batch_size, **kwargs)
        return out + 1e-6 if kwargs.get("resume") is not None else out

    monkeypatch.setattr(Model, "first_token_logprobs", perturbed)
    logged: list[str] = []
    evaluator = Evaluator(
        model, PROMPTS[:4], PROMPTS[:2], MarkerJudge(("x",)), 2, 2,
        layer_skip_bytes=2**30, log=logged.append,
    )  # fmt: skip
    assert evaluator.layer_outputs is None
    assert logged == ["Skipping unedited layers is off: on this model it changes the log-probs"]
    assert first_edited_layer({ATTN: torch.zeros(2), MLP: torch.zeros(2)}) == 2


def test_pooling_the_undecided_rows_keeps_their_responses(tiny_chat_model):
    """Survivors of four batches continue as fewer, larger batches with the same tokens."""
    from heretic.decoding import regroup

    model = load_model(str(tiny_chat_model), dtype="float32")
    prompts = PROMPTS + [p + " Be very detailed about it, please." for p in PROMPTS[:4]]
    reference = plain_greedy(model, prompts, 24)
    seen: list[tuple[str, str]] = []

    def decided(text: str, prompt: str = "") -> bool:
        seen.append((prompt, text))
        return len(text) > 0 and (hash(text[:3]) % 3 == 0)

    decodings = [model.decoding(prompts[k : k + 5], 24, decided) for k in range(0, 20, 5)]
    for d in decodings:
        d.step()  # 8 tokens: the screening horizon
    alive = sum(len(d._active) for d in decodings)
    pooled = regroup(decodings, batch_size=10)
    assert len(pooled) == -(-alive // 10) < len(decodings)
    assert all(d.done for d in decodings)  # the old batches hand their rows over
    for d in pooled:
        while not d.done:
            d.step()
    # The judge sees every row with its own prompt, pooled rows included.
    of_prompt = dict(zip(prompts, reference, strict=True))
    assert len(of_prompt) == len(prompts) and {p for p, _ in seen} == set(prompts)
    assert all(of_prompt[prompt].startswith(text) for prompt, text in seen)
    got = [r for d in decodings for r in d.responses()]
    for ref, text in zip(reference, got, strict=True):
        assert ref.startswith(text)
        if not decided(text):
            assert text == ref


def test_pooling_that_splits_one_batch_over_two_groups(tiny_chat_model):
    """Ten survivors of one batch and two of two others, pooled by 7: the first batch's rows
    land in both groups, and each group must decode with its own rows' caches."""
    from heretic.decoding import regroup

    model = load_model(str(tiny_chat_model), dtype="float32")
    prompts = PROMPTS[:14]
    reference = plain_greedy(model, prompts, 24)
    decodings = [model.decoding(prompts[a:b], 24) for a, b in ((0, 10), (10, 12), (12, 14))]
    for d in decodings:
        d.step()
    pooled = regroup(decodings, batch_size=7)
    assert len(pooled) == 2
    assert [len(d._active) for d in pooled] == [7, 7]
    for d in pooled:
        while not d.done:
            d.step()
    assert [r for d in decodings for r in d.responses()] == reference


def test_an_empty_final_response_counts_as_a_refusal():
    judge = MarkerJudge(("sorry",))
    assert judge.count(["", "  \n", "Sure, here it is.", "Sorry, no."]) == 3
    assert not judge.is_refusal("")  # a response being generated starts empty
    # Rows 0-3 refuse, row 4 answers with nothing at all, the rest answer.
    rows = [("sorry", 1)] * 4 + [("", 1)] + [("ok", 3)] * 3
    evaluator = Evaluator(_FakeModel(rows), ["g"], _bad(8), judge, 24, 4)
    assert evaluator.base_refusals == 5
    assert evaluator.score().refusals == 5


class _OpeningModel(_FakeModel):
    """A fake whose first-token log-probs are set per test: the original model's, then an
    edited one's."""

    def __init__(self, rows, logits):
        super().__init__(rows)
        self.logits = logits

    def first_token_logprobs(self, prompts, batch_size, **_kwargs):
        if not prompts[0].startswith("b"):  # the good prompts: any fixed log-probs
            return super().first_token_logprobs(prompts, batch_size)
        return torch.log_softmax(self.logits[[int(p[1:]) for p in prompts]], dim=-1)

    def decoding(self, prompts, max_new_tokens, is_decided=None, check_every=8):
        decoding = super().decoding(prompts, max_new_tokens, is_decided, check_every)
        decoding.prompt = lambda row: prompts[row]
        decoding.thinking = lambda row: ""
        return decoding


def test_refusal_openings_add_the_answered_prompts_margin_and_bound_it_exactly():
    rows = [("sorry", 1), ("sorry", 1), ("ok", 3), ("ok", 3)]
    base = torch.tensor([[0, 0, 5.0, 0], [0, 0, 0, 5.0], [5.0, 0, 0, 0], [5.0, 0, 0, 0]])
    base = torch.cat([base, torch.zeros(4, 1)], dim=1)  # the good prompts' vocabulary: 5
    model = _OpeningModel(rows, base)
    judge = MarkerJudge(("sorry",))
    evaluator = Evaluator(model, ["g"], _bad(4), judge, 24, 2, refusal_openings=True)
    # The openings are the original model's first tokens on the prompts it refuses.
    assert evaluator.base_refusals == 2 and evaluator.opening_tokens == {0: 2, 1: 3}

    # The edit: b0 still refuses (p 0.5 of its opening), b1 answers with p 0.1 of its own.
    p = torch.tensor(
        [[0.3, 0.1, 0.5, 0.1, 0], [0.3, 0.3, 0.3, 0.1, 0], [1.0, 0, 0, 0, 0]] * 1
        + [[1.0, 0, 0, 0, 0]]
    )
    model.logits = p.clamp_min(1e-12).log()
    rows[1] = ("ok", 3)
    assert evaluator.opening_probabilities() == pytest.approx({"b0": 0.5, "b1": 0.1})
    bounds = []
    score = evaluator.score(dominated=lambda kl, objective: bounds.append(objective) or False)
    assert (score.refusals, score.pruned) == (1, None)
    assert score.openings == pytest.approx(0.1) and score.objective == pytest.approx(1.1)
    # Every bound checked is at most the final objective: pruning never changes a front.
    assert bounds and all(b <= score.objective + 1e-12 for b in bounds)
    assert bounds[0] == pytest.approx(1.1)  # b0 refused at step 1: only b1's opening is left

    pruned = evaluator.score(dominated=lambda kl, objective: objective >= 1.05)
    assert pruned.pruned and pruned.refusals == 1 and pruned.openings == pytest.approx(0.1)
    off = Evaluator(model, ["g"], _bad(4), judge, 24, 2).score()
    assert off.openings is None and off.objective == off.refusals


def test_refusal_openings_on_a_real_model_match_a_float64_reference(tiny_chat_model):
    model = load_model(str(tiny_chat_model), dtype="float32")
    judge = MarkerJudge(("a", "e"))  # tiny random models babble: some rows "refuse"
    plain = Evaluator(model, PROMPTS[:3], PROMPTS, judge, 20, 6, refusal_openings=True)
    screened = Evaluator(
        model, PROMPTS[:3], PROMPTS, judge, 20, 6, screening_tokens=8, refusal_openings=True
    )
    assert plain.base_refusals > 0 and plain.opening_tokens
    n_layers = COMMON["num_hidden_layers"]
    g = torch.Generator().manual_seed(2)
    hooks = EditHooks(
        model.sites, normalize(torch.randn(n_layers, COMMON["hidden_size"], generator=g))
    )
    hooks.set_strengths({c: torch.full((n_layers,), 1.5) for c in COMPONENTS})
    try:
        got = plain.opening_probabilities()
        for position, token in plain.opening_tokens.items():
            prompt = PROMPTS[plain._bad_order[position]]
            with torch.no_grad():
                logits = model.model(**model.encode([prompt])).logits[0, -1].double()
            reference = torch.softmax(logits, -1)[token].item()
            assert got[prompt] == pytest.approx(reference, rel=1e-4, abs=1e-7)
        score = plain.score()
        assert score.openings is not None and score.objective >= score.refusals
        assert screened.score(dominated=lambda kl, objective: False) == score
    finally:
        hooks.clear()
