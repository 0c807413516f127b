"""Split strings such as ``train[:200]`` or ``[10%:20%]``, parsed without the network.

Local files and hub datasets take the same split syntax, and a malformed split should fail before
anything is read or downloaded; so the grammar lives here, apart from the loaders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeVar

from heretic.errors import DatasetError

T = TypeVar("T")

ACCEPTED_SPLITS = (
    '"train", "train[:200]", "[270:370]", "[5:]", "[-100:]", "train[:10%]", "[10%:20%]"'
)

_SPLIT_RE = re.compile(r"^(?P<name>[\w-]+)?(?:\[(?P<body>[^\[\]]*)\])?$")
_BOUND_RE = re.compile(r"^(?P<value>[+-]?\d+)(?P<pct>%)?$")


@dataclass(frozen=True)
class SplitSlice:
    """A parsed split such as ``train[:10%]``: split name plus a start/stop slice.

    Percent bounds cannot be turned into indices until the set size is known, so the slice is
    kept symbolic and resolved by `resolve`, with the same rounding the `datasets` library uses
    (``round(pct * n / 100)``) so that local files and hub datasets select the same rows.
    """

    name: str | None
    start: int | None = None
    stop: int | None = None
    percent: bool = False

    @property
    def is_full(self) -> bool:
        """True when the slice keeps everything (lets streaming avoid counting)."""
        return self.start is None and self.stop is None

    @property
    def needs_length(self) -> bool:
        """True when resolving needs the set size: percent or negative (from-the-end) bounds."""
        return self.percent or any(b is not None and b < 0 for b in (self.start, self.stop))

    def resolve(self, length: int) -> slice:
        """Turn the symbolic slice into a plain index slice for a set of `length` items."""
        if not self.percent:
            return slice(self.start, self.stop)

        def to_index(bound: int | None) -> int | None:
            return None if bound is None else int(round(bound * length / 100.0))

        return slice(to_index(self.start), to_index(self.stop))

    def apply(self, items: list[T]) -> list[T]:
        """Select the slice from `items`, with Python's clamping of out-of-range bounds."""
        return items[self.resolve(len(items))]

    def slice_text(self) -> str:
        """The bracket part as the user would write it, e.g. ``[:10%]``; empty for a full split."""
        if self.is_full:
            return ""
        unit = "%" if self.percent else ""

        def fmt(bound: int | None) -> str:
            return "" if bound is None else f"{bound}{unit}"

        return f"[{fmt(self.start)}:{fmt(self.stop)}]"


def parse_split(split: str) -> SplitSlice:
    """Parse ``NAME``, ``NAME[start:stop]`` or ``[start:stop]`` (bounds absolute or percent).

    Raises `ValueError` with the reason; `load_prompts` adds the setting name, since this
    function is also useful on its own (e.g. validating settings before any loading).
    """
    text = split.strip()
    match = _SPLIT_RE.match(text)
    if match is None:
        raise ValueError(_split_problem(text))
    name, body = match.group("name"), match.group("body")
    if body is None:
        return SplitSlice(name=name)
    parts = body.split(":")
    if len(parts) == 1:
        raise ValueError("a slice needs a colon, e.g. [:200] or [270:370]")
    if len(parts) > 2:
        raise ValueError("a slice step (start:stop:step) is not supported")
    start, start_pct = _parse_bound(parts[0])
    stop, stop_pct = _parse_bound(parts[1])
    if (start is not None and stop is not None) and start_pct != stop_pct:
        raise ValueError("do not mix percent and absolute bounds in one slice")
    return SplitSlice(name=name, start=start, stop=stop, percent=start_pct or stop_pct)


def _split_problem(text: str) -> str:
    """Explain the most likely mistake in a split that does not match the grammar at all."""
    if text.count("[") != text.count("]"):
        return "unbalanced brackets"
    if "+" in text:
        return "combining splits with '+' is only supported for hub datasets"
    return "expected a split name and/or a [start:stop] slice"


def _parse_bound(raw: str) -> tuple[int | None, bool]:
    """Parse one slice bound: empty, an integer, or an integer percentage in -100%..100%."""
    raw = raw.strip()
    if not raw:
        return None, False
    match = _BOUND_RE.match(raw)
    if match is None:
        raise ValueError(f"slice bound {raw!r} is not an integer or a percentage like 10%")
    value, percent = int(match.group("value")), match.group("pct") is not None
    if percent and not -100 <= value <= 100:
        raise ValueError(f"percentage {raw} is outside -100%..100%")
    return value, percent


def parse_split_for(setting: str, split: str) -> SplitSlice:
    """`parse_split`, with the failure turned into a `DatasetError` that names the setting."""
    try:
        return parse_split(split)
    except ValueError as exc:
        raise DatasetError(
            f"{setting}: split {split!r} is malformed ({exc}). "
            f"Set {setting}.split to one of the accepted forms: {ACCEPTED_SPLITS}."
        ) from exc
