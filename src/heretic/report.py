"""What the console shows of trials: one line per trial and the Pareto front table.

Kept apart from the search loop so that the menu, the headless report and the search's progress
lines describe a trial in the same words.
"""

from __future__ import annotations

from rich.table import Table

from heretic.abliteration import describe_params
from heretic.optimization import (
    KL_ATTR,
    OPENINGS_ATTR,
    PRUNED_ATTR,
    REFUSALS_ATTR,
    UNANSWERED_ATTR,
    did_nothing,
    objectives,
    params_from_trial,
)


def describe_trial(trial) -> str:
    """One line for a finished trial; a pruned trial shows its refusal lower bound."""
    kl = trial.user_attrs.get(KL_ATTR, float("nan"))
    refusals = trial.user_attrs.get(REFUSALS_ATTR, 0)
    pruned = trial.user_attrs.get(PRUNED_ATTR)
    if pruned:
        return f"pruned ({pruned}): refusals >= {refusals}{openings_note(trial)}, KL {kl:.4f}"
    return f"refusals {refusals}{openings_note(trial)}{unanswered_note(trial)}, KL {kl:.4f}"


def openings_note(trial) -> str:
    """ " + 0.41 openings" for a trial scored with `refusal_openings` (the margin its refusal
    objective adds to the count); else ""."""
    openings = trial.user_attrs.get(OPENINGS_ATTR)
    return "" if openings is None else f" + {openings:.2f} openings"


def unanswered_note(trial) -> str:
    """ " (k unanswered)" for a trial whose refusals include responses still thinking at the
    cap (reasoning models), so they are never mistaken for plain refusals; else ""."""
    unanswered = trial.user_attrs.get(UNANSWERED_ATTR, 0)
    return f" ({unanswered} unanswered: still thinking)" if unanswered else ""


def front_table(front, base_refusals: int, n_bad: int) -> Table:
    table = Table(title="Pareto front (KL divergence vs refusals)")
    table.add_column("trial", justify="right")
    table.add_column("refusals", justify="right")
    table.add_column("KL divergence", justify="right")
    table.add_column("parameters")
    for t in front:
        text = describe_params(params_from_trial(t))
        score = objectives(t)
        refusals = f"{score.refusals}/{n_bad}{openings_note(t)}{unanswered_note(t)}"
        if did_nothing(t, base_refusals):
            refusals += " (did nothing)"
        table.add_row(str(t.number), refusals, f"{score.kl_divergence:.4f}", text)
    table.caption = (
        f"base model: {base_refusals}/{n_bad} refusals, KL 0; 'did nothing': above 90% of "
        "the base refusals, never chosen by --select best while another point exists"
    )
    return table
