"""How a benchmark comparison is shown: the console table, the metadata record, the card.

The difference's standard error is sqrt(se_original² + se_edited²), as for two independent
samples. Both models answer the same documents, so the true error of the difference is
smaller: the figure errs on the side of calling a change noise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from rich.table import Table

from heretic.capability import Comparison, MetricRow


def _with_error(value: float, stderr: float | None, signed: bool = False) -> str:
    text = f"{value:+.3f}" if signed else f"{value:.3f}"
    return text if stderr is None else f"{text}±{stderr:.3f}"


def difference(original: MetricRow, edited: MetricRow | None) -> tuple[float, float | None]:
    if edited is None:
        return math.nan, None
    if original.stderr is None or edited.stderr is None:
        return edited.value - original.value, None
    return edited.value - original.value, math.hypot(original.stderr, edited.stderr)


def comparison_table(comparison: Comparison, title: str) -> Table:
    table = Table(title=title)
    table.add_column("task / metric", overflow="fold")
    for name in ("n", "original", "edited", "difference"):  # figures are never wrapped
        table.add_column(name, justify="right", no_wrap=True)
    for original, edited in comparison.pairs():
        change, error = difference(original, edited)
        table.add_row(
            f"{original.task}\n  {original.metric}",
            "" if original.n is None else str(original.n),
            _with_error(original.value, original.stderr),
            "missing" if edited is None else _with_error(edited.value, edited.stderr),
            "" if edited is None else _with_error(change, error, signed=True),
        )
    table.caption = (
        f"lm-evaluation-harness {comparison.lm_eval_version}, {_options_text(comparison)}; "
        "± standard error (of the difference: both errors combined as if independent)"
        + (
            f"; original results cached: {', '.join(comparison.cached)}"
            if comparison.cached
            else ""
        )
    )
    return table


def _options_text(comparison: Comparison) -> str:
    options = comparison.options
    parts = [
        "all documents" if options.limit is None else f"at most {options.limit} documents a task",
        "each task's own few-shot count"
        if options.num_fewshot is None
        else f"{options.num_fewshot}-shot",
        "chat template" if options.chat_template else "no chat template",
    ]
    return ", ".join(parts)


def benchmark_record(comparison: Comparison) -> dict[str, Any]:
    """What heretic_metadata.json keeps under "benchmarks"."""
    rows = []
    for original, edited in comparison.pairs():
        change, error = difference(original, edited)
        rows.append(
            {
                "task": original.task,
                "metric": original.metric,
                "n": original.n,
                "original": original.value,
                "original_stderr": original.stderr,
                "edited": None if edited is None else edited.value,
                "edited_stderr": None if edited is None else edited.stderr,
                "difference": None if edited is None else change,
                "difference_stderr": error,
                "higher_is_better": original.higher_is_better,
            }
        )
    return {
        "harness": "lm-evaluation-harness",
        "lm_eval_version": comparison.lm_eval_version,
        "tasks": list(comparison.original),
        **comparison.options.record(),
        "results": rows,
        "description": _options_text(comparison),
    }


def card_section(record: Mapping[str, Any] | None) -> str:
    """The model card's "Capability benchmarks" section ('' when none were run)."""
    if not record:
        return ""

    def cell(value: Any, stderr: Any) -> str:
        if value is None:
            return "missing"
        return f"{value:.3f}" + ("" if stderr is None else f" ± {stderr:.3f}")

    lines = [
        "## Capability benchmarks",
        "",
        "| task | metric | documents | source model | this model | difference |",
        "|---|---|---|---|---|---|",
    ]
    for row in record["results"]:
        change = row["difference"]
        lines.append(
            f"| {row['task']} | {row['metric']} | {row['n'] if row['n'] is not None else ''} | "
            f"{cell(row['original'], row['original_stderr'])} | "
            f"{cell(row['edited'], row['edited_stderr'])} | "
            + ("" if change is None else f"{change:+.3f}")
            + " |"
        )
    lines += [
        "",
        f"Measured with lm-evaluation-harness {record['lm_eval_version']} on both models in "
        f"memory ({record['description']}); ± is the standard error lm-eval reports.",
        "",
    ]
    return "\n".join(lines) + "\n"


def merge_records(old: Mapping[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """A trial benchmarked twice (mmlu, later gsm8k) keeps both when they were measured the
    same way; a task run again, or other options, replace what was there."""
    same = ("lm_eval_version", "limit", "num_fewshot", "chat_template", "system_prompt")
    if not old or any(old.get(k) != new.get(k) for k in same):
        return new
    tasks = [t for t in old["tasks"] if t not in new["tasks"]]
    kept = [r for r in old["results"] if r["task"] not in _row_tasks(new)]
    return {**new, "tasks": [*tasks, *new["tasks"]], "results": [*kept, *new["results"]]}


def _row_tasks(record: Mapping[str, Any]) -> set[str]:
    return {row["task"] for row in record["results"]} | set(record["tasks"])
