"""Refusal directions from residuals: difference of means, or contrastive PCA.

Inputs are residuals of shape (n_prompts, n_layers, hidden) (float32); outputs are unit
directions of shape (n_layers, hidden) (float32). Sums are accumulated in float64, because
mean differences of large, nearly equal activations lose digits in float32.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from heretic.atomic import atomic_file
from heretic.errors import DirectionsError


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


def save_directions(
    path: Path,
    directions: torch.Tensor,
    metadata: dict[str, str],
    extras: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write directions (n_layers x hidden, float32) and metadata atomically (temp + rename).

    `extras` are further tensors saved beside them (the helpfulness and sacred directions,
    the probes' accuracies), so a reader of the file sees what the refusal directions were
    made orthogonal to.

    A process killed while writing leaves at most a hidden temporary sibling (which the next
    run removes), never a truncated file that a rerun would try to load.
    """
    tensors = {
        name: tensor.detach().float().cpu().contiguous() for name, tensor in (extras or {}).items()
    }
    tensors[DIRECTIONS_KEY] = directions.detach().float().cpu().contiguous()
    with atomic_file(path, "the refusal directions") as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})


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


def load_direction_extras(path: Path) -> dict[str, torch.Tensor]:
    """The tensors saved beside the refusal directions (empty for a file with none)."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k).float() for k in f.keys() if k != DIRECTIONS_KEY}


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


# --------------------------------------------------------------------------------------------
# Refinements: helpfulness and sacred (capability) directions, orthogonalization, ensembles
# --------------------------------------------------------------------------------------------


def helpfulness_directions(helpful: torch.Tensor, unhelpful: torch.Tensor) -> torch.Tensor:
    """`normalize(mean(helpful) - mean(unhelpful))` per layer: what answering helpfully adds.

    Part of the refusal direction is plain "this is (not) an assistant answering a request";
    removing that part too would make the edited model a worse assistant on every prompt.
    """
    if len(helpful) == 0 or len(unhelpful) == 0:
        raise ValueError(
            f"the helpfulness direction needs helpful and unhelpful prompts; got "
            f"{len(helpful)} helpful and {len(unhelpful)} unhelpful residuals"
        )
    return mean_difference(unhelpful, helpful)


def sacred_directions(
    sacred: torch.Tensor, baseline: torch.Tensor, n_directions: int, alpha: float = 1.0
) -> torch.Tensor:
    """Capability directions: top eigenvectors per layer of `cov(sacred) - alpha * cov(baseline)`.

    Returns (n_layers, n_directions, hidden), orthonormal per layer. The baseline (plain
    prose) cancels what any text varies along, leaving what the capability prompts (knowledge
    questions) vary along beyond it: the directions an edit should leave alone.
    """
    _check(baseline, sacred)
    if len(sacred) < 2 or len(baseline) < 2:
        raise ValueError(
            f"sacred directions need at least 2 sacred and 2 baseline prompts (covariances); "
            f"got {len(sacred)} and {len(baseline)}"
        )
    hidden = sacred.shape[-1]
    if not 1 <= n_directions <= hidden:
        raise ValueError(f"n_directions must be in 1..{hidden}, got {n_directions}")
    s = sacred.double()
    b = baseline.double()
    cs = s - s.mean(dim=0)
    cb = b - b.mean(dim=0)
    cov_s = torch.einsum("nlh,nlk->lhk", cs, cs) / (len(s) - 1)
    cov_b = torch.einsum("nlh,nlk->lhk", cb, cb) / (len(b) - 1)
    _, eigenvectors = torch.linalg.eigh(cov_s - alpha * cov_b)
    # eigh sorts ascending: the last columns are the largest eigenvalues, biggest first.
    top = eigenvectors[..., -n_directions:].flip(-1).transpose(-1, -2)
    return orthonormal_basis(top).float()


def orthonormal_basis(vectors: torch.Tensor) -> torch.Tensor:
    """Orthonormalize k vectors per layer, (n_layers, k, hidden) -> same shape, by QR (float64).

    Projecting out vectors one by one is only right when they are orthogonal; after QR, all of
    them can be removed at once with `Q Q^T`.
    """
    if vectors.dim() != 3:
        raise ValueError(f"expected (n_layers, k, hidden), got {tuple(vectors.shape)}")
    q, r = torch.linalg.qr(vectors.double().transpose(-1, -2))  # (layers, hidden, k)
    # QR's signs are arbitrary: keep each basis vector pointing like the input it came from.
    sign = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    sign[sign == 0] = 1
    return (q * sign.unsqueeze(-2)).transpose(-1, -2).to(vectors.dtype)


def orthogonalize(directions: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """Remove from each layer's direction its component in the span of `against`, renormalized.

    `directions` is (n_layers, hidden); `against` is (n_layers, hidden) or (n_layers, k, hidden).
    With one unit u this is `normalize(r - (r.u) u)`; with several, they are orthonormalized
    first (QR) and projected out together. Raises when a direction lies (almost) inside the
    span, since nothing meaningful would be left to edit.
    """
    if against.dim() == 2:
        against = against.unsqueeze(1)
    if against.shape[0] != directions.shape[0] or against.shape[-1] != directions.shape[-1]:
        raise ValueError(
            f"cannot orthogonalize {tuple(directions.shape)} directions against "
            f"{tuple(against.shape)}: layers and hidden size must match"
        )
    basis = orthonormal_basis(against.double())
    r = directions.double()
    coefficients = torch.einsum("lkh,lh->lk", basis, r)
    rest = r - torch.einsum("lk,lkh->lh", coefficients, basis)
    norms = rest.norm(dim=-1)
    lost = (norms < 1e-6 * r.norm(dim=-1).clamp_min(1e-12)).nonzero().flatten().tolist()
    if lost:
        raise ValueError(
            f"the refusal direction of layer(s) {lost} lies inside the span of the directions "
            "it is orthogonalized against: nothing would be left to edit"
        )
    return normalize(rest).to(directions.dtype)


def mean_abs_cosine(directions: torch.Tensor, others: torch.Tensor) -> float:
    """Mean |cos| between each layer's direction (n_layers, hidden) and its other directions
    (n_layers, k, hidden): how much an edit along `directions` would also touch `others`."""
    if others.dim() == 2:
        others = others.unsqueeze(1)
    cos = torch.einsum("lh,lkh->lk", normalize(directions.double()), normalize(others.double()))
    return float(cos.abs().mean())


def ensemble(probe: torch.Tensor, pca: torch.Tensor, probe_weight: float) -> torch.Tensor:
    """`normalize(a * probe + (1 - a) * pca)` per layer, after flipping pca to agree with probe.

    Eigenvector signs are arbitrary: without the alignment a flipped PCA direction would cancel
    the probe's instead of reinforcing it.
    """
    if probe.shape != pca.shape:
        raise ValueError(f"shape mismatch {tuple(probe.shape)} vs {tuple(pca.shape)}")
    if not 0.0 <= probe_weight <= 1.0:
        raise ValueError(f"probe_weight must be in [0, 1], got {probe_weight}")
    p = normalize(probe.double())
    q = align_signs(normalize(pca.double()), p)
    return normalize(probe_weight * p + (1.0 - probe_weight) * q).to(probe.dtype)


# --------------------------------------------------------------------------------------------
# Fitted readouts: what each module's edit reads, instead of the refusal direction itself
# --------------------------------------------------------------------------------------------


RIDGE_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
"""The relative ridge penalties `readout_ridge_cv` chooses from, per module."""


def fit_readouts(
    good: torch.Tensor, bad: torch.Tensor, directions: torch.Tensor, ridge: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per module, the readout v of the edit `h <- h - w r (v . h)` (see `abliteration.row_edit`),
    and the relative ridge penalty it was fitted with.

    The plain edit reads v = r: it removes a module's whole contribution along r. But harmless
    prompts' module outputs have a large component along r too (their mean along r is often as
    big as the harmful prompts'), and removing it is most of an edit's damage. The fitted v
    reads only the refusal-specific part: ridge regression on the module outputs at the last
    prompt token, with target 0 for the good prompts and `r . h - c` for the bad ones (c: the
    good prompts' mean along r), so the edit leaves harmless outputs (nearly) alone and moves
    harmful ones to where harmless ones sit along r. It stays a rank-1 linear edit of W
    (`W - w r (v^T W)`), so merging, adapters and GGUF export work unchanged.

    `good`/`bad` are (n, n_layers, n_components, hidden) module outputs, `directions` the
    (n_layers, hidden) refusal directions; `ridge` scales the penalty by the outputs' mean
    squared norm per dimension, so one value suits every layer. `ridge=None` chooses it per
    module from `RIDGE_GRID` by leave-one-out cross-validation (`cv_ridge_readout`): a
    readout that fits the direction prompts too closely reads noise on other prompts, and
    how much a module can take differs with depth. Solved in float64. Returns float32
    (n_layers, n_components, hidden) readouts and the (n_layers, n_components) ridges.
    """
    if good.dim() != 4 or bad.dim() != 4 or good.shape[1:] != bad.shape[1:]:
        raise ValueError(
            f"module outputs must be (n, layers, components, hidden) with equal shapes; got "
            f"{tuple(good.shape)} and {tuple(bad.shape)}"
        )
    n_layers, n_components, hidden = good.shape[1:]
    if tuple(directions.shape) != (n_layers, hidden):
        raise ValueError(
            f"directions {tuple(directions.shape)} do not match the module outputs "
            f"({n_layers} layers, hidden {hidden})"
        )
    if len(good) < 2 or len(bad) < 2:
        raise ValueError(
            f"fitting readouts needs at least 2 good and 2 bad prompts; got {len(good)} and "
            f"{len(bad)}"
        )
    if ridge is not None and ridge <= 0:
        raise ValueError(f"ridge must be positive, got {ridge}")
    readouts = torch.zeros(n_layers, n_components, hidden)
    ridges = torch.full((n_layers, n_components), float("nan") if ridge is None else ridge)
    for layer in range(n_layers):
        r = directions[layer].double()
        for component in range(n_components):
            g = good[:, layer, component].double()
            b = bad[:, layer, component].double()
            x = torch.cat([g, b])
            target = torch.cat([torch.zeros(len(g), dtype=x.dtype), b @ r - (g @ r).mean()])
            scale = float((x * x).sum()) / hidden
            if scale == 0.0:  # the module writes nothing here: nothing to read
                continue
            if ridge is None:
                v, ridges[layer, component] = cv_ridge_readout(x, target, scale)
            else:
                v = ridge_solution(x, target, ridge * scale)
            readouts[layer, component] = v.float()
    return readouts, ridges


def ridge_solution(x: torch.Tensor, target: torch.Tensor, penalty: float) -> torch.Tensor:
    """argmin_v |x v - target|^2 + penalty |v|^2, in the dual (n x n) when there are fewer
    rows than dimensions."""
    if len(x) < x.shape[1]:  # dual: v = X^T (X X^T + p I)^-1 t
        gram = x @ x.T + penalty * torch.eye(len(x), dtype=x.dtype)
        return x.T @ torch.linalg.solve(gram, target)
    gram = x.T @ x + penalty * torch.eye(x.shape[1], dtype=x.dtype)  # primal
    return torch.linalg.solve(gram, x.T @ target)


def cv_ridge_readout(
    x: torch.Tensor, target: torch.Tensor, scale: float
) -> tuple[torch.Tensor, float]:
    """The ridge solution whose relative penalty (x `scale`) from `RIDGE_GRID` has the lowest
    leave-one-out error, and that penalty.

    One thin SVD x = U S V^T serves every penalty p: the fit's hat matrix is
    U diag(s^2 / (s^2 + p)) U^T, and each row's leave-one-out residual is its residual over
    1 - its hat diagonal (exact for ridge regression), so no refit per fold is needed.
    """
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    projected = u.T @ target
    best: tuple[float, float] | None = None
    for ridge in RIDGE_GRID:
        shrink = s**2 / (s**2 + ridge * scale)
        residual = target - u @ (shrink * projected)
        leverage = (u**2 * shrink).sum(dim=1)
        error = float(((residual / (1 - leverage)) ** 2).mean())
        if not math.isfinite(error):  # a row the fit interpolates exactly: no estimate
            error = math.inf
        if best is None or error < best[0]:
            best = (error, ridge)
    assert best is not None
    ridge = best[1]
    return vh.T @ (s / (s**2 + ridge * scale) * projected), ridge
