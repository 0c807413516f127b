"""A checkpoint's stored tensors as floats, and how the export edits a quantized checkpoint.

Edits are always computed on float values. For a plain checkpoint that is the stored tensor;
for an FP8 checkpoint (`quant_method: "fp8"`, as DeepSeek-V3 and Qwen3 FP8 store them: the
weight in float8_e4m3fn plus a `weight_scale_inv` per block of `weight_block_size`), the
weight is dequantized with its scales, edited in float32 and written in bfloat16; its scales
are left out and its module is listed as not quantized in config.json (`shard_export` does
that). Re-quantizing the edited weight would put FP8 rounding on top of the edit; bf16 keeps
the edit as it was measured, at two bytes per weight for the edited matrices only.

Other stored quantizations (compressed-tensors, GPTQ, AWQ, pre-quantized bitsandbytes) are
refused with a message naming the format: `ShardExportUnsupported`, so the caller falls back
to the in-memory save, which works where transformers loaded the model dequantized and is
refused (naming the format) where it did not.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from heretic.quantization import dequantize_fp8
from heretic.shard_export import (
    DROP,
    EDITABLE_DTYPES,
    Checkpoint,
    ShardExportUnsupported,
    TensorEdit,
    stored_tensor,
)

FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
OUTPUT_DTYPE = "BF16"
# Per-module tensors of an FP8 layer that no longer apply once its weight is written in bf16.
FP8_COMPANIONS = ("weight_scale_inv", "activation_scale", "input_scale")


def read_quantization_config(folder: Path) -> dict | None:
    """config.json's quantization_config, or None (no config, or a plain checkpoint)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return quant if isinstance(quant, dict) else None


@dataclass
class StoredWeights:
    """Reads a checkpoint's tensors, by name, as float values (FP8 weights dequantized)."""

    checkpoint: Checkpoint
    quantization: dict | None = None
    _paths: dict[str, Path] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._paths = {t.name: s.path for s in self.checkpoint.shards for t in s.tensors}

    @classmethod
    def of(cls, checkpoint: Checkpoint) -> StoredWeights:
        return cls(checkpoint, read_quantization_config(checkpoint.folder))

    @property
    def method(self) -> str | None:
        return None if self.quantization is None else str(self.quantization.get("quant_method"))

    @property
    def block(self) -> tuple[int, int] | None:
        block = (self.quantization or {}).get("weight_block_size")
        return None if not block else (int(block[0]), int(block[1]))

    def raw(self, name: str) -> torch.Tensor:
        return stored_tensor(self._paths[name], name)

    def dtype(self, name: str) -> str:
        return self.checkpoint.entries()[name].dtype

    def fp8_scale(self, name: str) -> str:
        """The scale tensor of an FP8 weight; ShardExportUnsupported, naming the format, for
        any quantized tensor the export cannot dequantize."""
        dtype = self.dtype(name)
        scale = name.removesuffix("weight") + "weight_scale_inv"
        if dtype in FP8_DTYPES and self.method == "fp8" and scale in self._paths:
            return scale
        fmt = f"a {self.method} checkpoint" if self.method else "a checkpoint"
        why = (
            f"has no {scale} block scales"
            if dtype in FP8_DTYPES and self.method == "fp8"
            else "which the shard export cannot dequantize (it reads FP8 checkpoints with "
            "weight_scale_inv block scales)"
        )
        raise ShardExportUnsupported(f"Tensor {name} is stored as {dtype} in {fmt}, {why}.")

    def read(self, name: str) -> torch.Tensor:
        """The tensor's values: stored floats as they are, FP8 weights dequantized."""
        if self.dtype(name) in EDITABLE_DTYPES:
            return self.raw(name)
        return dequantize_fp8(self.raw(name), self.raw(self.fp8_scale(name)), self.block)


@dataclass(eq=False)
class DequantizedEdit:
    """The edit of an FP8 weight: dequantized with its scales, edited, written in bf16."""

    inner: TensorEdit
    weights: StoredWeights
    scale: str
    output_dtype: str = OUTPUT_DTYPE

    def __call__(self, stored: torch.Tensor) -> torch.Tensor:
        values = dequantize_fp8(stored, self.weights.raw(self.scale), self.weights.block)
        return self.inner(values)


def quantized_edits(
    edits: Mapping[str, TensorEdit], weights: StoredWeights
) -> dict[str, TensorEdit]:
    """`edits` for a checkpoint that may store its weights quantized: every edit of an FP8
    weight dequantizes it and writes it in bf16, and its module's scales are dropped."""
    result: dict[str, TensorEdit] = dict(edits)
    entries = weights.checkpoint.entries()
    for name, edit in edits.items():
        if weights.dtype(name) in EDITABLE_DTYPES:
            continue
        scale = weights.fp8_scale(name)
        result[name] = DequantizedEdit(edit, weights, scale)
        module = name.removesuffix("weight")
        for companion in FP8_COMPANIONS:
            if module + companion in entries:
                result[module + companion] = DROP
    return result
