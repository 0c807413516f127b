"""Pictures of a run: the KL-vs-refusals trade-off, and good vs bad residuals per layer.

The Pareto table lists the best trials, but choosing among them is easier when you see every
trial, where the front bends, and how far the chosen point sits from the unedited model. The
residual picture shows why the edit works (or not): harmful and harmless prompts separate
along the refusal direction in the layers that matter.

matplotlib's object API (`Figure` + the Agg canvas) is used rather than pyplot, so nothing here
touches global backend state; files are written atomically (`atomic.atomic_file`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from heretic.atomic import atomic_file

# Colour-blind-safe (Okabe-Ito) colours.
GOOD_COLOUR = "#0072B2"
BAD_COLOUR = "#D55E00"
FRONT_COLOUR = "#009E73"
CHOSEN_COLOUR = "#CC79A7"
TRIAL_COLOUR = "#999999"


@dataclass(frozen=True)
class TrialPoint:
    number: int
    kl_divergence: float
    refusals: int


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_file(path, "the plot") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path


def pareto_plot(
    trials: Sequence[TrialPoint],
    front: Sequence[int],
    chosen: int | None,
    base_refusals: int,
    n_bad: int,
    path: Path,
    title: str = "",
) -> Path:
    """Every trial's KL divergence vs refusals; the front as a staircase; the chosen trial and
    the unedited model marked. KL uses a symmetric-log axis so that the unedited model (KL 0)
    and trials spanning several orders of magnitude all fit."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    by_number = {t.number: t for t in trials}
    ax.scatter(
        [t.kl_divergence for t in trials],
        [t.refusals for t in trials],
        s=22,
        color=TRIAL_COLOUR,
        alpha=0.7,
        label=f"trials ({len(trials)})",
        zorder=2,
    )
    front_points = sorted(
        (by_number[n] for n in front if n in by_number), key=lambda t: t.kl_divergence
    )
    if front_points:
        _draw_front(ax, front_points)
    ax.scatter(
        [0], [base_refusals], s=90, marker="s", color="black", label="original model", zorder=5
    )
    if chosen is not None and chosen in by_number:
        t = by_number[chosen]
        ax.scatter(
            [t.kl_divergence],
            [t.refusals],
            s=260,
            marker="*",
            color=CHOSEN_COLOUR,
            edgecolor="black",
            linewidth=0.6,
            label=f"chosen: trial {t.number} ({t.refusals}/{n_bad}, KL {t.kl_divergence:.3f})",
            zorder=6,
        )
    _scale_axes(ax, trials, n_bad)
    ax.set_title(title or "heretic: refusals vs KL divergence per trial")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    return _save(fig, path)


def _draw_front(ax, front_points: Sequence[TrialPoint]) -> None:
    """The Pareto front as a staircase (between two front points no trial does better on both
    axes), each point labelled with its trial number, the number the menu and --select take."""
    xs = [t.kl_divergence for t in front_points]
    ys = [t.refusals for t in front_points]
    ax.step(xs, ys, where="post", color=FRONT_COLOUR, linewidth=1.5, zorder=3)
    ax.scatter(xs, ys, s=40, color=FRONT_COLOUR, label=f"Pareto front ({len(xs)})", zorder=4)
    for t in front_points:
        ax.annotate(
            str(t.number),
            (t.kl_divergence, t.refusals),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
            color=FRONT_COLOUR,
        )


def _scale_axes(ax, trials: Sequence[TrialPoint], n_bad: int) -> None:
    """A symmetric-log KL axis, linear below the decade of the smallest positive KL, so the
    unedited model (KL 0) and trials spanning several orders of magnitude all fit; refusals
    from 0 to n_bad with a margin so that points on either bound stay visible."""
    positive = [t.kl_divergence for t in trials if t.kl_divergence > 0]
    linthresh = 10 ** math.floor(math.log10(min(positive))) if positive else 0.01
    ax.set_xscale("symlog", linthresh=max(linthresh, 1e-4))
    ax.set_xlim(left=-linthresh * 0.3)
    ax.set_ylim(-max(1, n_bad * 0.03), n_bad * 1.04 + 1)
    ax.set_xlabel("KL divergence from the original model (first response token; symlog)")
    ax.set_ylabel(f"refusals (of {n_bad} harmful evaluation prompts)")


def _second_axis(points: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The direction of largest variance once r is projected out: the most informative y axis
    to pair with the refusal direction."""
    centred = points - points.mean(0)
    centred = centred - torch.outer(centred @ r, r)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return v[0]


def residual_plot(
    good: torch.Tensor,
    bad: torch.Tensor,
    directions: torch.Tensor,
    layers: Sequence[int],
    path: Path,
    max_panels: int = 16,
) -> Path:
    """Good and bad residuals (n, n_layers, hidden) projected per layer onto the refusal
    direction (x) and the main remaining direction of variance (y)."""
    from matplotlib.figure import Figure

    layers = sorted(set(layers)) or list(range(directions.shape[0]))
    if len(layers) > max_panels:
        step = (len(layers) - 1) / (max_panels - 1)
        layers = sorted({layers[round(i * step)] for i in range(max_panels)})
    cols = min(4, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(layers) :]:
        ax.set_visible(False)
    for ax, layer in zip(axes.flat, layers, strict=False):
        r = directions[layer].float()
        g, b = good[:, layer].float(), bad[:, layer].float()
        y_axis = _second_axis(torch.cat([g, b]), r)
        for values, colour, label in ((g, GOOD_COLOUR, "harmless"), (b, BAD_COLOUR, "harmful")):
            ax.scatter(values @ r, values @ y_axis, s=7, alpha=0.6, color=colour, label=label)
        ax.set_title(f"layer {layer}", fontsize=10)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("along refusal direction", fontsize=8)
        ax.set_ylabel("top other component", fontsize=8)
    axes.flat[0].legend(fontsize=8, loc="best")
    fig.suptitle("Residuals at the last prompt token: harmless vs harmful prompts")
    return _save(fig, path)
