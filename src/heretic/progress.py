"""Progress inside long steps: rich bars on a terminal, plain lines now and then elsewhere.

Extracting directions, learning the judge, scoring the original model and every trial each take
minutes on a CPU. A terminal shows rich bars for them; but rich draws nothing when stderr is a
log file, a pipe or CI, and a step of many minutes would then print nothing at all, which looks
like a hang. So `step_progress` gives a rich `Progress` on a terminal and, elsewhere, a
`PlainProgress` with the same calls (`add_task`, `advance`, `update`, `reset`) that prints one
line per task at most every `PLAIN_INTERVAL_S` seconds, plus a closing line for a long task.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_INTERVAL_S = 30.0
"""Seconds between two plain progress lines: often enough to see a run is alive, rarely enough
that a log of a long search stays readable."""


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0
    visible: bool = True
    fields: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    last_line: float = 0.0


class PlainProgress:
    """The part of rich's `Progress` that heretic uses, printed as throttled plain lines."""

    def __init__(
        self,
        console: Console,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console
        self.interval = PLAIN_INTERVAL_S if interval is None else interval
        self.clock = clock
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(
        self,
        description: str,
        total: float | None = 100.0,
        completed: float = 0,
        visible: bool = True,
        **fields: Any,
    ) -> int:
        task_id = len(self.tasks)
        now = self.clock()
        self.tasks[task_id] = _Task(description, total, completed, visible, fields, now, now)
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        task = self.tasks[task_id]
        task.completed += advance
        self._maybe_print(task)

    def update(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        visible: bool | None = None,
        **fields: Any,
    ) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        if description is not None:
            task.description = description
        if visible is not None:
            task.visible = visible
        task.fields.update(fields)
        if completed is not None or advance is not None:
            self._maybe_print(task)

    def reset(
        self,
        task_id: int,
        *,
        total: float | None = None,
        completed: int = 0,
        visible: bool | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        task = self.tasks[task_id]
        now = self.clock()
        task.completed, task.started, task.last_line = completed, now, now
        self.update(task_id, total=total, visible=visible, description=description, **fields)

    def _maybe_print(self, task: _Task) -> None:
        """A line once `interval` has passed since the task's last one, and a closing line for
        a task that ran longer than `interval` (a short one finishes unnoticed)."""
        if not task.visible:
            return
        now = self.clock()
        finished = task.total is not None and task.completed >= task.total
        if now - task.last_line < self.interval and not (
            finished and now - task.started >= self.interval
        ):
            return
        task.last_line = now
        self.console.print(f"  {escape(plain_line(task, now))}", highlight=False)


def plain_line(task: _Task, now: float) -> str:
    """`Residuals for bad_prompts: 120/400 prompts, 35 s, about 82 s left`."""
    done = f"{task.completed:g}" + (f"/{task.total:g}" if task.total is not None else "")
    unit = f" {task.fields['unit']}" if task.fields.get("unit") else ""
    elapsed = now - task.started
    parts = [f"{task.description}: {done}{unit}", f"{elapsed:.0f} s"]
    if task.total and 0 < task.completed < task.total:
        parts.append(f"about {elapsed * (task.total / task.completed - 1):.0f} s left")
    if task.fields.get("info"):
        parts.append(str(task.fields["info"]))
    return ", ".join(parts)


def step_progress(console: Console) -> Progress | PlainProgress:
    """Bars on a terminal, plain lines elsewhere (see the module docstring)."""
    if not console.is_terminal:
        return PlainProgress(console)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    )


T = TypeVar("T")


def tracked(
    console: Console, description: str, items: Sequence[Any], chunks: Iterable[list[T]]
) -> list[T]:
    """Collect `chunks` (lists of results, one per batch of `items`), showing how many items
    are done: for generation passes that give their results a batch at a time."""
    results: list[T] = []
    with step_progress(console) as progress:
        task = progress.add_task(description, total=len(items), info="", unit="prompts")
        for chunk in chunks:
            results += chunk
            progress.advance(task, len(chunk))
    return results
