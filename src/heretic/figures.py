"""The search's figures beside the held-out ones: one set of rows for the printed report, the
model card and anyone reading heretic_metadata.json.

Everything here renders the metadata's `in_search`, `held_out` and `perplexity` entries
(`confirmation.figures_metadata`), so the report, the card and the file cannot disagree. Each
column says how it was measured: prompts (how many, from where), response tokens and decoding,
judge, and where the KL divergence is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from optuna.trial import FrozenTrial
from rich.markup import escape
from rich.table import Table

from heretic.optimization import objectives

Row = tuple[str, str, str | None]
"""(what, in the search, held out); held out is None when nothing was held out."""


def _refusals(record: Mapping[str, Any], key: str = "refusals") -> str:
    n = record["n_bad_prompts"]
    base = record["base_" + key]
    return f"{base}/{n} -> {record[key]}/{n}"


def figure_rows(metadata: Mapping[str, Any]) -> list[Row]:
    """The side-by-side rows of one trial's figures (see the module docstring)."""
    search = metadata["in_search"]
    held = metadata.get("held_out") or {}
    measured = bool(held.get("measured"))
    has_bad, has_good = "refusals" in held, "kl_divergence" in held

    def pick(present: bool, text: Callable[[], str]) -> str | None:
        if not measured:
            return None
        return text() if present else "not measured"

    return [
        (
            "refusals (original -> this model)",
            _refusals(search),
            pick(has_bad, lambda: _held(held)),
        ),
        (
            "  by plain markers",
            "-",
            pick(has_bad, lambda: _refusals(held, "marker_refusals")),
        ),
        (
            "KL divergence",
            f"{search['kl_divergence']:.4f}",
            pick(has_good, lambda: _kl(held)),
        ),
        (
            "harmful prompts",
            f"{search['n_bad_prompts']}: {search['bad_prompts']}",
            pick(has_bad, lambda: f"{held['n_bad_prompts']}: {held['bad_prompts']}"),
        ),
        ("responses", search["decoding"], pick(has_bad, lambda: held["decoding"])),
        ("judge", search["judge"], pick(has_bad, lambda: f"{held['judge']}, and plain markers")),
        (
            "harmless prompts (KL)",
            _kl_prompts(search),
            pick(has_good, lambda: _kl_prompts(held)),
        ),
    ]


def _kl(record: Mapping[str, Any]) -> str:
    kl = record.get("kl_divergence")
    return "-" if kl is None else f"{kl:.4f}"


def _kl_prompts(record: Mapping[str, Any]) -> str:
    """How many harmless prompts the KL divergence is over, where from, and which it left out
    (kl_skip_refused_good)."""
    text = f"{record['n_good_prompts']}: {record['good_prompts']}"
    left_out = record.get("n_good_refused_left_out")
    if left_out is not None:
        text += f", less the {left_out} the original model refuses"
    return f"{text}; {record['kl_position']}"


def _held(held: Mapping[str, Any]) -> str:
    text = _refusals(held)
    if held.get("unanswered"):
        text += f" ({held['unanswered']} unanswered: still thinking)"
    return text


def held_out_note(metadata: Mapping[str, Any]) -> str:
    """'' when held-out figures exist, else why not."""
    held = metadata.get("held_out") or {}
    return "" if held.get("measured") else f"Held out: not measured ({held.get('reason')})."


def perplexity_line(metadata: Mapping[str, Any]) -> str:
    """The perplexity of the original and the edited model, and what it was measured on."""
    record = metadata.get("perplexity") or {}
    if not record.get("measured"):
        return f"Perplexity: not measured ({record.get('reason', 'no record')})."
    original, edited = record["original"], record["edited"]
    return (
        f"Perplexity: {original['perplexity']:.3f} -> {edited['perplexity']:.3f} (cross-entropy "
        f"{original['cross_entropy']:.4f} -> {edited['cross_entropy']:.4f} nats per token), "
        f"original -> this model, on {record['texts']} ({record['n_tokens']} tokens)."
    )


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table (the held-out column only when something was held out)."""
    held = any(r[2] is not None for r in rows)
    header = (
        "| | in the search | held out |\n|---|---|---|"
        if held
        else ("| | in the search |\n|---|---|")
    )
    lines = [header]
    for what, search, held_out in rows:
        cells = [what.strip(), search or "", *([held_out or ""] if held else [])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def rich_table(rows: Sequence[Row], title: str) -> Table:
    held = any(r[2] is not None for r in rows)
    table = Table(title=title, show_lines=True)
    table.add_column("")
    table.add_column("in the search")
    if held:
        table.add_column("held out")
    for what, search, held_out in rows:
        cells = [what, search or "", *([held_out or ""] if held else [])]
        table.add_row(*(escape(c) for c in cells))
    return table


def held_out_front_table(front: Sequence[FrozenTrial], confirmation, n_bad: int) -> Table:
    """Every confirmed front point: the search's figures beside the held-out ones."""
    base = confirmation.base
    sets = confirmation.sets
    n_held = len(sets.bad.prompts) if sets.bad else 0
    table = Table(title="Pareto front: in the search and held out")
    for name in ("trial", "refusals in search", "held out", "by markers"):
        table.add_column(name, justify="right")
    for name in ("KL in search", "KL held out", "perplexity"):
        table.add_column(name, justify="right")
    for trial in front:
        score = confirmation.score(trial)
        search = objectives(trial)
        table.add_row(
            str(trial.number),
            f"{search.refusals}/{n_bad}",
            _count(score.refusals, n_held),
            _count(score.marker_refusals, n_held),
            f"{search.kl_divergence:.4f}",
            "-" if score.kl_divergence is None else f"{score.kl_divergence:.4f}",
            "-" if score.cross_entropy is None else f"{score.cross_entropy.perplexity:.3f}",
        )
    caption = []
    if base.refusals is not None:
        caption.append(
            f"{_count(base.refusals, n_held)} refusals held out "
            f"({_count(base.marker_refusals, n_held)} by markers)"
        )
    if base.cross_entropy is not None:
        caption.append(f"perplexity {base.cross_entropy.perplexity:.3f}")
    table.caption = (
        f"original model: {', '.join(caption)}; " if caption else ""
    ) + f"measured in {confirmation.seconds:.0f} s"
    return table


def _count(value: int | None, n: int) -> str:
    return "-" if value is None else f"{value}/{n}"
