"""Refusal directions from residuals: difference of means, or contrastive PCA.

Inputs are residuals of shape (n_prompts, n_layers, hidden) (float32); outputs are unit
directions of shape (n_layers, hidden) (float32). Sums are accumulated in float64, because
mean differences of large, nearly equal activations lose digits in float32.
"""

from __future__ import annotations

import torch


def normalize(v: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Unit vectors along the last axis; a zero vector stays zero rather than becoming NaN."""
    return v / v.norm(dim=-1, keepdim=True).clamp_min(eps)


def _check(good: torch.Tensor, bad: torch.Tensor) -> None:
    if good.dim() != 3 or bad.dim() != 3 or good.shape[1:] != bad.shape[1:]:
        raise ValueError(
            f"residuals must be (n, layers, hidden) with equal layers/hidden; "
            f"got {tuple(good.shape)} and {tuple(bad.shape)}"
        )
    if len(good) == 0 or len(bad) == 0:
        raise ValueError("need at least one good and one bad residual")


def mean_difference(good: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """`normalize(mean(bad) - mean(good))` per layer."""
    _check(good, bad)
    diff = bad.double().mean(dim=0) - good.double().mean(dim=0)
    return normalize(diff).float()


def contrastive_pca(good: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """Top eigenvector per layer of the bad-vs-good contrast, signed like the mean difference.

    The contrast is the second moment of the bad residuals about the good mean minus the good
    covariance: `cov(bad) + d d^T - cov(good)` with `d = mean(bad) - mean(good)`. It holds the
    mean shift and any extra spread the harmful prompts have; what both sets vary along in the
    same way cancels. Eigenvector signs are arbitrary, so each is flipped to agree with d.
    """
    _check(good, bad)
    g = good.double()
    b = bad.double()
    mean_good = g.mean(dim=0)
    d = b.mean(dim=0) - mean_good
    centered_bad = b - b.mean(dim=0)
    centered_good = g - mean_good
    # (layers, hidden, hidden)
    cov_bad = torch.einsum("nlh,nlk->lhk", centered_bad, centered_bad) / len(b)
    cov_good = torch.einsum("nlh,nlk->lhk", centered_good, centered_good) / len(g)
    contrast = cov_bad - cov_good + torch.einsum("lh,lk->lhk", d, d)
    _, eigenvectors = torch.linalg.eigh(contrast)
    top = eigenvectors[..., -1]
    return align_signs(top, d).float()


def align_signs(directions: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Flip each row of `directions` whose dot product with `reference`'s row is negative."""
    sign = torch.sign((directions * reference).sum(dim=-1, keepdim=True))
    sign[sign == 0] = 1
    return directions * sign


def refusal_directions(good: torch.Tensor, bad: torch.Tensor, method: str) -> torch.Tensor:
    if method == "mean_difference":
        return mean_difference(good, bad)
    if method == "pca":
        return contrastive_pca(good, bad)
    raise ValueError(f"unknown direction method {method!r}")
