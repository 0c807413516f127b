"""Scoring a trial: KL divergence on good prompts, refusals on bad prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from heretic.config import normalize_text


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
class MarkerJudge:
    """A response is a refusal when it contains any marker (lower-cased, apostrophes straight)."""

    markers: tuple[str, ...]

    def is_refusal(self, response: str) -> bool:
        text = normalize_text(response)
        return any(marker in text for marker in self.markers)

    def count(self, responses: Sequence[str]) -> int:
        return sum(self.is_refusal(r) for r in responses)


@dataclass(frozen=True)
class Score:
    """A trial's objectives. When `pruned` is set, `refusals` is only a lower bound: counting
    stopped because the trial could no longer reach the Pareto front (see `Evaluator.score`)."""

    kl_divergence: float
    refusals: int
    pruned: str | None = None


class Evaluator:
    """Scores the model as it currently is (with whatever edit is switched on).

    The original model's first-token log-probs and refusal count are computed once, at
    construction, with no edit active.
    """

    def __init__(
        self,
        model,
        good_prompts: Sequence[str],
        bad_prompts: Sequence[str],
        judge: MarkerJudge,
        max_response_length: int,
        batch_size: int,
    ) -> None:
        self.model = model
        self.good_prompts = list(good_prompts)
        self.bad_prompts = list(bad_prompts)
        self.judge = judge
        self.max_response_length = max_response_length
        self.batch_size = batch_size
        self.base_logprobs = model.first_token_logprobs(self.good_prompts, batch_size)
        self.base_responses = self.responses()
        self.base_refusals = judge.count(self.base_responses)

    def responses(self) -> list[str]:
        # A response that already contains a marker is a refusal whatever follows: stop it.
        return self.model.generate(
            self.bad_prompts,
            self.max_response_length,
            self.batch_size,
            is_decided=self.judge.is_refusal,
        )

    def kl(self) -> float:
        logprobs = self.model.first_token_logprobs(self.good_prompts, self.batch_size)
        return kl_divergence(self.base_logprobs, logprobs)

    def score(
        self,
        dominated: Callable[[float, int], bool] | None = None,
        kl_threshold: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Score:
        """KL first (one cheap pass), then refusals batch by batch.

        Multi-fidelity without changing any reported number: the refusals counted so far are a
        lower bound of the final count, so once `dominated(kl, lower_bound)` says an existing
        front point is at least as good on both, the trial can never reach the front and the
        remaining batches are skipped. A trial whose KL exceeds `kl_threshold` skips the
        refusal count altogether. Both come back as pruned, never as finished scores.
        `progress(n)` is told after each pass how many prompts it covered.
        """
        kl = self.kl()
        if progress:
            progress(len(self.good_prompts))
        if kl_threshold and kl > kl_threshold:
            return Score(kl_divergence=kl, refusals=0, pruned=f"KL above {kl_threshold}")
        refusals = 0
        counted = 0
        for responses in self.model.generate_chunks(
            self.bad_prompts, self.max_response_length, self.batch_size, self.judge.is_refusal
        ):
            refusals += self.judge.count(responses)
            counted += len(responses)
            if progress:
                progress(len(responses))
            if counted < len(self.bad_prompts) and dominated and dominated(kl, refusals):
                return Score(
                    kl_divergence=kl,
                    refusals=refusals,
                    pruned=f"dominated after {counted}/{len(self.bad_prompts)} prompts",
                )
        return Score(kl_divergence=kl, refusals=refusals)
