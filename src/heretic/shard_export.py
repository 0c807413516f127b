"""Shard-by-shard export: the source safetensors checkpoint, rewritten one shard at a time with
only the edited tensors changed.

Saving a merged model with `save_pretrained` needs the whole model in memory, in the dtype it
was loaded in. Here the source checkpoint is read lazily instead: every output shard starts as a
verbatim copy of the source shard's header, unchanged tensors are copied as byte ranges (through
a small buffer), and only the tensors named in `edits` are read (`safetensors.safe_open`),
edited and cast back to their stored dtype. Peak memory is the edited tensor in flight, not the
model, and however the model was loaded for the search (quantized, offloaded), the edit lands
in the checkpoint's own full-precision weights.

This module knows nothing about directions: an edit is a plain
`{checkpoint tensor name: Callable[[stored tensor], edited float32 tensor]}` mapping
(`shard_edits.py` builds it from a trial). Every written shard is checked (header, shapes,
dtypes, finite values) before the output folder is renamed into place.

Quantized checkpoints (FP8 with block scales): an edit with an `output_dtype` ("BF16") writes
its tensor in that dtype instead of the stored one, and `DROP` leaves a tensor out (its scales,
which no longer apply). A shard with such changes gets a new header; the module of every
tensor written out of its stored 8-bit float dtype is listed in config.json's
`quantization_config.modules_to_not_convert`, so transformers loads it as a plain layer.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from heretic.atomic import staged_folder
from heretic.errors import ExportError

TensorEdit = Callable[[torch.Tensor], torch.Tensor]


class _Drop:
    """The edit that leaves a tensor out of the output."""

    def __call__(self, stored: torch.Tensor) -> torch.Tensor:
        raise ExportError("A dropped tensor is never written.")

    def __repr__(self) -> str:
        return "DROP"


DROP = _Drop()

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CHUNK_BYTES = 4 * 1024 * 1024  # one buffer, reused for every copy and check
IN_MEMORY_HINT = 'set export_method = "in_memory" to save with save_pretrained instead'

# Stored dtypes an edit may be written back into, and those whose values can be checked for
# NaN/inf (the 8-bit floats are converted chunk by chunk); other dtypes are copied unchecked.
EDITABLE_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
FLOAT_DTYPES = {**EDITABLE_DTYPES, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
ITEM_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "BOOL": 1}
ITEM_SIZES |= {f"{kind}{bits}": bits // 8 for kind in "IU" for bits in (8, 16, 32, 64)}

# Files that hold the weights again in another format: copied unedited, a loader that prefers
# them would serve the original model, so they are left out (and listed).
OTHER_WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


class ShardExportUnsupported(ExportError):
    """The source is fine but shard export cannot handle it (no safetensors checkpoint, a
    tensor it cannot map or write back): the caller can save the loaded model instead."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a shard: where its bytes lie, relative to the end of the header."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Shard:
    """A safetensors file: its raw header (8-byte length + JSON, copied verbatim to the output)
    and its tensors in file order."""

    path: Path
    header: bytes
    tensors: tuple[TensorEntry, ...]

    @property
    def data_size(self) -> int:
        return self.tensors[-1].end if self.tensors else 0


@dataclass(frozen=True)
class Checkpoint:
    """A safetensors checkpoint folder: one `model.safetensors`, or an index and its shards."""

    folder: Path
    shards: tuple[Shard, ...]
    index: dict | None

    def entries(self) -> dict[str, TensorEntry]:
        return {t.name: t for shard in self.shards for t in shard.tensors}

    def weight_files(self) -> set[str]:
        files = {s.path.name for s in self.shards}
        return files | ({INDEX_FILE} if self.index is not None else set())


@dataclass
class ExportReport:
    """What a shard export wrote: edited tensor names, how many were copied, side files."""

    edited: list[str] = field(default_factory=list)
    copied: int = 0
    shards: int = 0
    nbytes: int = 0
    files_copied: list[str] = field(default_factory=list)
    files_left_out: list[str] = field(default_factory=list)


# ----- reading ---------------------------------------------------------------------------------


def read_shard(path: Path) -> Shard:
    """Parse and check a safetensors file's header without reading its data.

    The tensors must tile the data section exactly (what the format requires), so a truncated
    or padded file is caught here, and safetensors itself must accept the file.
    """
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ExportError(f"Checkpoint shard {path} is missing: the source model is incomplete.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ExportError(f"Checkpoint shard {path} is truncated ({size} bytes).")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            raise ExportError(f"Checkpoint shard {path} is truncated (header cut off).")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"Checkpoint shard {path} has an unreadable header ({e}).") from e
    header.pop("__metadata__", None)
    tensors = tuple(sorted(_entries(header, path), key=lambda t: (t.start, t.end)))
    position = 0
    for t in tensors:
        if t.start != position:
            raise ExportError(f"Checkpoint shard {path}: tensor {t.name} does not follow on.")
        position = t.end
    if 8 + length + position != size:
        kind = "truncated" if 8 + length + position > size else "longer than its header says"
        raise ExportError(f"Checkpoint shard {path} is {kind} ({size} bytes).")
    try:
        with safe_open(path, framework="pt") as f:
            f.keys()
    except SafetensorError as e:
        raise ExportError(f"Checkpoint shard {path} is not a valid safetensors file: {e}") from e
    return Shard(path, prefix + raw, tensors)


def _entries(header: dict, path: Path) -> Iterator[TensorEntry]:
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ExportError(f"Checkpoint shard {path}: bad header entry for {name}.") from e
        item = ITEM_SIZES.get(dtype)
        if item is not None and end - start != math.prod(shape) * item:
            raise ExportError(f"Checkpoint shard {path}: tensor {name} has the wrong size.")
        yield TensorEntry(name, dtype, shape, int(start), int(end))


def has_safetensors(folder: Path) -> bool:
    return (folder / SINGLE_FILE).is_file() or (folder / INDEX_FILE).is_file()


def read_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint transformers loads from `folder` (`model.safetensors` first, as it does),
    with every shard's header checked against the index."""
    if (folder / SINGLE_FILE).is_file():
        return Checkpoint(folder, (read_shard(folder / SINGLE_FILE),), None)
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        raise ShardExportUnsupported(f"{folder} holds no safetensors checkpoint.")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map: dict[str, str] = dict(index["weight_map"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"Checkpoint index {index_path} is unreadable ({e}).") from e
    shards = []
    for file in sorted(set(weight_map.values())):
        if Path(file).name != file:
            raise ExportError(f"Checkpoint index {index_path} names a shard outside it: {file}.")
        shard = read_shard(folder / file)
        listed = {name for name, f in weight_map.items() if f == file}
        found = {t.name for t in shard.tensors}
        if found - listed:
            raise ExportError(
                f"Checkpoint shard {shard.path} holds tensors its index does not list there: "
                f"{', '.join(sorted(found - listed)[:5])}. The source checkpoint is inconsistent."
            )
        if listed - found:
            raise ExportError(
                f"Checkpoint shard {shard.path} lacks tensors its index lists there: "
                f"{', '.join(sorted(listed - found)[:5])}. The source checkpoint is inconsistent."
            )
        shards.append(shard)
    return Checkpoint(folder, tuple(shards), index)


def local_checkpoint_folder(path: str) -> Path:
    """The local folder of a model folder or hub id (its snapshot in the hub cache, which
    loading the model filled); never downloads."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception as e:
        raise ShardExportUnsupported(f"{path} is not in the local hub cache ({e}).") from e


def output_dtype(edit: TensorEdit, stored: str) -> str:
    """The dtype an edited tensor is written in: the edit's `output_dtype`, else the stored."""
    return getattr(edit, "output_dtype", None) or stored


def check_edits(checkpoint: Checkpoint, edits: Mapping[str, TensorEdit]) -> None:
    """Every edit names a tensor of the checkpoint and writes it in a float dtype (its stored
    one, or the edit's `output_dtype`)."""
    entries = checkpoint.entries()
    missing = sorted(set(edits) - set(entries))
    if missing:
        raise ShardExportUnsupported(
            f"The checkpoint in {checkpoint.folder} has no tensor {missing[0]} to edit"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + "."
        )
    for name, edit in edits.items():
        if edit is DROP:
            continue
        if output_dtype(edit, entries[name].dtype) not in EDITABLE_DTYPES:
            raise ShardExportUnsupported(
                f"Tensor {name} is stored as {entries[name].dtype}, which the shard export "
                "cannot write an edit back into."
            )


# ----- writing ---------------------------------------------------------------------------------


def save_edited_checkpoint(
    source: Path,
    edits: Mapping[str, TensorEdit],
    path: Path,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Write the edited checkpoint (and the source's other files) to `path`, atomically: a
    failure leaves whatever was at `path` before untouched."""
    checkpoint = read_checkpoint(source)
    check_edits(checkpoint, edits)
    with staged_folder(path, "the model") as tmp:
        return write_edited_checkpoint(checkpoint, edits, tmp, progress)


def write_edited_checkpoint(
    checkpoint: Checkpoint,
    edits: Mapping[str, TensorEdit],
    folder: Path,
    progress: Callable[[str], None] | None = None,
) -> ExportReport:
    """Fill `folder` (a staged, still private folder) with the edited checkpoint, shard by
    shard, each verified after writing, then the index and the source's other files."""
    check_edits(checkpoint, edits)
    report = ExportReport()
    layouts = []
    for number, shard in enumerate(checkpoint.shards, 1):
        out = folder / shard.path.name
        layout = output_layout(shard, edits)
        edited = _write_shard(shard, layout, edits, out)
        verify_shard(shard, out, edited, layout)
        layouts.append(layout)
        report.edited.extend(edited)
        report.copied += len(layout.tensors) - len(edited)
        report.shards += 1
        report.nbytes += out.stat().st_size
        if progress is not None:
            progress(f"shard {number}/{len(checkpoint.shards)} written: {out.name}")
    dropped = {name for name, edit in edits.items() if edit is DROP}
    unwritten = sorted(set(edits) - set(report.edited) - dropped)
    if unwritten:  # check_edits makes this impossible; an export must never skip an edit
        raise ExportError(f"Edited tensors were not written: {', '.join(unwritten)}.")
    if checkpoint.index is not None:
        _write_index(checkpoint, layouts, folder / INDEX_FILE)
    report.files_copied, report.files_left_out = copy_side_files(checkpoint, folder, set(edits))
    _mark_unquantized(folder, unquantized_modules(checkpoint, edits))
    return report


def output_layout(shard: Shard, edits: Mapping[str, TensorEdit]) -> Shard:
    """The output shard's header and tensors: the source's, verbatim, unless an edit changes a
    tensor's dtype or drops one; then a new header (the source's metadata kept) with the
    tensors in the source's order, packed."""
    changed = [
        t
        for t in shard.tensors
        if t.name in edits
        and (edits[t.name] is DROP or output_dtype(edits[t.name], t.dtype) != t.dtype)
    ]
    if not changed:
        return shard
    raw = json.loads(shard.header[8:])
    header: dict = {"__metadata__": raw["__metadata__"]} if "__metadata__" in raw else {}
    tensors, position = [], 0
    for t in shard.tensors:
        edit = edits.get(t.name)
        if edit is DROP:
            continue
        dtype = t.dtype if edit is None else output_dtype(edit, t.dtype)
        size = t.nbytes if dtype == t.dtype else math.prod(t.shape) * ITEM_SIZES[dtype]
        tensors.append(TensorEntry(t.name, dtype, t.shape, position, position + size))
        header[t.name] = {
            "dtype": dtype,
            "shape": list(t.shape),
            "data_offsets": [position, position + size],
        }
        position += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as safetensors writes
    return Shard(shard.path, struct.pack("<Q", len(text)) + text, tuple(tensors))


def _write_shard(
    shard: Shard, layout: Shard, edits: Mapping[str, TensorEdit], out: Path
) -> list[str]:
    """Write `layout` (the output header and tensors) from `shard`; returns the edited names."""
    edited: list[str] = []
    offset = len(shard.header)
    source = {t.name: t for t in shard.tensors}
    buffer = memoryview(bytearray(CHUNK_BYTES))
    with open(shard.path, "rb") as src, open(out, "wb") as dst:
        dst.write(layout.header)
        for entry in layout.tensors:
            edit = edits.get(entry.name)
            if edit is None:
                original = source[entry.name]
                _copy_range(src, dst, offset + original.start, original.nbytes, buffer)
                continue
            dst.write(_edited_bytes(entry, stored_tensor(shard.path, entry.name), edit))
            edited.append(entry.name)
    return edited


def stored_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor, read through its own safe_open handle: the file pages it maps are
    released with the tensor, so a shard's edited tensors never pile up in memory."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name)


def _copy_range(src, dst, start: int, length: int, buffer: memoryview) -> None:
    src.seek(start)
    while length > 0:
        n = src.readinto(buffer[: min(len(buffer), length)])
        if not n:
            raise ExportError(f"{src.name} ended early: it changed while being read.")
        dst.write(buffer[:n])
        length -= n


def _edited_bytes(entry: TensorEntry, original: torch.Tensor, edit: TensorEdit) -> memoryview:
    try:
        result = edit(original)
    except Exception as e:
        raise ExportError(f"Editing tensor {entry.name} failed: {e}") from e
    if tuple(result.shape) != entry.shape:
        raise ExportError(
            f"The edit of {entry.name} returned shape {tuple(result.shape)}, not {entry.shape}."
        )
    stored = result.to(EDITABLE_DTYPES[entry.dtype]).contiguous().cpu()
    if not bool(torch.isfinite(stored).all()):
        raise ExportError(f"The edit of {entry.name} has NaN or inf values: not written.")
    data = stored.view(torch.uint8).numpy().data
    if data.nbytes != entry.nbytes:
        raise ExportError(f"The edit of {entry.name} has the wrong byte size.")
    return data


def _write_index(checkpoint: Checkpoint, layouts: list[Shard], path: Path) -> None:
    index = dict(checkpoint.index or {})
    metadata = dict(index.get("metadata") or {})
    metadata["total_size"] = sum(s.data_size for s in layouts)
    index["metadata"] = metadata
    kept = {t.name for s in layouts for t in s.tensors}
    index["weight_map"] = {k: v for k, v in index.get("weight_map", {}).items() if k in kept}
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def unquantized_modules(checkpoint: Checkpoint, edits: Mapping[str, TensorEdit]) -> list[str]:
    """Modules whose weight is written out of its stored 8-bit float dtype (FP8 -> bf16)."""
    entries = checkpoint.entries()
    return sorted(
        name.removesuffix(".weight")
        for name, edit in edits.items()
        if edit is not DROP
        and entries[name].dtype in ("F8_E4M3", "F8_E5M2")
        and output_dtype(edit, entries[name].dtype) != entries[name].dtype
    )


def _mark_unquantized(folder: Path, modules: list[str]) -> None:
    """List `modules` in the copied config.json's quantization_config.modules_to_not_convert,
    so transformers loads them as plain layers (their weights are no longer FP8)."""
    if not modules:
        return
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        quant = config["quantization_config"]
    except (OSError, ValueError, KeyError) as e:
        raise ExportError(
            f"The source's config.json has no quantization_config to mark the edited layers "
            f"unquantized in ({e}): the output would not load."
        ) from e
    listed = list(quant.get("modules_to_not_convert") or [])
    quant["modules_to_not_convert"] = listed + [m for m in modules if m not in listed]
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ----- verification ----------------------------------------------------------------------------


def verify_shard(source: Shard, out: Path, edited: list[str], layout: Shard | None = None) -> None:
    """The written shard as safetensors reads it: the planned `layout` (default: the source's
    tensors, shapes and dtypes), and finite values wherever the source's are (read back in
    chunks, never whole)."""
    written = read_shard(out)
    if written.tensors != (layout or source).tensors:
        raise ExportError(f"Written shard {out.name} does not match its planned layout.")
    edited_names = set(edited)
    sources = {t.name: t for t in source.tensors}
    buffer = bytearray(CHUNK_BYTES)
    with open(out, "rb") as f:
        for entry in written.tensors:
            if entry.dtype not in FLOAT_DTYPES or _finite(f, len(written.header), entry, buffer):
                continue
            if entry.name in edited_names:
                raise ExportError(f"Written tensor {entry.name} has NaN or inf values.")
            with open(source.path, "rb") as original:
                if _finite(original, len(source.header), sources[entry.name], buffer):
                    raise ExportError(
                        f"Written tensor {entry.name} has NaN or inf values its source lacks: "
                        "the output is corrupt (disk or memory error?)."
                    )


def _finite(f, data_start: int, entry: TensorEntry, buffer: bytearray) -> bool:
    dtype = FLOAT_DTYPES[entry.dtype]
    item = ITEM_SIZES[entry.dtype]
    view = memoryview(buffer)[: len(buffer) - len(buffer) % item]
    f.seek(data_start + entry.start)
    remaining = entry.nbytes
    while remaining > 0:
        n = f.readinto(view[: min(len(view), remaining)])
        if n == 0 or n % item:
            raise ExportError(f"{f.name} ended inside tensor {entry.name}.")
        values = torch.frombuffer(buffer, dtype=dtype, count=n // item)
        if values.dtype.itemsize == 1:
            values = values.float()
        if not bool(torch.isfinite(values).all()):
            return False
        remaining -= n
    return True


# ----- the other files -------------------------------------------------------------------------


def copy_side_files(
    checkpoint: Checkpoint, folder: Path, edited: set[str]
) -> tuple[list[str], list[str]]:
    """Copy everything else the source folder holds (config, generation config, tokenizer,
    processor, chat template, code, extra weight files such as multi-token-prediction
    shards), returning (copied, left out with why). Left out: hidden folders (git, caches)
    and files that hold the weights again in another form, which a loader could pick up
    unedited."""
    copied, left_out = [], []
    skip = checkpoint.weight_files()
    for path in sorted(checkpoint.folder.rglob("*")):
        relative = path.relative_to(checkpoint.folder)
        if any(part.startswith(".") for part in relative.parts[:-1]) or not path.is_file():
            continue
        if str(relative) in skip:
            continue
        why = _left_out_reason(path, relative, edited)
        if why:
            left_out.append(f"{relative} ({why})")
            continue
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        copied.append(str(relative))
    return copied, left_out


def _left_out_reason(path: Path, relative: Path, edited: set[str]) -> str | None:
    name = relative.name.lower()
    if name.endswith(OTHER_WEIGHT_SUFFIXES):
        return "weights in another format, unedited"
    if not name.endswith(".safetensors"):
        return None
    if name.startswith("consolidated"):
        return "the weights again in the reference format, unedited"
    try:
        names = {t.name for t in read_shard(path).tensors}
    except ExportError:
        return "not a readable safetensors file"
    if names & edited:
        return "holds edited tensors again, unedited"
    return None
