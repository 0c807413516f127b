"""A trial's edit on the model's edit sites: as forward hooks, merged into the weights, undone.

`TrialEdit` is one trial's edit (strengths per component and layer, directions, fitted readouts,
row normalization), built once and given to every consumer: the hooks of the search, the merge
of the export, the in-place reset strategies, the adapter and the GGUF export all ask it for a
site's `RowEdit` and iterate the same `EditSite`s, so what is scored is what is saved.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from heretic.abliteration import (
    ROW_NORMALIZATIONS,
    RowEdit,
    check_directions,
    check_readouts,
    check_trial_directions,
    component_readout,
    project_out,
    row_edit,
)
from heretic.quantization import refuse_in_place
from heretic.sites import EditSite, WriterTensor


@dataclass(frozen=True)
class TrialEdit:
    """One trial's edit: `strengths` {component: (n_layers,)}, `directions` (n_layers, hidden),
    optional fitted `readouts` (n_layers, n_components, hidden) and a row normalization."""

    strengths: Mapping[str, torch.Tensor]
    directions: torch.Tensor
    readouts: torch.Tensor | None = None
    row_normalization: str = "none"

    def __post_init__(self) -> None:
        if self.row_normalization not in ROW_NORMALIZATIONS:
            raise ValueError(
                f"unknown row normalization {self.row_normalization!r} "
                f"(choose from {ROW_NORMALIZATIONS})"
            )
        if self.readouts is not None and self.row_normalization != "none":
            raise ValueError("fitted readouts replace row normalization: use one or the other")
        check_readouts(self.readouts, self.directions)

    def weight(self, site: EditSite) -> float:
        strengths = self.strengths.get(site.component)
        return 0.0 if strengths is None else float(strengths[site.layer])

    def mode(self, site: EditSite) -> str:
        """Row normalization needs one matrix's rows: blocks (experts) get the plain edit."""
        return self.row_normalization if site.is_linear else "none"

    def is_plain(self, site: EditSite) -> bool:
        """The projection `h - w u (u . h)`, which hooks apply in the model's own dtype."""
        return self.readouts is None and self.mode(site) == "none"

    def direction(self, site: EditSite) -> torch.Tensor:
        return site.direction(self.directions[site.layer].float())

    def row_edit(self, site: EditSite) -> RowEdit | None:
        """The site's edit as vectors over its output axis; None where its strength is 0."""
        weight = self.weight(site)
        if weight == 0.0:
            return None
        u = self.direction(site)
        readout = component_readout(self.readouts, site.layer, site.component)
        if readout is not None:
            return RowEdit(a=u, b=readout.float(), weight=weight)
        mode = self.mode(site)
        if mode == "none":
            return RowEdit(a=u, b=u, weight=weight)
        return row_edit(site.weights[0].value(), u, weight, mode)


def edited_tensor(edit: RowEdit, tensor: WriterTensor, value: torch.Tensor) -> torch.Tensor:
    """The edited value (float32) of one writer tensor, given its current `value`.

    A weight's output axis may be first (a linear layer, experts (E, out, in)) or last
    (experts (E, in, out)); a bias is edited like a module output, since the hook's
    `h - w a (b . h)` applies to the bias that h contains.
    """
    edit = edit.to(value.device)
    experts = tensor.expert_axis is not None
    if value.dim() == (2 if experts else 1):  # a bias: (out,) or (E, out)
        return edit.apply(value.float().movedim(tensor.out_axis, -1)).movedim(-1, tensor.out_axis)
    matrices = value if experts else value.unsqueeze(0)
    out_axis = tensor.out_axis - 1 if experts else tensor.out_axis
    edited = [edit.merged(m) if out_axis == 0 else edit.merged(m.T).T for m in matrices]
    return torch.stack(edited) if experts else edited[0]


def _device(module: nn.Module) -> torch.device:
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class EditHooks:
    """Forward hooks on every edit site that apply a trial's edit to the module's output; the
    weights are never touched.

    Install once; `set_strengths` switches the edit for a trial (with the trial's own
    directions when it has them, e.g. one global direction), `clear` resets it for free. The
    plain projection runs in the model's dtype; fitted readouts and row normalization run as
    `RowEdit`s in float32, computed per trial (two matrix-vector products per linear site for
    row normalization). Each site's vectors are placed on its device once per trial.
    """

    def __init__(
        self,
        sites: Sequence[EditSite],
        directions: torch.Tensor,
        row_normalization: str = "none",
        readouts: torch.Tensor | None = None,
    ):
        deepest = max((site.layer for site in sites), default=-1)
        if deepest >= directions.shape[0]:
            check_directions(directions, deepest + 1)
        self.sites = list(sites)
        self.directions = directions.float()
        self.readouts = None if readouts is None else readouts.float()
        self.row_normalization = row_normalization
        TrialEdit({}, self.directions, self.readouts, row_normalization)  # validates
        self.strengths: dict[str, torch.Tensor] = {}
        self.edit: TrialEdit | None = None
        self._active: dict[int, tuple[torch.Tensor, float] | RowEdit] = {}
        self._cast: dict[int, torch.Tensor] = {}
        self._handles = [
            site.module.register_forward_hook(self._make_hook(i))
            for i, site in enumerate(self.sites)
        ]

    def _make_hook(self, index: int):
        def hook(_module, _inputs, output):
            active = self._active.get(index)
            if active is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            edited = self._apply(index, active, h)
            return (edited, *output[1:]) if isinstance(output, tuple) else edited

        return hook

    def _apply(self, index: int, active, h: torch.Tensor) -> torch.Tensor:
        if isinstance(active, RowEdit):
            return active.apply(h)
        direction, weight = active
        cast = self._cast.get(index)
        if cast is None or cast.dtype != h.dtype or cast.device != h.device:
            cast = self._cast[index] = direction.to(device=h.device, dtype=h.dtype)
        return project_out(h, cast, weight)

    @torch.no_grad()
    def set_strengths(
        self, strengths: Mapping[str, torch.Tensor], directions: torch.Tensor | None = None
    ) -> None:
        """Switch the edit on: `strengths` per component and layer; `directions`
        (n_layers, hidden) for this trial only, or None for the directions given at install."""
        check_trial_directions(directions, self.directions)
        if self.readouts is not None and directions is not None:
            if not torch.equal(directions.float(), self.directions):
                raise ValueError(
                    "fitted readouts belong to the installed per-layer directions; this trial "
                    "has its own (direction_scope must be per_layer)"
                )
        self.strengths = {k: v.detach().float().cpu() for k, v in strengths.items()}
        source = self.directions if directions is None else directions.detach().float()
        self.edit = TrialEdit(self.strengths, source, self.readouts, self.row_normalization)
        self._active, self._cast = {}, {}
        for index, site in enumerate(self.sites):
            row = self.edit.row_edit(site)
            if row is None:
                continue
            device = _device(site.module)
            if self.edit.is_plain(site):
                self._active[index] = (row.a.to(device), row.weight)
            else:
                self._active[index] = row.to(device)

    def clear(self) -> None:
        self.strengths = {}
        self.edit = None
        self._active, self._cast = {}, {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()


@torch.no_grad()
def merge_edit(sites: Sequence[EditSite], edit: TrialEdit) -> dict[int, torch.Tensor]:
    """Merge the edit into the weights (float32 math, cast back); returns the originals.

    The returned {id(param): original tensor} lets `restore_weights` undo the merge exactly,
    which subtracting the edit back in bf16 would not. Quantized weights are refused: their
    stored values are codes, not the weights.
    """
    edited = [site for site in sites if edit.weight(site) != 0.0]
    refuse_in_place(
        sorted({f for site in edited for f in site.quantization}),
        "Merging into the loaded model",
        "export from the checkpoint instead (export_method = 'shards')",
    )
    originals: dict[int, torch.Tensor] = {}
    for site in sites:
        row = edit.row_edit(site)
        if row is None:
            continue
        for tensor in site.tensors():
            param = tensor.param
            originals.setdefault(id(param), param.detach().clone())
            param.copy_(edited_tensor(row, tensor, param.detach()).to(param.dtype))
    return originals


@torch.no_grad()
def restore_weights(sites: Sequence[EditSite], originals: Mapping[int, torch.Tensor]) -> None:
    """Copy back the originals saved by `merge_edit`."""
    for site in sites:
        for tensor in site.tensors():
            original = originals.get(id(tensor.param))
            if original is not None:
                tensor.param.copy_(original)
