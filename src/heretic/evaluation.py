"""Scoring a trial: KL divergence on good prompts, refusals on bad prompts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heretic.decoding import regroup
from heretic.errors import DatasetError
from heretic.judges import Judge, split_by_verdicts
from heretic.model import LayerOutputs


def kl_divergence(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean over prompts of KL(P_base || P_edited) for the first response token.

    Both arguments are log-probabilities (n_prompts, vocab). The direction matters: the
    expectation is under the original model, so the edit is penalised wherever it moves
    probability mass the original model relied on.
    """
    if base_logprobs.shape != logprobs.shape:
        raise ValueError(f"shape mismatch {tuple(base_logprobs.shape)} vs {tuple(logprobs.shape)}")
    return float(
        F.kl_div(logprobs.float(), base_logprobs.float(), reduction="batchmean", log_target=True)
    )


@dataclass(frozen=True)
class Score:
    """A trial's objectives. When `pruned` is set, `refusals` is only a lower bound: counting
    stopped because the trial could no longer reach the Pareto front (see `Evaluator.score`).
    `unanswered`: responses of a reasoning model still thinking at its cap, counted among the
    refusals (an answer never given is no compliance) and reported apart."""

    kl_divergence: float
    refusals: int
    pruned: str | None = None
    unanswered: int = 0
    openings: float | None = None
    """With `refusal_openings` on: over the bad prompts the original model refused and this
    trial answers, the sum of the probabilities it gives the original's first refusal token
    (a lower bound, like `refusals`, when pruned); None when not measured."""

    @property
    def objective(self) -> float:
        """The refusal objective the search minimizes: the count, plus the openings' margin."""
        return self.refusals + (self.openings or 0.0)


class Evaluator:
    """Scores the model as it currently is (with whatever edit is switched on).

    The original model's first-token log-probs and refusal count are computed once, at
    construction, with no edit active. Prompts keep their given order in `good_prompts` and
    `bad_prompts`; passes run them in batches of similar token length (less padding).

    Reasoning models: the judge sees each response's answer, never its chain of thought, and
    the KL divergence is measured at the first answer token: each good prompt is followed by
    the original model's own chain of thought for it (generated once, here), so the edited
    model is compared with the original where both start answering. A model that does not
    think gets no continuation (the first response token, as always).
    """

    def __init__(
        self,
        model,
        good_prompts: Sequence[str],
        bad_prompts: Sequence[str],
        judge: Judge,
        max_response_length: int,
        batch_size: int,
        screening_tokens: int = 0,
        layer_skip_bytes: int = 0,
        log: Callable[[str], None] | None = None,
        progress: Callable[[int], None] | None = None,
        layer_outputs_store: torch.device | None = None,
        refusal_openings: bool = False,
        skip_refused_good: bool = False,
    ) -> None:
        self.model = model
        self.good_prompts = list(good_prompts)
        self.bad_prompts = list(bad_prompts)
        self.judge = judge
        self.max_response_length = max_response_length
        self.batch_size = batch_size
        self.screening_tokens = screening_tokens
        self.refusal_openings = refusal_openings
        log = log or (lambda _line: None)
        self._good_sorted = [self.good_prompts[i] for i in model.length_order(self.good_prompts)]
        self._bad_order = model.length_order(self.bad_prompts)
        self._decoded_good: list[tuple[str, str, bool]] = []
        self.good_refused: list[str] = []
        """Good prompts the original model refuses, left out of the KL divergence (with
        `skip_refused_good`)."""
        if skip_refused_good:
            self._leave_out_refused_good(log)
        self._good_thinking = self._base_thinking(log)
        self.layer_outputs = self._plan_layer_skip(layer_skip_bytes, layer_outputs_store)
        self.base_logprobs = model.first_token_logprobs(
            self._good_sorted,
            batch_size,
            record=self.layer_outputs,
            continuations=self._good_thinking,
        )
        self._check_layer_skip(log)
        if progress:
            progress(len(self.good_prompts) + len(self.good_refused))
        self._score_base(progress)

    def _leave_out_refused_good(self, log: Callable[[str], None]) -> None:
        """Drop from the KL prompts the good prompts the original model refuses.

        A refusing model often refuses some harmless prompts too (the organism refuses 7 of 100
        harmless Alpaca instructions with its system prompt, 14 without); the edit is meant to
        lift those refusals, and the first-token KL there measures that lift, not damage: on
        the organism they carry 40-60% of a typical edit's KL (docs/generalization.md). Judged
        by the search's judge on greedy responses of `max_response_length` tokens, once.
        """
        if not self._good_sorted:
            return
        stop = self.judge.is_refusal if self.judge.monotone else None
        decoded = self._decode_good(self.max_response_length, stop)
        responses = [response for response, _, _ in decoded]
        verdicts = self.judge.verdicts(responses, self._good_sorted)
        kept, self.good_refused = split_by_verdicts(self._good_sorted, verdicts)
        if not kept:
            raise DatasetError(
                f"The original model refuses all {len(verdicts)} good evaluation prompts, so "
                "no KL divergence is left to measure: check good_evaluation_prompts (are they "
                "harmless?), or set kl_skip_refused_good = false."
            )
        self._good_sorted = kept
        # A thinking model's chain of thought for the kept prompts is decoded already.
        self._decoded_good = split_by_verdicts(decoded, verdicts)[0]
        left_out = set(self.good_refused)
        self.good_prompts = [p for p in self.good_prompts if p not in left_out]
        log(
            f"KL divergence on {len(kept)} good prompts: the original model refuses "
            f"{len(self.good_refused)} of {len(verdicts)} (refusals the edit may lift), left out "
            "(kl_skip_refused_good)"
        )

    def _decode_good(
        self, max_new_tokens: int, is_decided: Callable[[str, str], bool] | None = None
    ) -> list[tuple[str, str, bool]]:
        """The original model's greedy (response, chain of thought, unanswered) for each good
        prompt, in sorted order."""
        rows = []
        for start in range(0, len(self._good_sorted), self.batch_size):
            batch = self._good_sorted[start : start + self.batch_size]
            decoding = self.model.decoding(batch, max_new_tokens, is_decided)
            while not decoding.done:
                decoding.step()
            thinks = self.model.reader.may_think
            rows += [
                (
                    decoding.response(row),
                    decoding.thinking(row) if thinks else "",
                    bool(decoding.unanswered(row)),
                )
                for row in range(decoding.n_rows)
            ]
        return rows

    def _base_thinking(self, log: Callable[[str], None]) -> list[str] | None:
        """The original model's chain of thought for each good prompt (sorted order), or None
        when it does not think: what the KL passes append so they predict the first answer
        token. Decoded until each response's first answer token (or the thinking cap)."""
        if not self.model.reader.may_think or not self._good_sorted:
            return None
        decoded = self._decoded_good or self._decode_good(1)
        thinking = [t for _, t, _ in decoded]
        unanswered = sum(u for _, _, u in decoded)
        n_thinking = sum(bool(t) for t in thinking)
        if n_thinking == 0:
            return None
        log(
            f"the model thinks before answering {n_thinking} of {len(thinking)} good prompts: "
            "KL is measured at the first answer token, after its own chain of thought"
        )
        if unanswered:
            log(
                f"{unanswered} good prompts never finish thinking within max_thinking_tokens: "
                "their KL is measured after a forced end of the thinking"
            )
        return thinking

    @property
    def thinks(self) -> bool:
        """Whether the KL passes start after the original model's chain of thought (at the
        first answer token) rather than at the first response token."""
        return self._good_thinking is not None

    def use_judge(self, judge: Judge) -> None:
        """Judge with `judge` from now on, re-counting the original model's refusals.

        The base responses were generated with the old judge's early stop, so a monotone
        `judge` must count as a refusal everything the old one did (the adaptive judge keeps the
        markers); for a judge that is not monotone they are decoded again, to their end.
        """
        stopped_early = self.judge.monotone
        self.judge = judge
        if stopped_early and not judge.monotone:
            self._score_base()
        else:
            self._count_base()

    def _score_base(self, progress: Callable[[int], None] | None = None) -> None:
        """The original model's answers to the bad prompts, its refusals and their openings."""
        decodings = self._decodings()
        self._run(decodings, progress)
        self.base_responses, self.base_unanswered = self._in_prompt_order(decodings)
        self._bad_thinking = None
        self._base_first_tokens: torch.Tensor | None = None
        if self.refusal_openings:
            thinking = [d.thinking(row) for d in decodings for row in range(d.n_rows)]
            self._bad_thinking = thinking if any(thinking) else None
            # Read once: a new judge (`use_judge`) changes which prompts are refused, not these.
            self._base_first_tokens = self._bad_first_logprobs().argmax(-1)
        self._count_base()

    def _count_base(self) -> None:
        self.opening_tokens: dict[int, int] = {}
        """Sorted position of each bad prompt the original model refuses -> its refusal
        opening: the token it gives the highest probability first (its greedy response's
        first answer token); only with `refusal_openings`."""
        if not self.refusal_openings:
            self.base_refusals = self.judge.count(self.base_responses, self.bad_prompts)
            return
        verdicts = self.judge.verdicts(self.base_responses, self.bad_prompts)
        self.base_refusals = sum(verdicts)
        assert self._base_first_tokens is not None
        for position, index in enumerate(self._bad_order):
            if verdicts[index]:
                self.opening_tokens[position] = int(self._base_first_tokens[position])

    def _bad_first_logprobs(self) -> torch.Tensor:
        """First answer token log-probs of the bad prompts (sorted order), after the original
        model's own chain of thought for a model that thinks."""
        return self.model.first_token_logprobs(
            [self.bad_prompts[i] for i in self._bad_order],
            self.batch_size,
            continuations=self._bad_thinking,
        )

    def opening_probabilities(self) -> dict[str, float]:
        """Per bad prompt the original model refuses, the probability the model as it is now
        gives that refusal's opening token (one pass over the bad prompts).

        A count of refusals stops at 0: every edit strong enough to clear the search's prompts
        scores the same there, however near the line it still sits, and prompts from other
        sources are refused by the edits that sit near it. This probability keeps falling as
        an edit gets stronger; on the organism it ranks front trials by their held-out
        refusals where their counts tie (docs/generalization.md).
        """
        if not self.opening_tokens:
            return {}
        logprobs = self._bad_first_logprobs()
        probabilities: dict[str, float] = {}
        for position, token in self.opening_tokens.items():
            prompt = self.bad_prompts[self._bad_order[position]]
            probabilities[prompt] = math.exp(float(logprobs[position, token]))
        return probabilities

    def _decodings(self) -> list:
        sorted_bad = [self.bad_prompts[i] for i in self._bad_order]
        return [
            self.model.decoding(
                sorted_bad[start : start + self.batch_size],
                self.max_response_length,
                # A response a monotone judge already calls a refusal stays one; any other
                # judge sees every response decoded to its end.
                self.judge.is_refusal if self.judge.monotone else None,
            )
            for start in range(0, len(sorted_bad), self.batch_size)
        ]

    def _in_prompt_order(self, decodings: list) -> tuple[list[str], int]:
        """The responses in the bad prompts' order, and how many never left their thinking."""
        in_sorted_order = [r for d in decodings for r in d.responses()]
        responses = [""] * len(self.bad_prompts)
        for position, index in enumerate(self._bad_order):
            responses[index] = in_sorted_order[position]
        unanswered = sum(d.unanswered(row) for d in decodings for row in range(d.n_rows))
        return responses, unanswered

    @staticmethod
    def _run(decodings: list, progress: Callable[[int], None] | None = None) -> None:
        """Decode every row to its end (or its verdict); `progress(n)` is told how many became
        final at each step."""
        for decoding in decodings:
            while not decoding.done:
                rows = decoding.step()
                if progress and rows:
                    progress(len(rows))

    def responses(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """The answers to the bad prompts (in their order), each stopped once decided."""
        decodings = self._decodings()
        self._run(decodings, progress)
        return self._in_prompt_order(decodings)[0]

    def _plan_layer_skip(
        self, budget_bytes: int, store: torch.device | None
    ) -> LayerOutputs | None:
        """Checkpoint layers whose stored outputs fit in `budget_bytes`, evenly spread, kept on
        `store` (None: where each layer runs)."""
        if budget_bytes <= 0 or not self.good_prompts:
            return None
        element = torch.finfo(self.model.dtype).bits // 8
        per_layer = (
            self.model.padded_tokens(self._good_sorted, self.batch_size, self._good_thinking)
            * self.model.hidden_size
            * self.model.residual_streams
            * element
        )
        n = budget_bytes // max(per_layer, 1)
        plan = LayerOutputs.evenly_spaced(self.model.n_layers, n, store)
        return plan if plan.layers else None

    def _check_layer_skip(self, log: Callable[[str], None]) -> None:
        """Skipping must give the plain pass's numbers bit for bit on this model, or it is off.

        An architecture whose layers depend on more than their input hidden state (per-layer
        side inputs, layers that read state set by lower layers) would break the replay; one
        unedited pass resumed from a middle checkpoint tells.
        """
        outputs = self.layer_outputs
        if outputs is None:
            return
        middle = outputs.layers[len(outputs.layers) // 2]
        resumed = self.model.first_token_logprobs(
            self._good_sorted,
            self.batch_size,
            resume=outputs,
            start_layer=middle + 1,
            continuations=self._good_thinking,
        )
        if not torch.equal(resumed, self.base_logprobs):
            self.layer_outputs = None
            log("Skipping unedited layers is off: on this model it changes the log-probs")
            return
        where = "" if outputs.store is None else f" on {outputs.store.type}"
        log(
            f"KL passes skip unedited layers: outputs of {len(outputs.layers)} of "
            f"{self.model.n_layers} layers kept ({outputs.nbytes / 2**20:.0f} MB{where})"
        )

    def kl(self, first_edited_layer: int = 0) -> float:
        """KL divergence of the model as it is now; with `first_edited_layer`, the layers
        below it (unchanged by the edit) are replayed from the original model's pass."""
        logprobs = self.model.first_token_logprobs(
            self._good_sorted,
            self.batch_size,
            resume=self.layer_outputs,
            start_layer=first_edited_layer,
            continuations=self._good_thinking,
        )
        return kl_divergence(self.base_logprobs, logprobs)

    def score(
        self,
        dominated: Callable[[float, float], bool] | None = None,
        kl_threshold: float | None = None,
        progress: Callable[[int], None] | None = None,
        first_edited_layer: int = 0,
    ) -> Score:
        """KL first (one cheap pass), then refusals, pruning what cannot reach the front.

        Multi-fidelity without changing any reported number: a response that is final (ended,
        or decided by the judge) keeps its verdict, so the refusals among final responses are
        a lower bound of the trial's count. It is checked after every decoding step: once
        `dominated(kl, lower_bound)` says an existing front point is at least as good on
        both, the trial can never reach the front and decoding stops. With
        `refusal_openings`, the bound is of the count plus the openings (`RefusalBound`).
        With `screening_tokens`, every batch is first decoded to that short horizon (where
        most refusals show) before any batch runs to the full length, so a hopeless trial is
        found after a few tokens of every prompt instead of the full length of the first
        batches; all batches' caches are then held at once (the screened, still undecided rows
        only). A trial whose KL exceeds `kl_threshold` skips the refusal count altogether.
        Pruned trials come back with `pruned` set, never as finished scores. `progress(n)` is
        told how many prompts each pass or step finished. `first_edited_layer` must be a layer
        at or below the edit's lowest (0 is always right); the KL pass starts there.
        """
        kl = self.kl(first_edited_layer)
        if progress:
            progress(len(self.good_prompts))
        if kl_threshold and kl > kl_threshold:
            return Score(kl_divergence=kl, refusals=0, pruned=f"KL above {kl_threshold}")
        bound = RefusalBound(
            self.judge,
            self.opening_probabilities() if self.refusal_openings else None,
            self.bad_prompts,
        )
        decodings = screened = self._decodings()
        # The last phase runs every row to its end: a reasoning model's thinking comes on top of
        # max_response_length (see `Decoding`).
        horizons: list[float] = [math.inf]
        if 0 < self.screening_tokens < self.max_response_length:
            horizons = [self.screening_tokens, math.inf]
        finished, total = 0, len(self.bad_prompts)
        for phase, horizon in enumerate(horizons):
            if phase > 0:
                # The survivors of the screening continue in as few batches as possible.
                decodings = regroup(decodings, self.batch_size)
            for decoding in decodings:
                while not decoding.done and decoding.produced < horizon:
                    rows = decoding.step()
                    bound.add(
                        [decoding.response(r) for r in rows], [decoding.prompt(r) for r in rows]
                    )
                    finished += len(rows)
                    if progress and rows:
                        progress(len(rows))
                    if finished < total and dominated and dominated(kl, bound.objective):
                        return Score(
                            kl_divergence=kl,
                            refusals=bound.refusals,
                            pruned=f"dominated after {finished}/{total} responses",
                            openings=bound.openings,
                        )
        responses, unanswered = self._in_prompt_order(screened)
        refusals, openings = bound.final(responses)
        return Score(kl, refusals, unanswered=unanswered, openings=openings)


class RefusalBound:
    """A trial's refusal objective while its responses are decoded, and at the end.

    Without opening probabilities the objective is the refusal count, bounded below by the
    refusals among the final responses so far. With them (prompt -> probability of the
    original model's refusal opening, `Evaluator.opening_probabilities`), every bad prompt
    adds 1 when its response is a refusal, else its opening probability (at most 1): the
    refusals so far plus the openings of every prompt not refused so far is then a lower
    bound of the final objective, exact once every response is final.
    """

    def __init__(
        self, judge: Judge, probabilities: dict[str, float] | None, prompts: Sequence[str]
    ) -> None:
        self.judge = judge
        self.probabilities = probabilities
        self.prompts = list(prompts)
        self.refusals = 0
        self._all = sum(self._p(p) for p in self.prompts)
        self._refused = 0.0

    def _p(self, prompt: str) -> float:
        return 0.0 if self.probabilities is None else self.probabilities.get(prompt, 0.0)

    @property
    def openings(self) -> float | None:
        return None if self.probabilities is None else self._all - self._refused

    @property
    def objective(self) -> float:
        return self.refusals + (self.openings or 0.0)

    def add(self, responses: Sequence[str], prompts: Sequence[str]) -> None:
        """Responses that became final (to `prompts`)."""
        if self.probabilities is None:
            self.refusals += self.judge.count(responses, prompts)
            return
        for refused, prompt in zip(self.judge.verdicts(responses, prompts), prompts, strict=True):
            if refused:
                self.refusals += 1
                self._refused += self._p(prompt)

    def final(self, responses: Sequence[str]) -> tuple[int, float | None]:
        """The count and the openings of all responses (to the prompts, in their order)."""
        if self.probabilities is None:
            return self.judge.count(responses, self.prompts), None
        verdicts = self.judge.verdicts(responses, self.prompts)
        openings = sum(
            self._p(p) for p, refused in zip(self.prompts, verdicts, strict=True) if not refused
        )
        return sum(verdicts), openings
