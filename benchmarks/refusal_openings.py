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
    geometric mean of its tokens' probabilities, under `model` as it is now (hooks included).

    Each prompt is formatted as the run formats it and followed by its opening; sequences are
    left-padded, with positions counted from each sequence's first real token so that padding
    does not shift them."""
    import torch

    if not openings:
        raise ValueError("no refusal openings to score: the original model refused none")
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    first, geometric = [], []
    with torch.inference_mode():
        for start in range(0, len(openings), batch_size):
            batch = openings[start : start + batch_size]
            ids = [
                tokenizer(model.format_chat(o.prompt), add_special_tokens=False)["input_ids"]
                + o.token_ids
                for o in batch
            ]
            width = max(len(x) for x in ids)
            input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model.runner(
                input_ids=input_ids.to(model.device),
                attention_mask=mask.to(model.device),
                position_ids=positions.to(model.device),
                use_cache=False,
            ).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, opening in enumerate(batch):
                n = len(opening.token_ids)
                predicted = logprobs[row, width - n - 1 : width - 1]
                token_logprobs = predicted.gather(1, torch.tensor(opening.token_ids)[:, None])[:, 0]
                first.append(math.exp(token_logprobs[0].item()))
                geometric.append(math.exp(token_logprobs.mean().item()))
    return {"first": sum(first) / len(first), "geometric": sum(geometric) / len(geometric)}
