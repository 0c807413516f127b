"""The design's refinements of the refusal direction: probes, helpfulness, sacred directions.

Order: plain directions (mean difference or contrastive PCA) -> per-layer probes replace or
ensemble them where the probe is good enough -> the result is made orthogonal to the
helpfulness direction and the sacred (capability) directions, all projected out at once.
The math lives in `directions.py` and `probes.py`; this module only decides which steps run
(from the settings), asks for the residuals it needs, and says what it did through `log`.
Measured on the organism in benchmarks/direction_extras.py (see docs/direction-extras.md):
every refinement is off by default unless the numbers there say it helps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from heretic.config import Settings
from heretic.directions import (
    contrastive_pca,
    ensemble,
    helpfulness_directions,
    mean_abs_cosine,
    normalize,
    orthogonalize,
    refusal_directions,
    sacred_directions,
)
from heretic.errors import DirectionsError
from heretic.probes import ProbeError, ProbeResult, train_probes

HELPFULNESS_SETS = ("helpful_prompts", "unhelpfulness_prompts")
SACRED_SETS = ("sacred_prompts", "sacred_baseline_prompts")

HELPFULNESS_KEY = "helpfulness_directions"
SACRED_KEY = "sacred_directions"
PROBE_ACCURACY_KEY = "probe_accuracy"
READOUTS_KEY = "readouts"


def extra_prompt_sets(settings: Settings) -> tuple[str, ...]:
    """The prompt sets (Settings field names) that the enabled refinements need."""
    names: tuple[str, ...] = ()
    if settings.orthogonalize_directions:
        names += HELPFULNESS_SETS
    if settings.use_sacred_directions:
        names += SACRED_SETS
    return names


@dataclass
class DirectionSet:
    """The refusal directions (n_layers, hidden) the edit uses, and what refined them."""

    refusal: torch.Tensor
    helpfulness: torch.Tensor | None = None
    sacred: torch.Tensor | None = None
    probes: ProbeResult | None = None
    sacred_overlap: float | None = None
    readouts: torch.Tensor | None = None

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors saved next to the refusal directions in the directions file."""
        tensors = {}
        if self.helpfulness is not None:
            tensors[HELPFULNESS_KEY] = self.helpfulness
        if self.sacred is not None:
            tensors[SACRED_KEY] = self.sacred
        if self.probes is not None:
            tensors[PROBE_ACCURACY_KEY] = self.probes.accuracy
        if self.readouts is not None:
            tensors[READOUTS_KEY] = self.readouts
        return tensors


def apply_probes(
    plain: torch.Tensor,
    probes: ProbeResult,
    pca: torch.Tensor | None,
    probe_weight: float,
) -> torch.Tensor:
    """Per layer: the probe direction (ensembled with `pca` when given) where the probe was
    kept, the plain direction elsewhere."""
    refined = probes.directions if pca is None else ensemble(probes.directions, pca, probe_weight)
    return torch.where(probes.kept.unsqueeze(-1), refined.to(plain.dtype), plain)


def format_accuracy(accuracy: torch.Tensor, kept: torch.Tensor) -> str:
    """'0:0.52 1:0.71* ...' (* = kept), one entry per layer, for the log."""
    return " ".join(
        f"{i}:{a:.2f}{'*' if k else ''}"
        for i, (a, k) in enumerate(zip(accuracy.tolist(), kept, strict=True))
    )


def build_directions(
    good: torch.Tensor,
    bad: torch.Tensor,
    settings: Settings,
    residuals_of: Callable[[str], torch.Tensor],
    refused: Callable[[], list[bool]],
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> DirectionSet:
    """Plain directions from the good/bad residuals, refined as the settings ask.

    `residuals_of(name)` gives the residuals of the named prompt set; `refused()` judges the
    original model's responses to the bad direction prompts (only called for the probes).
    """
    result = DirectionSet(refusal=refusal_directions(good, bad, settings.direction_method))
    if settings.use_supervised_probing:
        _probe(result, good, bad, settings, refused(), log, warn)
    against = _directions_to_keep(result, good, settings, residuals_of, log, warn)
    if against:
        try:
            result.refusal = orthogonalize(result.refusal, torch.cat(against, dim=1))
        except ValueError as e:
            raise DirectionsError(
                f"Orthogonalizing the refusal directions failed ({e}). Turn "
                "orthogonalize_good_mean, orthogonalize_directions or "
                "use_sacred_directions off, or lower "
                "n_sacred_directions."
            ) from e
    return result


def _probe(
    result: DirectionSet,
    good: torch.Tensor,
    bad: torch.Tensor,
    settings: Settings,
    refused: list[bool],
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """Replace (or ensemble) the plain directions by per-layer probes where they are good."""
    labels = torch.tensor([int(r) for r in refused] + [0] * len(good))
    log(f"probe labels: the original model refused {int(labels.sum())}/{len(bad)} bad prompts")
    try:
        probes = train_probes(
            torch.cat([bad, good]),
            labels,
            settings.probe_l2,
            settings.min_probe_accuracy,
            seed=settings.seed,
        )
    except ProbeError as e:
        warn(f"supervised probing skipped, using the plain directions: {e}")
        return
    result.probes = probes
    kept = probes.kept.tolist()
    log(
        f"probe balanced accuracy per layer (* = at least {settings.min_probe_accuracy}, "
        f"kept): {format_accuracy(probes.accuracy, kept)}"
    )
    if not any(kept):
        warn(
            "no layer's probe reached min_probe_accuracy "
            f"{settings.min_probe_accuracy}: using the plain directions"
        )
    pca = contrastive_pca(good, bad) if settings.ensemble_probe_pca else None
    result.refusal = apply_probes(result.refusal, probes, pca, settings.probe_weight)


def _directions_to_keep(
    result: DirectionSet,
    good: torch.Tensor,
    settings: Settings,
    residuals_of: Callable[[str], torch.Tensor],
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> list[torch.Tensor]:
    """The directions (each (n_layers, k, hidden)) the refusal direction is made orthogonal
    to: the good mean, helpfulness, sacred, as enabled; records them in `result`."""
    against = []
    if settings.orthogonalize_good_mean:
        good_mean = normalize(good.double().mean(dim=0)).to(result.refusal.dtype)
        overlap = mean_abs_cosine(result.refusal, good_mean)
        log(f"mean |cos| between the refusal directions and the good mean: {overlap:.3f}")
        against.append(good_mean.unsqueeze(1))
    if settings.orthogonalize_directions:
        helpful, unhelpful = (residuals_of(name) for name in HELPFULNESS_SETS)
        result.helpfulness = helpfulness_directions(helpful, unhelpful)
        overlap = mean_abs_cosine(result.refusal, result.helpfulness)
        log(f"mean |cos| between the refusal and helpfulness directions: {overlap:.3f}")
        against.append(result.helpfulness.unsqueeze(1))
    if settings.use_sacred_directions:
        sacred, baseline = (residuals_of(name) for name in SACRED_SETS)
        result.sacred = sacred_directions(
            sacred, baseline, settings.n_sacred_directions, settings.sacred_alpha
        )
        result.sacred_overlap = mean_abs_cosine(result.refusal, result.sacred)
        log(
            f"mean |cos| between the refusal and the {settings.n_sacred_directions} sacred "
            f"directions: {result.sacred_overlap:.3f}"
        )
        if result.sacred_overlap > settings.sacred_overlap_threshold:
            warn(
                f"the refusal direction overlaps the sacred directions (mean |cos| "
                f"{result.sacred_overlap:.2f} > sacred_overlap_threshold "
                f"{settings.sacred_overlap_threshold}): removing refusals this way will also "
                "hurt the capabilities the sacred prompts stand for"
            )
        against.append(result.sacred)
    return against
