"""Scoring a trial: KL divergence on good prompts, refusals on bad prompts."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heretic.decoding import regroup
from heretic.judges import Judge
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
    ) -> None:
        self.model = model
        self.good_prompts = list(good_prompts)
        self.bad_prompts = list(bad_prompts)
        self.judge = judge
        self.max_response_length = max_response_length
        self.batch_size = batch_size
        self.screening_tokens = screening_tokens
        log = log or (lambda _line: None)
        self._good_sorted = [self.good_prompts[i] for i in model.length_order(self.good_prompts)]
        self._bad_order = model.length_order(self.bad_prompts)
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
            progress(len(self.good_prompts))
        self.base_responses, self.base_unanswered = self._responses(progress)
        self.base_refusals = judge.count(self.base_responses, self.bad_prompts)

    def _base_thinking(self, log: Callable[[str], None]) -> list[str] | None:
        """The original model's chain of thought for each good prompt (sorted order), or None
        when it does not think: what the KL passes append so they predict the first answer
        token. Decoded until each response's first answer token (or the thinking cap)."""
        if not self.model.reader.may_think or not self._good_sorted:
            return None
        thinking, unanswered = [], 0
        for start in range(0, len(self._good_sorted), self.batch_size):
            decoding = self.model.decoding(self._good_sorted[start : start + self.batch_size], 1)
            while not decoding.done:
                decoding.step()
            for row in range(decoding.n_rows):
                thinking.append(decoding.thinking(row))
                unanswered += decoding.unanswered(row)
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
            self.base_responses, self.base_unanswered = self._responses()
        self.base_refusals = judge.count(self.base_responses, self.bad_prompts)

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

    def _responses(self, progress: Callable[[int], None] | None = None) -> tuple[list[str], int]:
        """The answers to the bad prompts (in their order), each stopped once decided, and how
        many never left their thinking; `progress(n)` is told how many became final at each
        step."""
        decodings = self._decodings()
        for decoding in decodings:
            while not decoding.done:
                rows = decoding.step()
                if progress and rows:
                    progress(len(rows))
        return self._in_prompt_order(decodings)

    def responses(self, progress: Callable[[int], None] | None = None) -> list[str]:
        """The answers to the bad prompts (in their order), each stopped once decided."""
        return self._responses(progress)[0]

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
        dominated: Callable[[float, int], bool] | None = None,
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
        `screening_tokens`, every batch is first decoded to that short horizon (where most
        refusals show) before any batch runs to the full length, so a hopeless trial is found
        after a few tokens of every prompt instead of the full length of the first batches;
        all batches' caches are then held at once (the screened, still undecided rows only).
        A trial whose KL exceeds `kl_threshold` skips the refusal count altogether. Pruned
        trials come back with `pruned` set, never as finished scores. `progress(n)` is told
        how many prompts each pass or step finished. `first_edited_layer` must be a layer at or
        below the edit's lowest (0 is always right); the KL pass starts there.
        """
        kl = self.kl(first_edited_layer)
        if progress:
            progress(len(self.good_prompts))
        if kl_threshold and kl > kl_threshold:
            return Score(kl_divergence=kl, refusals=0, pruned=f"KL above {kl_threshold}")
        decodings = screened = self._decodings()
        # The last phase runs every row to its end: a reasoning model's thinking comes on top of
        # max_response_length (see `Decoding`).
        horizons: list[float] = [math.inf]
        if 0 < self.screening_tokens < self.max_response_length:
            horizons = [self.screening_tokens, math.inf]
        refusals = finished = 0
        total = len(self.bad_prompts)
        for phase, horizon in enumerate(horizons):
            if phase > 0:
                # The survivors of the screening continue in as few batches as possible.
                decodings = regroup(decodings, self.batch_size)
            for decoding in decodings:
                while not decoding.done and decoding.produced < horizon:
                    rows = decoding.step()
                    refusals += self.judge.count(
                        [decoding.response(r) for r in rows], [decoding.prompt(r) for r in rows]
                    )
                    finished += len(rows)
                    if progress and rows:
                        progress(len(rows))
                    if finished < total and dominated and dominated(kl, refusals):
                        return Score(
                            kl_divergence=kl,
                            refusals=refusals,
                            pruned=f"dominated after {finished}/{total} responses",
                        )
        responses, unanswered = self._in_prompt_order(screened)
        refusals = self.judge.count(responses, self.bad_prompts)
        return Score(kl_divergence=kl, refusals=refusals, unanswered=unanswered)
