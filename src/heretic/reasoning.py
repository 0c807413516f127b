"""Reasoning models: where a response's chain of thought ends and its answer begins.

A thinking model writes its chain of thought first (`<think>...</think>`, gpt-oss's analysis
channel, `[THINK]...[/THINK]`, `<thought>...</thought>`) and then its answer. The chain of
thought of a model that complies often weighs refusing ("this is illegal, I should not..."),
and the chain of thought of one that refuses may plan an answer, so the refusal judge must see
the answer only. A response still inside its thinking has said nothing yet: it is undecided,
never "not a refusal".

Everything here works on text decoded with the special tokens kept (gpt-oss's channel markers
are special tokens), so the same rules hold for every tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_MAX_THINKING_TOKENS = 1024


@dataclass(frozen=True)
class ThinkingFormat:
    """How one family of models opens and closes its chain of thought. `close` is where the
    answer starts: for gpt-oss that is the final channel's header, so the `<|end|><|start|>
    assistant` between the two channels belongs to the thinking."""

    name: str
    open: str
    close: str


FORMATS = (
    ThinkingFormat("think", "<think>", "</think>"),
    ThinkingFormat("gpt-oss", "<|channel|>analysis<|message|>", "<|channel|>final<|message|>"),
    ThinkingFormat("mistral", "[THINK]", "[/THINK]"),
    ThinkingFormat("thought", "<thought>", "</thought>"),
)


@dataclass(frozen=True)
class Reasoning:
    """The reasoning settings a model is run with (see the settings of the same names)."""

    enable_thinking: bool | None = None
    response_prefix: str = ""
    max_thinking_tokens: int = DEFAULT_MAX_THINKING_TOKENS

    def __post_init__(self) -> None:
        if self.max_thinking_tokens < 1:
            raise ValueError(
                f"max_thinking_tokens must be at least 1 (got {self.max_thinking_tokens})"
            )


def open_block(text: str) -> ThinkingFormat | None:
    """The format whose thinking block is still open at the end of `text`, if any.

    Used on the end of a prompt: a template (DeepSeek-R1's) or a response prefix ("<think>\\n")
    that opens the thinking makes the response start inside it, with no opening marker."""
    found, where = None, -1
    for fmt in FORMATS:
        opened = text.rfind(fmt.open)
        if opened > text.rfind(fmt.close) and opened > where:
            found, where = fmt, opened
    return found


def _skip_space(text: str, pos: int) -> int:
    return len(text) - len(text[pos:].lstrip())


def answer_offset(text: str, open_at_start: ThinkingFormat | None = None) -> int | None:
    """Where the answer starts in a response's raw text, or None while there is none yet.

    0 for a response that does not think (it is all answer, as it always was). After thinking
    blocks at the start (several in a row are skipped, and a stray closing marker such as
    gpt-oss's final-channel header alone), the offset of the first non-space character of the
    answer. None while the response is inside a block, has closed it but written only
    whitespace since, or is a proper prefix of a marker ("<th" may become "<think>"): all of
    these are undecided. `open_at_start` is the block the prompt left open (see `open_block`).

    Only growing text matters to early stopping, and this is monotone on it: once a prefix has
    an answer, every continuation has the same offset.
    """
    pos = 0
    if open_at_start is not None:
        end = text.find(open_at_start.close)
        if end < 0:
            return None
        pos = end + len(open_at_start.close)
    while True:
        start = _skip_space(text, pos)
        rest = text[start:]
        block = next(
            (f for f in FORMATS if rest.startswith(f.open) or rest.startswith(f.close)), None
        )
        if block is None:
            break
        if rest.startswith(block.close):
            pos = start + len(block.close)
            continue
        end = text.find(block.close, start + len(block.open))
        if end < 0:
            return None
        pos = end + len(block.close)
    if any(m.startswith(rest) and m != rest for f in FORMATS for m in (f.open, f.close)):
        return None if rest or pos else 0
    if pos == 0:
        return 0
    return start if rest else None


def strip_markers(text: str, special_tokens: Sequence[str]) -> str:
    """`text` without special-token strings, as `skip_special_tokens` would decode it."""
    for token in sorted(special_tokens, key=len, reverse=True):
        if token:
            text = text.replace(token, "")
    return text


@dataclass(frozen=True)
class ResponseReader:
    """Reads a response's token ids as (thinking, answer), for one model and prompt format.

    `decode(ids, skip_special_tokens)` is the tokenizer's. `may_think` is False for a model
    whose template and vocabulary know no thinking marker and whose prompt opens no block:
    then every response is all answer and nothing is decoded twice.
    """

    decode: Callable[[list[int], bool], str]
    special_tokens: tuple[str, ...]
    open_at_start: ThinkingFormat | None
    may_think: bool

    def answer_start(self, tokens: list[int]) -> int | None:
        """Index of the first answer token (0 for a response that does not think), or None
        while the response has no answer yet (see `answer_offset`)."""
        if not self.may_think:
            return 0
        offset = answer_offset(self.decode(tokens, False), self.open_at_start)
        if offset is None or offset == 0:
            return offset
        # The first answer token is the one that gives a prefix its first answer character.
        low, high = 1, len(tokens)
        while low < high:
            middle = (low + high) // 2
            if answer_offset(self.decode(tokens[:middle], False), self.open_at_start) is None:
                low = middle + 1
            else:
                high = middle
        return low - 1

    def answer(self, tokens: list[int]) -> str:
        """The answer ("" while the response is still thinking)."""
        if not self.may_think:
            return self.decode(tokens, True)
        raw = self.decode(tokens, False)
        offset = answer_offset(raw, self.open_at_start)
        if offset is None:
            return ""
        if offset == 0:
            return self.decode(tokens, True)
        return strip_markers(raw[offset:], self.special_tokens)

    def thinking(self, tokens: list[int]) -> str:
        """The raw text before the answer, to append to the prompt so that a pass predicts the
        first answer token. A response that never left its thinking gets its block closed
        (the answer the model would give if it had to stop thinking there)."""
        if not self.may_think:
            return ""
        raw = self.decode(tokens, False)
        offset = answer_offset(raw, self.open_at_start)
        if offset is not None:
            return raw[:offset]
        block = self.open_at_start
        if block is None or block.close in raw:
            block = open_block(raw)
        return raw + block.close if block is not None else raw


MARKER_PIECES = ("<think>", "</think>", "<|channel|>", "[THINK]", "[/THINK]", "<thought>")
"""Strings that only thinking formats use: one in a model's template or among its added tokens
means its responses may think (gpt-oss's markers are several tokens, `<|channel|>` among them)."""


def mentions_thinking(texts: Sequence[str]) -> bool:
    """Whether any of `texts` (a chat template, added-token names) holds a thinking marker."""
    return any(piece in text for text in texts for piece in MARKER_PIECES)
