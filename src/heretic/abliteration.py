"""Edits: search parameters -> per-layer strengths -> the rank-1 edit, as a hook or merged.

The edit of a matrix W (out x in) that writes into the residual stream, along the unit refusal
direction r with strength w, is

    W' = W - w * r (r^T W)

With w = 1 it removes r from everything the module writes; 0 < w < 1 removes part of it; w > 1
pushes the output past zero along r. (The design document's `w * (I - r r^T) W` would scale all of
W by w: wrong.) During the search the same edit runs as a forward hook on the module's output,
`h <- h - w r (r . h)`, which leaves W untouched, so resetting a trial means setting the strengths
to zero. The chosen edit is merged into W in float32 and cast back to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from heretic.model import COMPONENTS


def project_out(h: torch.Tensor, r: torch.Tensor, weight: float) -> torch.Tensor:
    """`h - weight * r (r . h)` along the last axis; r is a unit vector."""
    r = r.to(h.dtype)
    return h - weight * (h @ r).unsqueeze(-1) * r


def edited_weight(w_matrix: torch.Tensor, r: torch.Tensor, weight: float) -> torch.Tensor:
    """`W - weight * r (r^T W)` in float32, for W of shape (out, in) and unit r of shape (out,)."""
    w32 = w_matrix.float()
    r32 = r.float().to(w32.device)
    return w32 - weight * torch.outer(r32, r32 @ w32)


@dataclass(frozen=True)
class ComponentParams:
    """The design's per-component search parameters: an edited layer range and a strength.

    `layer_min`/`layer_max` are fractions of depth (0 = first layer, 1 = last).
    """

    layer_min: float
    layer_max: float
    weight: float


def layer_strengths(params: ComponentParams, n_layers: int) -> torch.Tensor:
    """Strength per layer (float32, n_layers): `weight` inside [layer_min, layer_max], else 0."""
    lo, hi = sorted((params.layer_min, params.layer_max))
    positions = torch.arange(n_layers, dtype=torch.float64) / max(n_layers - 1, 1)
    inside = (positions >= lo - 1e-9) & (positions <= hi + 1e-9)
    return torch.where(inside, params.weight, 0.0).float()


def strengths_from_params(
    params: Mapping[str, ComponentParams], n_layers: int
) -> dict[str, torch.Tensor]:
    return {component: layer_strengths(params[component], n_layers) for component in COMPONENTS}


def first_edited_layer(strengths: Mapping[str, torch.Tensor]) -> int:
    """The lowest layer with a nonzero strength in any component (the layer count when none
    has one): everything below it computes exactly what the original model computes."""
    n_layers = max((len(v) for v in strengths.values()), default=0)
    edited = [int(torch.nonzero(v).min()) for v in strengths.values() if bool((v != 0).any())]
    return min(edited, default=n_layers)


class EditHooks:
    """Forward hooks that apply the edit to module outputs; W is never touched.

    Install once; `set_strengths` switches the edit for a trial, `clear` resets it for free.
    """

    def __init__(self, modules: list[dict[str, list[nn.Module]]], directions: torch.Tensor):
        if directions.shape[0] != len(modules):
            raise ValueError(
                f"{directions.shape[0]} directions for {len(modules)} layers: they must match"
            )
        self.modules = modules
        self.directions = directions.float()
        self._per_device: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.strengths: dict[str, torch.Tensor] = {}
        self._handles = []
        for layer_index, components in enumerate(modules):
            for component, module_list in components.items():
                for module in module_list:
                    hook = self._make_hook(layer_index, component)
                    self._handles.append(module.register_forward_hook(hook))

    def _direction(self, layer_index: int, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._per_device:
            self._per_device[key] = self.directions.to(device=like.device, dtype=like.dtype)
        return self._per_device[key][layer_index]

    def _make_hook(self, layer_index: int, component: str):
        def hook(_module, _inputs, output):
            strengths = self.strengths.get(component)
            if strengths is None:
                return None
            weight = float(strengths[layer_index])
            if weight == 0.0:
                return None
            if isinstance(output, tuple):
                h = output[0]
                return (project_out(h, self._direction(layer_index, h), weight), *output[1:])
            return project_out(output, self._direction(layer_index, output), weight)

        return hook

    def set_strengths(self, strengths: Mapping[str, torch.Tensor]) -> None:
        self.strengths = {k: v.detach().float().cpu() for k, v in strengths.items()}

    def clear(self) -> None:
        self.strengths = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.strengths = {}


def _writer_matrices(module: nn.Module) -> list[tuple[nn.Parameter, bool]]:
    """The weight tensors whose outputs the hook on `module` edits, with a flag for 3-D
    fused-expert tensors (E, out, in) or (E, in, out)."""
    if isinstance(module, nn.Linear):
        return [(module.weight, False)]
    # An MoE block: every expert's down-projection, plus a shared expert if there is one.
    found: list[tuple[nn.Parameter, bool]] = []
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if "gate" in parent.split(".")[-1:] or leaf.startswith("gate"):
            continue
        if "down_proj" in name or leaf in ("w2",):
            found.append((param, param.dim() == 3))
    if not found:
        raise ValueError(f"no down-projection weights found in {type(module).__name__}")
    return found


@torch.no_grad()
def merge_edit(
    modules: list[dict[str, list[nn.Module]]],
    directions: torch.Tensor,
    strengths: Mapping[str, torch.Tensor],
    hidden_size: int,
) -> dict[int, torch.Tensor]:
    """Merge the edit into the weights (float32 math, cast back); returns the originals.

    The returned {id(param): original tensor} lets `restore_weights` undo the merge exactly,
    which subtracting the edit back in bf16 would not.
    """
    originals: dict[int, torch.Tensor] = {}
    for layer_index, components in enumerate(modules):
        r = directions[layer_index]
        for component, module_list in components.items():
            weight = float(strengths[component][layer_index])
            if weight == 0.0:
                continue
            for module in module_list:
                for param, fused in _writer_matrices(module):
                    originals.setdefault(id(param), param.detach().clone())
                    param.copy_(_edit_tensor(param, r, weight, fused, hidden_size))
    return originals


def _edit_tensor(
    param: torch.Tensor, r: torch.Tensor, weight: float, fused: bool, hidden_size: int
) -> torch.Tensor:
    if not fused:
        return edited_weight(param, r, weight).to(param.dtype)
    # Fused experts: find which axis is the residual (output) axis.
    if param.shape[1] == hidden_size:  # (E, out=hidden, in)
        edited = torch.stack([edited_weight(p, r, weight) for p in param])
    elif param.shape[2] == hidden_size:  # (E, in, out=hidden): the transpose convention
        edited = torch.stack([edited_weight(p.T, r, weight).T for p in param])
    else:
        raise ValueError(f"fused expert tensor {tuple(param.shape)} has no axis of {hidden_size}")
    return edited.to(param.dtype)


@torch.no_grad()
def restore_weights(modules: list[dict[str, list[nn.Module]]], originals: dict[int, torch.Tensor]):
    """Copy back the originals saved by `merge_edit`."""
    for components in modules:
        for module_list in components.values():
            for module in module_list:
                for param, _ in _writer_matrices(module):
                    original = originals.get(id(param))
                    if original is not None:
                        param.copy_(original)
