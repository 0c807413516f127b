"""Glue from a trial's edit (`TrialEdit` on the model's `EditSite`s) to `shard_export`'s
`{checkpoint tensor name: edit}` mapping.

Every tensor `merge_edit` would change becomes a callable that applies the same float32 edit
(`edit.edited_tensor` with the site's `RowEdit`) to the tensor as stored in the checkpoint.
Where the `RowEdit` depends on the weights (row normalization of a linear site), it is computed
from the stored weight, read from the checkpoint: the edit lands on the checkpoint's own
weights, whatever dtype or quantization the search loaded them in.

Model parameter names and checkpoint names can differ: identical names, a plain prefix
difference (a checkpoint saved without or with an extra wrapper prefix) and fused expert tensors
stored per expert (`experts.down_proj` (E, out, in) <- `experts.N.down_proj.weight`) are mapped;
anything else is `ShardExportUnsupported`, naming the tensor, so the caller saves the loaded
model instead and no edited tensor is ever left out silently.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from heretic.abliteration import RowEdit
from heretic.edit import TrialEdit, edited_tensor
from heretic.shard_export import (
    EDITABLE_DTYPES,
    Checkpoint,
    ShardExportUnsupported,
    TensorEdit,
    check_edits,
    local_checkpoint_folder,
    read_checkpoint,
)
from heretic.sites import EditSite, WriterTensor
from heretic.stored_weights import StoredWeights, quantized_edits


@dataclass(eq=False)
class SiteRow:
    """A site's `RowEdit`, computed once: up front when it does not depend on the weights,
    else from the stored weight (given, or read with `load_weight`) on first use."""

    site: EditSite
    edit: TrialEdit
    load_weight: Callable[[], torch.Tensor] | None = None
    _row: RowEdit | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.needs_weight:
            self._row = self.edit.row_edit(self.site)

    @property
    def needs_weight(self) -> bool:
        return self.edit.readouts is None and self.edit.mode(self.site) != "none"

    def get(self, stored_weight: torch.Tensor | None = None) -> RowEdit:
        if self._row is None:
            if stored_weight is None:
                if self.load_weight is None:
                    raise ShardExportUnsupported(f"No stored weight for {self.site.describe()}.")
                stored_weight = self.load_weight()
            first = replace(self.site.weights[0], param=stored_weight)
            self._row = self.edit.row_edit(replace(self.site, weights=[first]))
        if self._row is None:
            raise ShardExportUnsupported(f"{self.site.describe()} has no edit (strength 0).")
        return self._row


@dataclass(eq=False)
class StoredTensorEdit:
    """The edit of one checkpoint tensor: `tensor` says its output (and expert) axis."""

    row: SiteRow
    tensor: WriterTensor
    is_row_weight: bool = False

    def __call__(self, stored: torch.Tensor) -> torch.Tensor:
        row = self.row.get(stored if self.is_row_weight else None).to(stored.device)
        if stored.dim() == 2 and self.tensor.expert_axis is None and self.tensor.out_axis == 0:
            return edited_in_place(stored.to(torch.float32, copy=True), row)
        return edited_tensor(row, self.tensor, stored).float()


def edited_in_place(w32: torch.Tensor, edit: RowEdit, block_bytes: int = 1 << 22) -> torch.Tensor:
    """`edit.merged(W)` computed over blocks of rows, in place in W's float32 copy: each row of
    the result is elementwise in its own row (after `b^T W`, taken first), so the values are
    bit for bit `merged`'s while the memory is one float32 copy instead of four."""
    v = edit.b @ w32
    rows = max(1, block_bytes // (4 * max(1, w32.shape[1])))
    for start in range(0, w32.shape[0], rows):
        part = slice(start, start + rows)
        block = w32[part] - edit.weight * torch.outer(edit.a[part], v)
        if edit.scale is not None:
            block = block * edit.scale[part].unsqueeze(1)
        w32[part] = block
    return w32


def checkpoint_edits(
    sites: Sequence[EditSite],
    edit: TrialEdit,
    checkpoint_shapes: Mapping[str, tuple[int, ...]],
    load: Callable[[str], torch.Tensor] | None = None,
) -> dict[str, TensorEdit]:
    """{checkpoint tensor name: edit} for every tensor `merge_edit(sites, edit)` changes;
    `load(name)` reads a stored tensor (a row-normalized site's weight, for its bias)."""
    result: dict[str, TensorEdit] = {}
    for site in sites:
        if edit.weight(site) == 0.0:
            continue
        row = SiteRow(site, edit)
        for tensor in site.tensors():
            names = _checkpoint_names(tensor, checkpoint_shapes)
            if any(name in result for name in names):
                raise ShardExportUnsupported(f"{tensor.name} is edited twice (a shared tensor).")
            if tensor is site.weights[0] and row.needs_weight and load is not None:
                row.load_weight = _loader(load, names[0])
            if len(names) == 1:
                result[names[0]] = StoredTensorEdit(row, tensor, tensor is site.weights[0])
            else:  # per-expert (out, in) matrices of a fused (E, ...) tensor
                single = WriterTensor(tensor.name, tensor.param, out_axis=0)
                result.update(dict.fromkeys(names, StoredTensorEdit(row, single)))
    return result


def _loader(load: Callable[[str], torch.Tensor], name: str) -> Callable[[], torch.Tensor]:
    return lambda: load(name)


def _checkpoint_names(tensor: WriterTensor, checkpoint: Mapping[str, tuple[int, ...]]) -> list[str]:
    direct = _same_tensor(tensor.name, checkpoint)
    if direct is not None:
        return [direct]
    experts = None
    if tensor.expert_axis == 0 and tensor.param.dim() == 3:
        out_size = tensor.param.shape[tensor.out_axis]
        experts = _per_expert_tensors(tensor.name, checkpoint, tensor.param.shape[0], out_size)
    if experts is None:
        raise ShardExportUnsupported(
            f"Parameter {tensor.name} has no counterpart in the checkpoint (transformers renames "
            "or fuses it on load), so the shard export cannot edit it."
        )
    return experts


def _prefix_related(a: str, b: str) -> bool:
    """Equal, or equal up to a leading prefix on either side."""
    return a == b or a.endswith("." + b) or b.endswith("." + a)


def _same_tensor(name: str, checkpoint: Mapping[str, object]) -> str | None:
    """The checkpoint tensor with this name, or the one name that differs from it by a
    leading prefix only."""
    if name in checkpoint:
        return name
    candidates = [c for c in checkpoint if _prefix_related(c, name)]
    return candidates[0] if len(candidates) == 1 else None


def _per_expert_tensors(
    name: str, checkpoint: Mapping[str, tuple[int, ...]], n_experts: int, out_size: int
) -> list[str] | None:
    """`X.experts.LEAF` fused on load from `X.experts.0.LEAF.weight` .. `X.experts.{E-1}...`
    (nn.Linear-layout (out, in) matrices), allowing a prefix difference on X."""
    match = re.fullmatch(r"(.*\.experts)\.(\w+)", name)
    if match is None:
        return None
    stem, leaf = match.groups()
    pattern = re.compile(r"(.*\.experts)\.(\d+)\." + re.escape(leaf) + r"\.weight")
    found: dict[int, list[str]] = {}
    for key in checkpoint:
        m = pattern.fullmatch(key)
        if m is not None and _prefix_related(m.group(1), stem):
            found.setdefault(int(m.group(2)), []).append(key)
    if sorted(found) != list(range(n_experts)) or any(len(k) != 1 for k in found.values()):
        return None
    keys = [found[e][0] for e in range(n_experts)]
    if any(len(checkpoint[k]) != 2 or checkpoint[k][0] != out_size for k in keys):
        return None
    return keys


def plan_shard_export(
    source_path: str, sites: Sequence[EditSite], edit: TrialEdit
) -> tuple[Checkpoint, dict[str, TensorEdit]]:
    """The source checkpoint and the checkpoint-keyed edits of a trial, checked before anything
    is written: `ShardExportUnsupported` means "save the loaded model instead", any other
    `ExportError` a broken source checkpoint."""
    checkpoint = read_checkpoint(local_checkpoint_folder(source_path))
    weights = StoredWeights.of(checkpoint)
    shapes = {name: entry.shape for name, entry in checkpoint.entries().items()}
    edits = quantized_edits(checkpoint_edits(sites, edit, shapes, weights.read), weights)
    check_edits(checkpoint, edits)
    return checkpoint, edits


def stored_sites(
    source_path: str, sites: Sequence[EditSite], edit: TrialEdit
) -> Iterator[EditSite]:
    """The sites the edit changes, each with its tensors read from the source checkpoint as
    floats (FP8 dequantized), one site at a time when iterated: what the adapter export of a
    model searched in 4/8 bits reads, so that the adapter fits the full-precision weights it
    will be applied to. Every tensor is located (and its format checked) up front:
    `ShardExportUnsupported` where one has no usable counterpart in the checkpoint."""
    checkpoint = read_checkpoint(local_checkpoint_folder(source_path))
    weights = StoredWeights.of(checkpoint)
    shapes = {name: entry.shape for name, entry in checkpoint.entries().items()}
    plan = []
    for site in sites:
        if edit.weight(site) != 0.0:
            names = [_single_name(t, shapes) for t in site.tensors()]
            for name in names:
                if weights.dtype(name) not in EDITABLE_DTYPES:
                    weights.fp8_scale(name)
            plan.append((site, names))
    return (_with_stored(site, names, weights) for site, names in plan)


def _with_stored(site: EditSite, names: list[str], weights: StoredWeights) -> EditSite:
    stored = [
        replace(t, param=weights.read(name), owner=None)
        for t, name in zip(site.tensors(), names, strict=True)
    ]
    n = len(site.weights)
    return replace(site, weights=stored[:n], biases=stored[n:])


def _single_name(tensor: WriterTensor, checkpoint: Mapping[str, tuple[int, ...]]) -> str:
    names = _checkpoint_names(tensor, checkpoint)
    if len(names) != 1:
        raise ShardExportUnsupported(
            f"{tensor.name} is stored as separate experts, which an adapter cannot target."
        )
    return names[0]
