"""Edits: search parameters -> per-layer strengths -> the rank-1 edit, as a hook or merged.

The edit of a matrix W (out x in) that writes into the residual stream, along the unit refusal
direction r with strength w, is

    W' = W - w * r (r^T W)

With w = 1 it removes r from everything the module writes; 0 < w < 1 removes part of it; w > 1
pushes the output past zero along r. (The design document's `w * (I - r r^T) W` would scale all of
W by w: wrong.) During the search the same edit runs as a forward hook on the module's output,
`h <- h - w r (r . h)`, which leaves W untouched, so resetting a trial means setting the strengths
to zero. The chosen edit is merged into W in float32 and cast back to the model's dtype.

A trial's parameters (`EditParams`) give each component a strength profile over depth (a layer
range with one weight, or a tent: peak, floor, width) and say which direction to remove: each
layer's own `directions[l]`, or one global direction interpolated at a fractional layer index.
`edit_from_params` turns them into the per-layer strengths and the per-layer direction matrix
that the hooks, `merge_edit` and the exports all take, so what is scored is what is saved.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from heretic.sites import COMPONENTS

ROW_NORMALIZATIONS = ("none", "pre", "full")


def project_out(h: torch.Tensor, r: torch.Tensor, weight: float) -> torch.Tensor:
    """`h - weight * r (r . h)` along the last axis; r is a unit vector."""
    r = r.to(h.dtype)
    return h - weight * (h @ r).unsqueeze(-1) * r


@dataclass(frozen=True)
class RowEdit:
    """The edit of one matrix W (out x in) as vectors over its output axis:

        W' = diag(scale) (W - weight * a (b^T W))

    so a module output h = W x becomes `scale * (h - weight * a (b . h))`, which the hooks
    apply without touching W. `scale` None means all ones.
    """

    a: torch.Tensor
    b: torch.Tensor
    weight: float
    scale: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> RowEdit:
        return RowEdit(
            a=self.a.to(device),
            b=self.b.to(device),
            weight=self.weight,
            scale=None if self.scale is None else self.scale.to(device),
        )

    def apply(self, h: torch.Tensor) -> torch.Tensor:
        """The edited output for module outputs `h` (..., out), in float32, cast back."""
        h32 = h.float()
        edited = h32 - self.weight * (h32 @ self.b).unsqueeze(-1) * self.a
        if self.scale is not None:
            edited = edited * self.scale
        return edited.to(h.dtype)

    def merged(self, w_matrix: torch.Tensor) -> torch.Tensor:
        """W' in float32."""
        w32 = w_matrix.float()
        edited = w32 - self.weight * torch.outer(self.a, self.b @ w32)
        if self.scale is not None:
            edited = edited * self.scale.unsqueeze(1)
        return edited


def row_edit(
    w_matrix: torch.Tensor,
    r: torch.Tensor,
    weight: float,
    mode: str = "none",
    readout: torch.Tensor | None = None,
) -> RowEdit:
    """The edit of W along the unit direction r, with or without row normalization.

    With a fitted `readout` v (`directions.fit_readouts`) the edit is `W - weight r (v^T W)`:
    it reads v and writes along r, so it removes only the refusal-specific part of what the
    module writes along r. A readout takes the place of row normalization (mode must be
    "none").

    - "none": `W - weight r (r^T W)`, the plain projection.
    - "pre": the projection is taken of the row-normalized matrix Wn = W / n (n: each output
      row's norm) and scaled back: `W - weight (n * r)(r^T Wn)`. Rows with large norms are not
      pulled harder toward r than small ones.
    - "full": as "pre", then every row of the edited normalized matrix is normalized again
      and given back its original norm, so the edit changes the rows' directions only. (The
      "norm-preserving biprojected" abliteration; upstream Heretic approximates it with a
      rank-3 LoRA, here it is exact.)

    All three are `RowEdit` vectors, so a hook computes exactly what the merged matrix does.
    For "full", the new norm of row i of `Wn - weight r u` (u = r^T Wn) is
    `sqrt(|Wn_i|^2 - 2 weight r_i (Wn_i . u) + weight^2 r_i^2 |u|^2)`, from two products with
    W, so W' itself is never formed. A zero row stays zero in every mode.
    """
    if mode not in ROW_NORMALIZATIONS:
        raise ValueError(f"unknown row normalization {mode!r} (choose from {ROW_NORMALIZATIONS})")
    w32 = w_matrix.float()
    r32 = r.float().to(w32.device)
    if readout is not None:
        if mode != "none":
            raise ValueError(f"a fitted readout replaces row normalization; got mode {mode!r}")
        return RowEdit(a=r32, b=readout.float().to(w32.device), weight=weight)
    if mode == "none":
        return RowEdit(a=r32, b=r32, weight=weight)
    norms = w32.norm(dim=1)
    safe = norms.clamp_min(1e-12)
    b = r32 / safe
    a = r32 * norms
    if mode == "pre":
        return RowEdit(a=a, b=b, weight=weight)
    u = b @ w32  # r^T Wn, (in,)
    unit = norms / safe  # |Wn_i|: 1, or 0 for a zero row
    row_dot_u = (w32 @ u) / safe  # Wn_i . u
    new_sq = unit**2 - 2 * weight * r32 * row_dot_u + (weight * r32) ** 2 * (u @ u)
    scale = 1.0 / new_sq.clamp_min(0.0).sqrt().clamp_min(1e-12)
    return RowEdit(a=a, b=b, weight=weight, scale=scale)


def edited_weight(
    w_matrix: torch.Tensor,
    r: torch.Tensor,
    weight: float,
    mode: str = "none",
    readout: torch.Tensor | None = None,
) -> torch.Tensor:
    """W' in float32 for W of shape (out, in) and unit r of shape (out,); see `row_edit`."""
    return row_edit(w_matrix, r, weight, mode, readout).merged(w_matrix)


def check_readouts(readouts: torch.Tensor | None, directions: torch.Tensor) -> None:
    """Fitted readouts are one vector per layer and component, of the directions' size."""
    if readouts is None:
        return
    expected = (directions.shape[0], len(COMPONENTS), directions.shape[1])
    if tuple(readouts.shape) != expected:
        raise ValueError(f"readouts {tuple(readouts.shape)} do not match the expected {expected}")


def component_readout(
    readouts: torch.Tensor | None, layer: int, component: str
) -> torch.Tensor | None:
    return None if readouts is None else readouts[layer, COMPONENTS.index(component)]


@dataclass(frozen=True)
class ComponentParams:
    """The design's per-component search parameters: an edited layer range and a strength.

    `layer_min`/`layer_max` are fractions of depth (0 = first layer, 1 = last).
    """

    layer_min: float
    layer_max: float
    weight: float


@dataclass(frozen=True)
class TentParams:
    """A tent-shaped strength profile over depth (the profile upstream Heretic searches).

    The strength is `peak_weight` at `peak_position`, falls linearly with the distance from it
    to `floor_weight` at `width` away, and is 0 beyond. Positions and width are fractions of
    depth (0 = first layer, 1 = last), so one profile means the same thing for a 24-layer and a
    40-layer model of a family (warm starts rely on that).
    """

    peak_weight: float
    peak_position: float
    floor_weight: float
    width: float


LayerProfile = ComponentParams | TentParams


@dataclass(frozen=True)
class EditParams:
    """Everything one trial's edit is made of: a strength profile per component, and which
    refusal direction it removes.

    `direction_index` None means every layer removes its own direction (`directions[l]`); a
    number is a fractional layer index (in layers, 0 .. n_layers - 1): one global direction,
    interpolated between the two nearest layers' directions, removed at every edited layer.
    """

    components: Mapping[str, LayerProfile]
    direction_index: float | None = None


def _positions(n_layers: int) -> torch.Tensor:
    return torch.arange(n_layers, dtype=torch.float64) / max(n_layers - 1, 1)


def layer_strengths(params: LayerProfile, n_layers: int) -> torch.Tensor:
    """Strength per layer (float32, n_layers) of one component's profile.

    Range: `weight` inside [layer_min, layer_max], else 0. Tent: see `TentParams`; a layer
    exactly `width` away still gets `floor_weight`, a zero width edits only a layer exactly at
    the peak.
    """
    positions = _positions(n_layers)
    if isinstance(params, TentParams):
        distance = (positions - params.peak_position).abs()
        width = max(params.width, 0.0)
        fraction = distance / width if width > 0 else torch.where(distance > 1e-9, 2.0, 0.0)
        strength = params.peak_weight + fraction * (params.floor_weight - params.peak_weight)
        return torch.where(distance <= width + 1e-9, strength, 0.0).float()
    lo, hi = sorted((params.layer_min, params.layer_max))
    inside = (positions >= lo - 1e-9) & (positions <= hi + 1e-9)
    return torch.where(inside, params.weight, 0.0).float()


def _components(params: EditParams | Mapping[str, LayerProfile]) -> Mapping[str, LayerProfile]:
    return params.components if isinstance(params, EditParams) else params


def strengths_from_params(
    params: EditParams | Mapping[str, LayerProfile], n_layers: int
) -> dict[str, torch.Tensor]:
    components = _components(params)
    return {component: layer_strengths(components[component], n_layers) for component in COMPONENTS}


def interpolated_direction(directions: torch.Tensor, index: float) -> torch.Tensor:
    """The unit direction at a fractional layer index: the two nearest layers' directions,
    linearly interpolated, normalized again.

    An integer index gives that layer's direction exactly; halfway gives the normalized mean.
    Indices outside [0, n_layers - 1] are an error rather than silently clamped, since they
    mean the trial was made for a deeper model.
    """
    n_layers = directions.shape[0]
    if not 0.0 <= index <= n_layers - 1:
        raise ValueError(f"direction index {index} is outside 0..{n_layers - 1}")
    lower = min(int(index), n_layers - 1)
    upper = min(lower + 1, n_layers - 1)
    t = index - lower
    mixed = torch.lerp(directions[lower].double(), directions[upper].double(), t)
    return (mixed / mixed.norm().clamp_min(1e-12)).float()


def directions_for(params: EditParams, directions: torch.Tensor) -> torch.Tensor:
    """The (n_layers, hidden) directions the trial's edit removes: the per-layer directions
    themselves, or its global direction repeated at every layer."""
    if params.direction_index is None:
        return directions.float()
    r = interpolated_direction(directions, params.direction_index)
    return r.unsqueeze(0).expand(directions.shape[0], -1).contiguous()


def edit_from_params(
    params: EditParams, directions: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(per-component strengths, per-layer directions) of a trial, ready for the edit hooks,
    `merge_edit` and the exports."""
    n_layers = directions.shape[0]
    return strengths_from_params(params, n_layers), directions_for(params, directions)


def describe_params(params: EditParams, short: bool = False) -> str:
    """One line for tables and menus: each component's profile, then the direction."""
    parts = []
    for component, p in params.components.items():
        name = component.split(".")[0] if short else component
        if isinstance(p, TentParams):
            parts.append(
                f"{name}: peak {p.peak_weight:.2f} @ {p.peak_position:.2f}, floor "
                f"{p.floor_weight:.2f} over {p.width:.2f}"
            )
        else:
            parts.append(f"{name}: layers {p.layer_min:.2f}-{p.layer_max:.2f} w {p.weight:.2f}")
    if params.direction_index is None:
        parts.append("direction: per layer")
    else:
        parts.append(f"direction: layer {params.direction_index:.2f}")
    return "  ".join(parts)


def params_record(params: EditParams) -> dict[str, dict[str, float]]:
    """Per component, the profile's fields (JSON-ready, for the metadata and the card)."""
    return {c: dict(vars(p)) for c, p in params.components.items()}


def first_edited_layer(strengths: Mapping[str, torch.Tensor]) -> int:
    """The lowest layer with a nonzero strength in any component (the layer count when none
    has one): everything below it computes exactly what the original model computes."""
    n_layers = max((len(v) for v in strengths.values()), default=0)
    edited = [int(torch.nonzero(v).min()) for v in strengths.values() if bool((v != 0).any())]
    return min(edited, default=n_layers)


def check_directions(directions: torch.Tensor, n_layers: int) -> None:
    """An edit needs one direction per layer it can touch."""
    if directions.shape[0] != n_layers:
        raise ValueError(f"{directions.shape[0]} directions for {n_layers} layers: they must match")


def check_trial_directions(directions: torch.Tensor | None, installed: torch.Tensor) -> None:
    """A trial's own directions (None: the installed ones) must have the installed shape."""
    if directions is not None and directions.shape != installed.shape:
        raise ValueError(
            f"trial directions {tuple(directions.shape)} do not match the installed "
            f"{tuple(installed.shape)}"
        )
