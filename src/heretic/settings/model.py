"""Settings fields: which model to edit, where the results go, and how the model is loaded
and run (precision, placement, chat template, batches, response lengths)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from heretic.placement import parse_max_memory
from heretic.reasoning import DEFAULT_MAX_THINKING_TOKENS, Reasoning


class RunFields(BaseModel):
    """The model to edit, the settings file, and the output folder."""

    model: str = Field(
        default="",
        description="Model to abliterate: a Hugging Face id, a local model folder, or a .gguf "
        "file.",
    )
    gguf_file: str | None = Field(
        default=None,
        description="For a hub repository holding GGUF files: the file to load from it.",
    )
    config: Path | None = Field(
        default=None,
        description="TOML settings file (default: ./config.toml when it exists).",
    )
    output_dir: Path = Field(
        default=Path("heretic_output"),
        description="Folder for the study, the merged model (model/) and heretic_metadata.json.",
    )


class LoadingFields(BaseModel):
    """How the model is loaded and run: precision, placement, quantization, chat template
    and thinking, batch sizes, response length."""

    system_prompt: str | None = Field(
        default="You are a helpful assistant.",
        description="System prompt for every chat ('' for none); it changes refusal rates a "
        "lot, so it is recorded.",
    )
    batch_size: int = Field(
        default=0,
        ge=0,
        description="Prompts per forward pass (0 = automatic: the fastest size that fits).",
    )
    max_batch_size: int = Field(
        default=128, ge=1, description="Upper bound for the automatic batch size."
    )
    max_response_length: int = Field(
        default=100,
        ge=1,
        description="Tokens generated per bad evaluation prompt to judge refusals.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="bfloat16",
        description="Precision the model runs in during the search; 'auto' tries the "
        "checkpoint's dtype, then bfloat16, float16, float32, keeping the first whose logits "
        "are finite (a named dtype that gives NaN/inf is an error).",
    )
    enable_thinking: bool | None = Field(
        default=None,
        description="Reasoning models: the chat template's thinking switch (Qwen3-style "
        "templates' enable_thinking): --enable-thinking or --no-enable-thinking (true or false in "
        "config.toml); unset = the template's default. A "
        "template without the switch is an error.",
    )
    response_prefix: str = Field(
        default="",
        description="Text appended after the chat template's generation prompt, part of every "
        "prompt the model sees (directions, KL, responses); e.g. '<think>\\n\\n</think>\\n\\n' "
        "makes a thinking model answer at once.",
    )
    max_thinking_tokens: int = Field(
        default=DEFAULT_MAX_THINKING_TOKENS,
        ge=1,
        description="Reasoning models: tokens a response may think (<think>..., gpt-oss's "
        "analysis channel, [THINK]..., <thought>...) before its max_response_length answer "
        "tokens, which alone are judged; a response still thinking here counts as a refusal "
        "and is reported as unanswered.",
    )
    device_map: str = Field(
        default="auto",
        description="Where the model runs: 'auto' (accelerate spreads it over the GPUs, then "
        "the CPU), 'cpu', 'cuda', 'cuda:1', 'balanced', 'sequential', ...",
    )
    max_memory: str | None = Field(
        default=None,
        description="Memory cap per device for accelerate's placement (device_map 'auto', "
        "'balanced' or 'sequential'), e.g. '0=20GiB,1=24GiB,cpu=64GiB' (GPU index or cpu = "
        "size): what does not fit on the GPUs is offloaded to the CPU; unset = all free memory.",
    )
    quantization: Literal["none", "bnb_4bit", "bnb_8bit"] = Field(
        default="none",
        description="Load the model quantized by bitsandbytes for the directions and the "
        "search: 'bnb_4bit' (NF4, about a quarter of bf16's memory) or 'bnb_8bit'; the chosen "
        "edit is still merged into the checkpoint's full-precision weights. Needs "
        "reset_strategy adapter and no --compile.",
    )
    layer_outputs_device: Literal["auto", "model", "cpu"] = Field(
        default="auto",
        description="Where skip_unedited_layers keeps the stored layer outputs: 'model' (with "
        "the layers, on the accelerator), 'cpu' (CPU memory: frees the accelerator, costs a "
        "copy per replayed batch), 'auto' (on the accelerator while they take at most a quarter "
        "of its free memory, else the CPU). The automatic batch size leaves room for them.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model repositories to run their own Python code."
    )

    @field_validator("response_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        if "\\n" in value or "\\t" in value:
            raise ValueError(
                "holds a backslash escape as two characters ('\\n'), not a newline: write a "
                'real newline (in config.toml "\\n" inside double quotes does it; in bash, '
                "$'<think>\\n\\n</think>\\n\\n')"
            )
        return value

    def reasoning(self) -> Reasoning:
        """The reasoning settings, as the model takes them."""
        return Reasoning(self.enable_thinking, self.response_prefix, self.max_thinking_tokens)

    @field_validator("max_memory")
    @classmethod
    def _check_max_memory(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parse_max_memory(value)
        return value.strip()

    def max_memory_map(self) -> dict[int | str, str] | None:
        """max_memory in the form accelerate takes ({0: "20GiB", "cpu": "64GiB"})."""
        return None if self.max_memory is None else parse_max_memory(self.max_memory)
