"""How close an edited model still is to refusing: the probability it gives, teacher-forced, to
the original model's own refusal openings on the search's harmful prompts.

A search counts the refusals of greedy responses, and the count stops at 0: every edit strong
enough to clear the search's prompts scores the same there, however near the line it still
sits, and prompts from other sources are refused by the edits that sit near it. The probability
of the original refusal opening keeps falling as an edit gets stronger; on the organism it
ranks the front trials by their held-out refusals where the search's count ties
(docs/generalization.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

OPENING_TOKENS = 8
"""Tokens of the original response scored: enough to cover "I'm sorry, but I can't"."""


@dataclass(frozen=True)
class Opening:
    prompt: str
    token_ids: list[int]


def refusal_openings(
    tokenizer, prompts: Sequence[str], responses: Sequence[str], judge, tokens: int = OPENING_TOKENS
) -> list[Opening]:
    """The first `tokens` tokens of every original response `judge` calls a refusal."""
    return [
        Opening(p, tokenizer(r, add_special_tokens=False)["input_ids"][:tokens])
        for p, r in zip(prompts, responses, strict=True)
        if r.strip() and judge.is_refusal(r, p)
    ]


def opening_probability(model, openings: Sequence[Opening], batch_size: int = 32) -> dict:
    """Mean over `openings` of the probability of the opening's first token, and of the
    geometric mean of its tokens' probabilities, under `model` as it is now (hooks included):
    each prompt formatted as the run formats it, then its opening, scored by heretic's own
    teacher-forced pass (`perplexity.target_logprobs`)."""
    from heretic.perplexity import TokenTexts, target_logprobs

    if not openings:
        raise ValueError("no refusal openings to score: the original model refused none")
    texts = TokenTexts(
        contexts=[
            model.tokenizer(model.format_chat(o.prompt), add_special_tokens=False)["input_ids"]
            for o in openings
        ],
        targets=[list(o.token_ids) for o in openings],
        description="refusal openings",
    )
    first, geometric = [], []
    for _, logprobs in target_logprobs(model, texts, batch_size):
        first.append(math.exp(logprobs[0].item()))
        geometric.append(math.exp(logprobs.mean().item()))
    return {"first": sum(first) / len(first), "geometric": sum(geometric) / len(geometric)}
