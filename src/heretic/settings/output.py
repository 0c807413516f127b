"""Settings fields: saving, exporting and uploading the chosen edit."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

EXPORT_FORMATS = ("auto", "model", "adapter", "gguf")


class ExportFields(BaseModel):
    """What is saved (formats, export method, GGUF type), uploaded, and drawn."""

    save: bool = Field(
        default=True,
        description="Headless: save the selected trial to OUTPUT_DIR (--no-save: only report it). "
        "The menu asks instead.",
    )
    export: str = Field(
        default="auto",
        description="What to save, comma-separated: 'model' (merged safetensors), 'adapter' "
        "(PEFT LoRA, OUTPUT_DIR/adapter), 'gguf'; 'auto' = gguf for a GGUF input, else model.",
    )
    export_method: Literal["shards", "in_memory"] = Field(
        default="shards",
        description="How the merged model is written: 'shards' rewrites the source safetensors "
        "checkpoint shard by shard, editing only the edited tensors in their stored dtype "
        "(memory: the tensor in flight); 'in_memory' merges into the loaded model and calls "
        "save_pretrained (memory: the whole model). A GGUF input, or a checkpoint the shard "
        "export cannot map, falls back to in_memory with a notice.",
    )
    gguf_type: Literal["auto", "f16", "q8_0"] = Field(
        default="auto",
        description="Type of the edited tensors in a GGUF export ('auto': F32/F16/BF16 inputs "
        "keep theirs, quantized inputs get Q8_0).",
    )
    upload_repo_id: str | None = Field(
        default=None,
        description="Hugging Face repository (user/name) to upload the saved model to, created if "
        "missing; token from HF_TOKEN or `hf auth login`.",
    )
    private: bool = Field(default=False, description="Create the uploaded repository as private.")
    plot_residuals: bool = Field(
        default=False,
        description="Also draw OUTPUT_DIR/residuals.png: good vs bad residuals in 2-D, per edited "
        "layer.",
    )

    @field_validator("export")
    @classmethod
    def _check_export(cls, value: str) -> str:
        parts = [p.strip().lower() for p in value.split(",") if p.strip()]
        unknown = [p for p in parts if p not in EXPORT_FORMATS]
        if unknown or not parts:
            raise ValueError(
                f"unknown format(s) {', '.join(unknown) or '(empty)'}: use 'auto' or a "
                "comma-separated list of model, adapter, gguf"
            )
        if "auto" in parts and len(parts) > 1:
            raise ValueError("'auto' cannot be combined with other formats")
        return ",".join(dict.fromkeys(parts))

    @field_validator("upload_repo_id")
    @classmethod
    def _check_repo_id(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()
        if value.count("/") != 1 or value.startswith("/") or value.endswith("/"):
            raise ValueError("must look like 'user/name' (or 'organization/name')")
        return value

    def resolved_exports(self, gguf_input: bool) -> list[str]:
        """The formats to save: 'auto' is GGUF for a GGUF input (its user lives in llama.cpp /
        Ollama, and a merged float copy of a big quantized model would be huge), else model."""
        if self.export == "auto":
            return ["gguf"] if gguf_input else ["model"]
        return self.export.split(",")
