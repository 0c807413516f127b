"""Refusal directions from residuals: difference of means, or contrastive PCA.

Inputs are residuals of shape (n_prompts, n_layers, hidden) (float32); outputs are unit
directions of shape (n_layers, hidden) (float32). Sums are accumulated in float64, because
mean differences of large, nearly equal activations lose digits in float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from heretic.errors import DirectionsError, ExportError


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


# --------------------------------------------------------------------------------------------
# The directions file: computed once, reused by reruns and by other workers
# --------------------------------------------------------------------------------------------

DIRECTIONS_FILE = "directions.safetensors"
DIRECTIONS_KEY = "directions"
SHAPE_KEYS = ("n_layers", "hidden_size")
"""Metadata that must match the model: a file made for another shape cannot be used at all."""
MATCH_KEYS = ("model", "direction_method", "prompts_sha256")
"""Metadata that must match for the file to be reused instead of recomputed."""


def prompts_digest(good: list[str], bad: list[str]) -> str:
    """A hash of the prompts the directions come from (their text, not where they came from)."""
    return hashlib.sha256(json.dumps([good, bad]).encode()).hexdigest()


def save_directions(path: Path, directions: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write directions (n_layers x hidden, float32) and metadata atomically (temp + rename).

    A process killed while writing leaves at most a hidden temporary sibling, never a
    truncated file that a rerun would try to load.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(
            {DIRECTIONS_KEY: directions.detach().float().cpu().contiguous()},
            tmp,
            metadata={k: str(v) for k, v in metadata.items()},
        )
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(
            f"Writing the refusal directions to {path} failed ({e.strerror or e}). "
            "Free disk space or choose another --output-dir."
        ) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_directions(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a directions file written by `save_directions`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            directions = f.get_tensor(DIRECTIONS_KEY)
    except FileNotFoundError as e:
        raise DirectionsError(f"Directions file {path} does not exist: fix --directions.") from e
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise DirectionsError(
            f"Directions file {path} cannot be read ({e}): delete it (it will be recomputed) "
            "or fix --directions."
        ) from e
    if directions.dim() != 2 or not torch.isfinite(directions).all():
        raise DirectionsError(
            f"Directions file {path} holds no finite (layers x hidden) directions: delete it."
        )
    return directions.float(), metadata


def check_directions_shape(
    path: Path, directions: torch.Tensor, metadata: dict[str, str], n_layers: int, hidden: int
) -> None:
    """Refuse a file made for a model of another shape, naming both shapes."""
    if tuple(directions.shape) != (n_layers, hidden):
        made_for = metadata.get("model", "another model")
        raise DirectionsError(
            f"Directions file {path} was made for {made_for} ({directions.shape[0]} layers, "
            f"hidden size {directions.shape[1]}), but this model has {n_layers} layers and "
            f"hidden size {hidden}. Delete the file, choose another --output-dir, or fix "
            "--directions."
        )


def metadata_differences(stored: dict[str, str], current: dict[str, str]) -> list[str]:
    """The MATCH_KEYS on which a directions file differs from this run, as readable lines."""
    return [
        f"{key}: file has {stored.get(key)!r}, this run has {current.get(key)!r}"
        for key in MATCH_KEYS
        if stored.get(key) != current.get(key)
    ]
