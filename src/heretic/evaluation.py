"""Scoring a trial: KL divergence on good prompts, refusals on bad prompts."""

from __future__ import annotations

from collections.abc import Sequence
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
    kl_divergence: float
    refusals: int


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

    def score(self) -> Score:
        kl = self.kl()
        return Score(kl_divergence=kl, refusals=self.judge.count(self.responses()))
