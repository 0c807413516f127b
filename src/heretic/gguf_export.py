"""GGUF output: the input GGUF file with only the edited matrices replaced.

A user who brings a GGUF file lives in llama.cpp / Ollama, so the natural output is a GGUF file
they can drop in where the old one was. Converting the merged transformers model back to GGUF
would need llama.cpp's converter and would re-quantize every tensor; instead this copies the
input file key by key and tensor by tensor (byte-identical), and replaces only the matrices the
edit touches: each is dequantized, edited in float32 (`W - w r (r^T W)`, the same math as the
merge) and written as F16 or Q8_0.

llama.cpp stores every weight matrix as (out, in) rows (ggml's `mul_mat` wants the input axis
first in memory), and transformers' GGUF loader permutes only the q/k projections of llama-style
models, never `attn_output` / `ffn_down`, so the residual axis of the tensors edited here is the
same one the refusal directions live in (a test compares logits against the merged model).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from heretic.abliteration import RowEdit, component_readout, edited_weight
from heretic.atomic import atomic_file
from heretic.edit import TrialEdit
from heretic.errors import ExportError
from heretic.sites import EditSite

EditedType = Literal["auto", "f16", "q8_0"]

# llama.cpp's GGUF tensor names for the residual writers transformers names, by the end of the
# transformers parameter name (the layer index is the first group). MoE layers keep their experts
# fused in one 3-D tensor (`*_exps`), plus an optional shared expert (`*_shexp`).
_TENSOR_NAMES = (
    (
        r"layers\.(\d+)\.(?:self_attn|attention|attn)\.(?:o_proj|out_proj|dense)\.(weight|bias)$",
        "blk.{i}.attn_output.{kind}",
    ),
    (
        r"layers\.(\d+)\.(?:mlp|feed_forward)\.(?:down_proj|w2|fc2)\.(weight|bias)$",
        "blk.{i}.ffn_down.{kind}",
    ),
    (
        r"layers\.(\d+)\.(?:mlp|feed_forward|block_sparse_moe)\.experts\.down_proj()$",
        "blk.{i}.ffn_down_exps.weight",
    ),
    (
        r"layers\.(\d+)\.(?:mlp|feed_forward)\.shared_experts?\.down_proj\.(weight|bias)$",
        "blk.{i}.ffn_down_shexp.{kind}",
    ),
    (r"layers\.(\d+)\.(?:mamba|mixer)\.out_proj\.(weight|bias)$", "blk.{i}.ssm_out.{kind}"),
)


def gguf_tensor_name(name: str) -> str | None:
    """The GGUF name of a transformers writer tensor, or None when llama.cpp's naming for it is
    not known here."""
    for pattern, template in _TENSOR_NAMES:
        match = re.search(pattern, name)
        if match:
            return template.format(i=match.group(1), kind=match.group(2) or "weight")
    return None


@dataclass(frozen=True)
class TensorEdit:
    """Edit one GGUF tensor along the unit direction `direction` with strength `weight`
    (`row_normalization` as in `abliteration.row_edit`)."""

    direction: torch.Tensor
    weight: float
    row_normalization: str = "none"
    readout: torch.Tensor | None = None


@dataclass(frozen=True)
class GGUFExportReport:
    path: Path
    edited: dict[str, str]  # tensor name -> type it was written in
    copied: int  # tensors copied byte for byte


def plan_edits(
    tensor_names: set[str], sites: Sequence[EditSite], edit: TrialEdit
) -> dict[str, TensorEdit]:
    """Map the trial's edit of every site to the GGUF tensors it changes.

    Row normalization applies to the dense matrices only; expert tensors get the plain
    projection, as the search's hook on the whole expert block did. A site tensor the edit
    changes but the GGUF file does not hold under llama.cpp's name is an error: silently skipping
    it would ship a model that is not the one that was evaluated.
    """
    edits: dict[str, TensorEdit] = {}
    for site in sites:
        weight = edit.weight(site)
        if weight == 0.0:
            continue
        readout = component_readout(edit.readouts, site.layer, site.component)
        for tensor in site.tensors():
            name = gguf_tensor_name(tensor.name)
            if name is None or name not in tensor_names:
                expected = f" (expected {name})" if name else ""
                raise ExportError(
                    f"The GGUF file has no tensor for {tensor.name}{expected}, which the edit of "
                    f"{site.describe()} changes: this architecture's GGUF layout is not "
                    "supported; use --export model (safetensors) instead."
                )
            edits[name] = TensorEdit(edit.direction(site), weight, edit.mode(site), readout)
    return edits


def _edited_type(original, requested: EditedType, row_length: int):
    from gguf import GGMLQuantizationType as Q

    if requested == "f16":
        return Q.F16
    if requested == "q8_0":
        return Q.Q8_0 if row_length % 32 == 0 else Q.F16
    # auto: unquantized inputs keep their float type; quantized ones get Q8_0, which is close
    # to lossless and much smaller than F16 (F16 when rows are not whole Q8_0 blocks).
    if original in (Q.F32, Q.F16, Q.BF16):
        return original
    return Q.Q8_0 if row_length % 32 == 0 else Q.F16


def _edited_values(name: str, values: np.ndarray, edit: TensorEdit, hidden_size: int):
    if values.ndim == 1:
        return _edit_bias(name, values, edit, hidden_size)
    if values.shape[-2] != hidden_size:
        raise ExportError(
            f"GGUF tensor {name} has shape {tuple(values.shape)}, whose output axis is not "
            f"the hidden size {hidden_size}: cannot edit it; use --export model instead."
        )
    w = torch.from_numpy(values)
    if w.dim() == 2:
        edited = edited_weight(w, edit.direction, edit.weight, edit.row_normalization, edit.readout)
    else:  # fused experts (E, out, in)
        edited = torch.stack(
            [edited_weight(m, edit.direction, edit.weight, "none", edit.readout) for m in w]
        )
    return edited.numpy()


def _edit_bias(name: str, values: np.ndarray, edit: TensorEdit, hidden_size: int):
    """A writer's bias changes like a module output: `b - w a (v . b)`."""
    if values.shape[0] != hidden_size or edit.row_normalization != "none":
        raise ExportError(
            f"GGUF tensor {name} is a bias that this edit (row normalization "
            f"{edit.row_normalization!r}) cannot change exactly: use --export model instead."
        )
    read = edit.direction if edit.readout is None else edit.readout
    row = RowEdit(a=edit.direction.float(), b=read.float(), weight=edit.weight)
    return row.apply(torch.from_numpy(values)).numpy()


def _encoded(values: np.ndarray, original, requested: EditedType):
    """New float32 values in the type they are written in (vectors stay F32)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if values.ndim == 1:
        return values.astype(np.float32), Q.F32
    qtype = _edited_type(original, requested, values.shape[-1])
    if qtype == Q.F32:
        return values.astype(np.float32), qtype
    if qtype == Q.F16:
        return values.astype(np.float16), qtype
    return quantize(values.astype(np.float32), qtype), qtype


TensorChange = Callable[[str, np.ndarray], np.ndarray]
"""New float32 values of a tensor from its name and its dequantized float32 values."""


def write_edited_gguf(
    source: Path,
    destination: Path,
    edits: Mapping[str, TensorEdit],
    hidden_size: int,
    edited_type: EditedType = "auto",
) -> GGUFExportReport:
    """Copy `source` to `destination` with the tensors in `edits` edited, atomically."""
    changes = {
        name: partial(_edited_values, edit=edit, hidden_size=hidden_size)
        for name, edit in edits.items()
    }
    return rewrite_gguf(source, destination, changes, edited_type)


def rewrite_gguf(
    source: Path,
    destination: Path,
    changes: Mapping[str, TensorChange],
    edited_type: EditedType = "auto",
) -> GGUFExportReport:
    """Copy `source` to `destination` with each tensor in `changes` replaced, atomically.

    Metadata (every key, in order, with its original type) and every other tensor are copied
    unchanged; a changed tensor is dequantized, changed in float32 and written in the type
    `edited_type` picks. The file is written next to `destination` and renamed into place when
    complete, so a failure never leaves a half-written file under the final name.
    """
    import gguf
    from gguf.quants import dequantize

    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError) as e:
        raise ExportError(f"Cannot read GGUF file {source}: {e}") from e
    by_name = {t.name: t for t in reader.tensors}
    missing = sorted(set(changes) - set(by_name))
    if missing:
        raise ExportError(f"GGUF file {source} has no tensor(s) {', '.join(missing)} to edit.")

    replaced = {}
    for name, change in changes.items():
        tensor = by_name[name]
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        replaced[name] = _encoded(change(name, values), tensor.tensor_type, edited_type)
    arch_field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if arch_field is None:
        raise ExportError(f"GGUF file {source} has no general.architecture key.")

    with atomic_file(destination, "the GGUF file") as tmp:
        _write_copy(reader, replaced, arch_field.contents(), tmp)
    return GGUFExportReport(
        path=destination,
        edited={name: qtype.name for name, (_, qtype) in replaced.items()},
        copied=len(reader.tensors) - len(replaced),
    )


def _write_copy(
    reader: Any, replaced: Mapping[str, tuple[np.ndarray, Any]], arch: str, path: Path
) -> None:
    """Write `reader`'s metadata and tensors to `path`, with the tensors in `replaced` swapped
    for their edited data and type."""
    import gguf

    writer = gguf.GGUFWriter(path, arch, endianess=reader.endianess)
    for field in reader.fields.values():
        # GGUF.* are the header's virtual fields; the writer adds the architecture itself.
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.data_alignment = int(field.contents())
    for tensor in reader.tensors:
        if tensor.name in replaced:
            data, qtype = replaced[tensor.name]
            writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes, qtype)
        else:
            writer.add_tensor_info(
                tensor.name,
                tensor.data.shape,
                tensor.data.dtype,
                tensor.data.nbytes,
                tensor.tensor_type,
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        if tensor.name in replaced:
            writer.write_tensor_data(replaced[tensor.name][0])
        else:
            writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()


def output_name(source: Path) -> str:
    """`model.Q4_1.gguf` -> `model-heretic.Q4_1.gguf` (the quantization tag stays last, where
    llama.cpp users and Ollama Modelfiles expect it)."""
    stem = source.name[: -len(".gguf")] if source.name.lower().endswith(".gguf") else source.name
    head, dot, tag = stem.rpartition(".")
    if dot and tag and tag[0].upper() in "QFBI" and any(c.isdigit() for c in tag):
        return f"{head}-heretic.{tag}.gguf"
    return f"{stem}-heretic.gguf"
