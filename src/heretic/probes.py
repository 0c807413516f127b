"""Supervised refusal probes: a logistic regression per layer, trained on what the model did.

The unsupervised directions treat every harmful prompt as a refusal. A probe instead labels the
residuals by behaviour: a harmful prompt the original model actually refused is class 1, a
harmful prompt it answered and every harmless prompt are class 0. The probe's weight vector
is then the direction that separates "about to refuse" from "about to comply", which is what
the edit should remove.

All layers train at once as one batched problem in torch (on the GPU when there is one). The
residuals of each layer are centred and divided by one scalar (their RMS norm), never per
feature, so the weight vector keeps the geometry of the residual stream and is a usable
direction as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heretic.directions import align_signs, normalize

MIN_SAMPLES_PER_CLASS = 10
"""Fewer examples of a class than this and a probe fits noise: the layer keeps its plain
direction."""


class ProbeError(ValueError):
    """The probe cannot be trained on these inputs (the message says why and what to change)."""


@dataclass(frozen=True)
class ProbeResult:
    """Per-layer probes: unit directions (n_layers, hidden; pointing to refusal), their
    cross-validated balanced accuracy, and which layers passed `min_accuracy`."""

    directions: torch.Tensor
    accuracy: torch.Tensor
    kept: torch.Tensor


def _standardize(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x - mean) / scale


def fit_logistic(
    x: torch.Tensor, y: torch.Tensor, l2: float, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression per layer, all layers at once; returns (weights (L, H), bias (L)).

    `x` is (n, L, H) already standardized, `y` (n,) in {0, 1}. The loss is the class-balanced
    mean cross-entropy plus `l2 * |w|^2` per layer: balanced, because harmless prompts usually
    outnumber refusals and the probe should not learn "mostly say no". The problem is convex
    and small, so full-batch L-BFGS converges in a few dozen steps.
    """
    n, n_layers, hidden = x.shape
    y = y.to(x.dtype)
    n_pos = float(y.sum())
    n_neg = float(n - n_pos)
    sample_weight = torch.where(y > 0, 0.5 / n_pos, 0.5 / n_neg).to(x.dtype)
    w = torch.zeros(n_layers, hidden, dtype=x.dtype, device=x.device, requires_grad=True)
    b = torch.zeros(n_layers, dtype=x.dtype, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9
    )
    targets = y.unsqueeze(1).expand(n, n_layers)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.einsum("nlh,lh->nl", x, w) + b
        losses = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, targets, reduction="none"
        )
        loss = (losses * sample_weight.unsqueeze(1)).sum() + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return w.detach(), b.detach()


def _balanced_accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean of the per-class recalls per layer: 0.5 for a probe that always says one class."""
    predicted = logits > 0
    positive = y.bool().unsqueeze(1)
    recall_pos = (predicted & positive).sum(0) / positive.sum().clamp_min(1)
    recall_neg = (~predicted & ~positive).sum(0) / (~positive).sum().clamp_min(1)
    return (recall_pos + recall_neg) / 2


def _folds(y: torch.Tensor, k: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Stratified folds: each class shuffled and dealt round-robin, so every fold has both."""
    fold_of = torch.empty(len(y), dtype=torch.long)
    for label in (0, 1):
        index = (y == label).nonzero().flatten()
        index = index[torch.randperm(len(index), generator=generator)]
        fold_of[index] = torch.arange(len(index)) % k
    return [(fold_of == f).nonzero().flatten() for f in range(k)]


def train_probes(
    residuals: torch.Tensor,
    labels: torch.Tensor,
    l2: float,
    min_accuracy: float,
    *,
    folds: int = 5,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> ProbeResult:
    """Train one probe per layer; keep a layer's probe when its cross-validated balanced
    accuracy reaches `min_accuracy`.

    `residuals` is (n, n_layers, hidden), `labels` (n,) with 1 = refused. Raises `ProbeError`
    when a class has fewer than MIN_SAMPLES_PER_CLASS examples (the caller falls back to the
    plain directions). Balanced accuracy, because with 400 harmless and 200 refused prompts a
    probe that always says "complies" would score 0.67 plain accuracy and learn nothing.
    """
    if residuals.dim() != 3 or labels.shape != (len(residuals),):
        raise ProbeError(
            f"probe inputs must be residuals (n, layers, hidden) and n labels; got "
            f"{tuple(residuals.shape)} and {tuple(labels.shape)}"
        )
    labels = labels.long().cpu()
    counts = {label: int((labels == label).sum()) for label in (0, 1)}
    if min(counts.values()) < MIN_SAMPLES_PER_CLASS:
        raise ProbeError(
            f"probes need at least {MIN_SAMPLES_PER_CLASS} examples of each class; got "
            f"{counts[1]} refused and {counts[0]} complied. Use more (or other) bad_prompts, "
            "or turn use_supervised_probing off"
        )
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    x = residuals.to(device=device, dtype=torch.float32)
    y = labels.to(device)
    generator = torch.Generator().manual_seed(seed)
    k = min(folds, *counts.values())

    correct = torch.zeros(x.shape[1], device=device)
    for test in _folds(labels, k, generator):
        test = test.to(device)
        train = torch.ones(len(y), dtype=torch.bool, device=device)
        train[test] = False
        mean, scale = _moments(x[train])
        w, b = fit_logistic(_standardize(x[train], mean, scale), y[train], l2)
        logits = torch.einsum("nlh,lh->nl", _standardize(x[test], mean, scale), w) + b
        correct += _balanced_accuracy(logits, y[test])
    accuracy = (correct / k).cpu()

    mean, scale = _moments(x)
    w, _ = fit_logistic(_standardize(x, mean, scale), y, l2)
    # Standardizing divided each layer by one scalar, so w is already a direction in residual
    # space; point it from the complying mean to the refusing mean, as the edit expects.
    w = w.double().cpu()
    shift = x[y == 1].double().mean(0).cpu() - x[y == 0].double().mean(0).cpu()
    directions = align_signs(normalize(w), shift).float()
    return ProbeResult(directions=directions, accuracy=accuracy, kept=accuracy >= min_accuracy)


def _moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer mean (1, L, H) and one RMS scale per layer (1, L, 1)."""
    mean = x.mean(dim=0, keepdim=True)
    scale = (x - mean).pow(2).sum(-1).mean(0).sqrt().clamp_min(1e-12)
    return mean, scale.view(1, -1, 1) / x.shape[-1] ** 0.5
