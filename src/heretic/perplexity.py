"""Cross-entropy (and perplexity) of the model as it is now, on fixed token sequences.

The KL divergence of the search looks at one token per prompt. Cross-entropy over whole texts
shows damage that builds up over a response, as Arditi et al. (2024) report the Pile loss of
their edited models. By default the texts are the original model's own greedy responses to
held-out harmless prompts: its cross-entropy on them is low by construction (they are its most
likely continuations), and how far the edited model's rises above it is the damage measured.
User texts (`perplexity_texts`) are scored as plain text, without a chat template.

Rows are right-padded: every real token then sits at the positions it has alone, and causal
attention never lets it see the padding, so a batch gives each text the numbers of a pass over
that text alone (no position ids needed, whatever the architecture).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

LOGITS_BUDGET = 2**27
"""Most logits (rows x positions x vocabulary) one pass may hold: a batch of long texts over a
large vocabulary would otherwise need gigabytes for logits alone."""


@dataclass(frozen=True)
class TokenTexts:
    """Token sequences to score: each a context (given, not scored) and a target (scored)."""

    contexts: list[list[int]]
    targets: list[list[int]]
    description: str

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.targets):
            raise ValueError("every target needs its context")
        if any(not c for c in self.contexts):
            raise ValueError("every context needs at least one token (the first has no context)")

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.targets)


def plain_texts(tokenizer, texts: Sequence[str], max_tokens: int, description: str) -> TokenTexts:
    """Plain texts, each cut to `max_tokens` scored tokens. The first token (the tokenizer's
    BOS where it adds one, else the text's own first token) is the context."""
    contexts, targets = [], []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][: max_tokens + 1]
        if len(ids) >= 2:
            contexts.append(ids[:1])
            targets.append(ids[1:])
    return TokenTexts(contexts, targets, description)


@dataclass(frozen=True)
class CrossEntropy:
    """Mean cross-entropy per scored token, in nats, over `n_tokens` tokens."""

    nats: float
    n_tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats)


def _batches(lengths: Sequence[int], batch_size: int, vocab: int) -> list[list[int]]:
    """Row indices in batches of similar length (less padding), each within `LOGITS_BUDGET`."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    for index in order:
        current = batches[-1] if batches else None
        if current is not None and len(current) < batch_size:
            width = max(lengths[index], *(lengths[i] for i in current))
            if (len(current) + 1) * width * vocab <= LOGITS_BUDGET:
                current.append(index)
                continue
        batches.append([index])
    return batches


@torch.inference_mode()
def target_logprobs(
    model,
    texts: TokenTexts,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Per sequence (its index, in batches of similar length), the log-probability of every
    target token given its context and the tokens before it, under the model as it is now (with
    whatever edit is switched on): float32 (float64 for a float64 model), on the CPU. Rows are
    right-padded, so no position moves."""
    rows = [c + t for c, t in zip(texts.contexts, texts.targets, strict=True)]
    vocab = int(model.model.config.get_text_config().vocab_size)
    pad = model.tokenizer.pad_token_id
    for batch in _batches([len(r) for r in rows], batch_size, vocab):
        width = max(len(rows[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, i in enumerate(batch):
            ids[j, : len(rows[i])] = torch.tensor(rows[i])
            mask[j, : len(rows[i])] = 1
        logits = model.runner(
            input_ids=ids.to(model.device), attention_mask=mask.to(model.device), use_cache=False
        ).logits
        for j, i in enumerate(batch):
            start, end = len(texts.contexts[i]), len(rows[i])
            predicted = logits[j, start - 1 : end - 1]
            dtype = torch.promote_types(predicted.dtype, torch.float32)
            logprobs = torch.log_softmax(predicted.to(dtype), dim=-1)
            target = torch.tensor(texts.targets[i], device=logprobs.device, dtype=torch.long)
            yield i, logprobs.gather(-1, target[:, None]).squeeze(-1).cpu()
        if progress:
            progress(len(batch))


def cross_entropy(
    model,
    texts: TokenTexts,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> CrossEntropy:
    """Mean cross-entropy of every target token given its context and the tokens before it
    (`target_logprobs`), summed in float64."""
    if texts.n_tokens == 0:
        raise ValueError("no tokens to score")
    total = torch.zeros((), dtype=torch.float64)
    for _, picked in target_logprobs(model, texts, batch_size, progress):
        total -= picked.to(torch.float64).sum()
    return CrossEntropy(float(total) / texts.n_tokens, texts.n_tokens)
