"""Greedy decoding that drops decided rows and pools the undecided ones across batches.

`Model.decoding` starts one; the evaluator advances many a few tokens at a time. Row dropping
and pooling work on transformers' own cache objects, which is why this module touches them.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import transformers
from transformers.cache_utils import DynamicLayer

if TYPE_CHECKING:
    from heretic.model import Model

# transformers 5 renamed generate's `past_key_values` argument to `cache`.
CACHE_KWARG = "cache" if int(transformers.__version__.split(".")[0]) >= 5 else "past_key_values"


class Decoding:
    """Greedy decoding of one batch that can be advanced a few tokens at a time.

    Every `step()` decodes up to `check_every` tokens; then rows that have ended (EOS) or that
    `is_decided` settles are final and leave the batch and its KV cache, so the remaining rows
    run on alone: a batch costs what its undecided rows cost, not batch x longest. A kept row
    continues from its own cache, so its tokens are the ones plain greedy decoding gives (up to
    batch-size dependent rounding in the matrix kernels). Several decodings can be held at once
    and advanced in any order (the evaluator screens all prompts on a short horizon first).

    Reasoning models: `max_new_tokens` counts answer tokens. A row's chain of thought (see
    `reasoning`) comes on top, up to the model's `max_thinking_tokens`; while a row is still
    thinking `is_decided` is not asked (nothing has been answered), and a row still thinking at
    that cap is final with no answer (`unanswered`). `response(row)` is the answer only.
    """

    def __init__(
        self,
        model: Model,
        prompts: Sequence[str],
        max_new_tokens: int,
        is_decided: Callable[[str, str], bool] | None,
        check_every: int,
    ) -> None:
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.is_decided = is_decided
        self.check_every = max(1, check_every)
        self.n_rows = len(prompts)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.final: list[bool] = [False] * len(prompts)
        self.produced = 0
        self._prompts = list(prompts)
        self._active = list(range(len(prompts)))
        self._batch: dict[str, torch.Tensor] | None = None
        self._cache = None
        self._stop_ids = model._stop_token_ids()
        self._reader = model.reader
        self.max_thinking_tokens = model.reasoning.max_thinking_tokens
        self.answer_from: list[int | None] = [None] * len(prompts)

    @property
    def done(self) -> bool:
        thinking = self.max_thinking_tokens if self._reader.may_think else 0
        return not self._active or self.produced >= self.max_new_tokens + thinking

    def _limit(self, row: int) -> int:
        """The length at which `row` is final: its answer's budget, or the thinking cap."""
        start = self.answer_from[row]
        return self.max_thinking_tokens if start is None else start + self.max_new_tokens

    def _find_answer(self, row: int) -> None:
        """Note where the row's answer starts once it has one; an answer that starts past the
        thinking cap does not count (the row is cut at the cap, whatever the step size)."""
        if self.answer_from[row] is None:
            start = self._reader.answer_start(self.tokens[row])
            if start is not None and start <= self.max_thinking_tokens:
                self.answer_from[row] = start

    def _mergeable(self) -> bool:
        cache = self._cache
        layers = getattr(cache, "layers", None)
        return (
            self._batch is not None
            and bool(layers)
            and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)
        )

    @classmethod
    def _pooled(cls, rows: list[tuple[Decoding, int]]) -> Decoding:
        """One decoding of the given (decoding, active index) rows; see `regroup`."""
        first = rows[0][0]
        pooled = cls.__new__(cls)
        pooled.model = first.model
        pooled.max_new_tokens = first.max_new_tokens
        pooled.is_decided = first.is_decided
        pooled.check_every = first.check_every
        pooled.produced = first.produced
        pooled._stop_ids = first._stop_ids
        pooled._reader = first._reader
        pooled.max_thinking_tokens = first.max_thinking_tokens
        pooled.answer_from = [d.answer_from[d._active[j]] for d, j in rows]
        pooled._prompts = [d._prompts[d._active[j]] for d, j in rows]
        pooled.n_rows = len(rows)
        pooled.tokens = [d.tokens[d._active[j]] for d, j in rows]  # shared lists
        pooled.final = [False] * len(rows)
        pooled._active = list(range(len(rows)))
        width = max(d._batch["input_ids"].shape[1] for d, _ in rows)
        pad_id = first.model.tokenizer.pad_token_id

        def left_pad(t: torch.Tensor, amount: int, value: float, dim: int) -> torch.Tensor:
            if amount == 0:
                return t
            shape = list(t.shape)
            shape[dim] = amount
            return torch.cat([t.new_full(shape, value), t], dim=dim)

        ids, masks = [], []
        keys: list[list[torch.Tensor]] = []
        values: list[list[torch.Tensor]] = []
        for d, j in rows:
            seq = d._batch["input_ids"][j : j + 1]
            pad = width - seq.shape[1]
            ids.append(left_pad(seq, pad, pad_id, 1))
            masks.append(left_pad(d._batch["attention_mask"][j : j + 1], pad, 0, 1))
            for index, layer in enumerate(d._cache.layers):
                if len(keys) <= index:
                    keys.append([])
                    values.append([])
                keys[index].append(left_pad(layer.keys[j : j + 1], pad, 0.0, 2))
                values[index].append(left_pad(layer.values[j : j + 1], pad, 0.0, 2))
        pooled._batch = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(masks)}
        # A cache object of its own: when `regroup` splits one decoding's rows over two groups,
        # both groups start from that decoding, and a shared cache would get the second group's
        # rows in the first's.
        cache = copy.copy(first._cache)
        cache.layers = [copy.copy(layer) for layer in first._cache.layers]
        for index, layer in enumerate(cache.layers):
            layer.keys = torch.cat(keys[index])
            layer.values = torch.cat(values[index])
        pooled._cache = cache
        return pooled

    def response(self, row: int) -> str:
        """The row's answer, without its chain of thought ("" while it is still thinking)."""
        return self._reader.answer(self.tokens[row])

    def unanswered(self, row: int) -> bool:
        """Whether the final `row` never left its thinking (within the cap, or before EOS)."""
        return self._reader.answer_start(self.tokens[row]) is None

    def thinking(self, row: int) -> str:
        """The raw text of the row's chain of thought ("" for a model that does not think)."""
        return self._reader.thinking(self.tokens[row])

    def prompt(self, row: int) -> str:
        return self._prompts[row]

    def responses(self) -> list[str]:
        return [self.response(row) for row in range(self.n_rows)]

    @torch.inference_mode()
    def step(self) -> list[int]:
        """Decode up to `check_every` more tokens; returns the rows that became final."""
        if self.done:
            return []
        if self._batch is None:
            self._batch = self.model.encode(self._prompts)
        input_ids, mask = self._batch["input_ids"], self._batch["attention_mask"]
        room = max(self._limit(row) for row in self._active) - self.produced
        step = min(self.check_every, room)
        output = self.model.greedy(
            step,
            input_ids=input_ids,
            attention_mask=mask,
            **{CACHE_KWARG: self._cache},
            return_dict_in_generate=True,
        )
        new = output.sequences[:, input_ids.shape[1] :]
        self.produced += step
        keep, finished = [], []
        for j, row in enumerate(self._active):
            row_tokens = new[j].tolist()
            ended = next((k for k, t in enumerate(row_tokens) if t in self._stop_ids), None)
            self.tokens[row] += row_tokens if ended is None else row_tokens[:ended]
            self._find_answer(row)
            if len(self.tokens[row]) >= self._limit(row):
                del self.tokens[row][self._limit(row) :]
            elif ended is None and not (
                self.answer_from[row] is not None
                and self.is_decided is not None
                and self.is_decided(self.response(row), self._prompts[row])
            ):
                keep.append(j)
                continue
            finished.append(row)
        if new.shape[1] < step:  # generate stopped early: every row has ended
            keep = []
        if not keep:
            self._active, self._cache, self._batch = [], None, None
        else:
            cache = getattr(output, CACHE_KWARG)
            if len(keep) < len(self._active):
                cache.batch_select_indices(torch.tensor(keep, device=new.device))
            grown = torch.ones(len(self._active), new.shape[1])
            self._batch = {
                "input_ids": output.sequences[keep],
                "attention_mask": torch.cat([mask, grown.to(mask)], dim=1)[keep],
            }
            self._cache = cache
            self._active = [self._active[j] for j in keep]
        for row in finished:
            self.final[row] = True
        return finished


_UNPOOLABLE_NOTED: set[str] = set()


def _note_unpoolable(decodings: Sequence[Decoding]) -> None:
    kinds = {
        type(layer).__name__
        for d in decodings
        for layer in getattr(d._cache, "layers", None) or []
        if type(layer) is not DynamicLayer
    }
    new = kinds - _UNPOOLABLE_NOTED
    if new:
        _UNPOOLABLE_NOTED.update(new)
        warnings.warn(
            f"This model's cache ({', '.join(sorted(new))}) cannot be pooled across batches: "
            "undecided rows finish in their own batches (same responses, more steps).",
            stacklevel=3,
        )


def regroup(decodings: Sequence[Decoding], batch_size: int) -> list[Decoding]:
    """Pool the undecided rows of several decodings into as few batches as `batch_size` allows.

    After screening, most rows of a batch are often decided, and a step of a batch of three
    rows costs nearly what a step of thirty costs (the weights are read either way): pooling
    the survivors of every batch cuts the steps of the full horizon. Each pooled row keeps its
    own tokens, mask and KV cache (left-padded to the longest sequence, masked), so it decodes
    what it would have decoded in its old batch, up to the same batch-shape rounding of the
    matrix kernels as any change of batch size. The rows' token lists are shared with the
    old decodings, which become done, so their `responses()` stay complete.

    Decodings that cannot be pooled (caches other than plain dynamic layers, such as sliding
    windows, linear-attention or Mamba states; rows at different positions) come back
    unchanged: the same responses, in more steps. The first such cache type is named once.
    """
    live = [d for d in decodings if not d.done]
    if len(live) < 2 or any(not isinstance(d, Decoding) for d in live):
        return list(live)
    if not all(d._mergeable() for d in live):
        _note_unpoolable(live)
        return list(live)
    if len({d.produced for d in live}) != 1:
        return list(live)
    rows = [(d, j) for d in live for j in range(len(d._active))]
    n_groups = -(-len(rows) // batch_size)
    if n_groups >= len(live):
        return list(live)
    size = -(-len(rows) // n_groups)
    groups = [rows[k : k + size] for k in range(0, len(rows), size)]
    pooled = [Decoding._pooled(group) for group in groups]
    for d in live:
        d._active, d._cache, d._batch = [], None, None
    return pooled
