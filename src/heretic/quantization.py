"""Quantized models: loading one with bitsandbytes, telling whether a loaded model or a
checkpoint is quantized, and reading a quantized weight back as floats.

heretic's edit runs as a hook on a module's output during the search, so a model loaded in 4 or
8 bits (`quantization = "bnb_4bit"` / `"bnb_8bit"`) is searched with the hooks unchanged; the
chosen edit is then merged into the checkpoint's own full-precision weights (the shard export
reads them from disk). Only three things ever need a quantized weight's values: row
normalization (the rows' norms), the adapter export (`A = b^T W`) and an in-place merge. The
first two read it dequantized (`float_weight`); an in-place merge into a quantized weight would
write garbage, so it is refused (`refuse_in_place`).

Checkpoints that are stored quantized (FP8 with block scales, compressed-tensors, GPTQ, AWQ,
pre-quantized bitsandbytes) load as transformers loads them and are searched as loaded; how
they are exported is `shard_export`'s business (FP8 edited tensors are written in bf16).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from heretic.errors import HereticError, ModelLoadError

QUANTIZATIONS = ("none", "bnb_4bit", "bnb_8bit")
QUANTIZATION_NAMES = {"bnb_4bit": "bitsandbytes 4-bit (NF4)", "bnb_8bit": "bitsandbytes 8-bit"}


class QuantizedWeightError(HereticError):
    """An operation needs a weight's values or writes into it, and the weight is quantized."""


def bnb_config(quantization: str, dtype: torch.dtype | str, allow_cpu_offload: bool = False):
    """transformers' BitsAndBytesConfig for `quantization`, or None for "none".

    4-bit is NF4 with double quantization (the usual choice for LLM weights), computing in the
    model's dtype. `allow_cpu_offload` keeps the layers that accelerate places on the CPU in
    float32 instead of refusing to load (bitsandbytes quantizes only accelerator-resident
    layers when offloading).
    """
    if quantization == "none":
        return None
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r} (choose from {QUANTIZATIONS})")
    from transformers import BitsAndBytesConfig

    compute = dtype if isinstance(dtype, torch.dtype) else None
    if quantization == "bnb_4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
            llm_int8_enable_fp32_cpu_offload=allow_cpu_offload,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=allow_cpu_offload)


def check_bnb_backend(quantization: str, device: str) -> None:
    """Stop with a clear message where bitsandbytes is missing or cannot run `quantization` on
    `device` (its CPU backend needs a recent release; some accelerators have none): one tiny
    quantized layer is built and run there, which is what the model would do."""
    if quantization == "none":
        return
    name = QUANTIZATION_NAMES[quantization]
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ModelLoadError(
            f"quantization = {quantization!r} needs bitsandbytes, which is not installed: "
            "pip install bitsandbytes (or set quantization = 'none')."
        ) from e
    quiet_bnb_logs()
    try:
        _smoke_test(bnb, quantization, device)
    except Exception as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelLoadError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} has no working {name} backend on "
            f"{device} ({type(e).__name__}: {message}): set quantization = 'none', or install a "
            "bitsandbytes release that supports this device."
        ) from e


def _smoke_test(bnb: Any, quantization: str, device: str) -> None:
    dtype = torch.bfloat16
    plain = nn.Linear(64, 64, bias=False).to(dtype)
    if quantization == "bnb_4bit":
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
    else:
        layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
    layer.load_state_dict(plain.state_dict())
    layer = layer.to(device)
    with torch.no_grad():
        out = layer(torch.ones(2, 64, dtype=dtype, device=device))
    if not bool(torch.isfinite(out).all()):
        raise RuntimeError("a test layer gives NaN/inf")


class _DropCastNotice(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" on every 8-bit matmul."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "will be cast" not in record.getMessage()


def quiet_bnb_logs() -> None:
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropCastNotice) for f in logger.filters):
        logger.addFilter(_DropCastNotice())


# ----- what is quantized ---------------------------------------------------------------------


def checkpoint_quantization(config: Any) -> str | None:
    """The quantization method a checkpoint's config declares (`quant_method`: "fp8",
    "compressed-tensors", "bitsandbytes", "gptq", ...), or None for a plain checkpoint."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    method = method or getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method) or "unknown")


def tensor_format(param: torch.Tensor, module: nn.Module | None = None) -> str | None:
    """How a weight is stored when it is not plain floats of 16 bits or more ("bitsandbytes
    4-bit", "FP8 (float8_e4m3fn)", ...), or None for a plain tensor."""
    kind = type(param).__name__
    if kind == "Params4bit":
        return "bitsandbytes 4-bit"
    if kind == "Int8Params":
        return "bitsandbytes 8-bit"
    if param.is_floating_point() and param.element_size() >= 2:
        return None
    owner = f" in {type(module).__name__}" if module is not None else ""
    label = "FP8" if param.is_floating_point() else "quantized"
    return f"{label} ({str(param.dtype).removeprefix('torch.')}{owner})"


def quantized_formats(params: Iterable[tuple[torch.Tensor, nn.Module | None]]) -> list[str]:
    """The distinct non-plain formats among `params` (weight, owning module) pairs."""
    return sorted({f for p, m in params if (f := tensor_format(p, m)) is not None})


def float_weight(param: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
    """A weight's values as a float tensor (out, in): dequantized for bitsandbytes 4/8-bit and
    block-scaled FP8 (transformers' FP8Linear), the tensor itself when it is plain."""
    kind = type(param).__name__
    if kind == "Params4bit":
        state = param.quant_state
        if getattr(state, "packing_format_for_cpu", False) and module is not None:
            # bitsandbytes repacks a 4-bit weight for its CPU kernel on the first forward
            # pass, in a layout its dequantize_4bit does not read.
            return weight_from_outputs(module)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(param.data, state).float()
    if kind == "Int8Params":
        import bitsandbytes.functional as bnbf

        scales = getattr(param, "SCB", None)
        if scales is None and module is not None:
            scales = getattr(getattr(module, "state", None), "SCB", None)
        if scales is None:
            raise QuantizedWeightError(
                "A bitsandbytes 8-bit weight has no scales (SCB): it was never quantized."
            )
        return bnbf.int8_vectorwise_dequant(param.data, scales).float()
    if param.is_floating_point() and param.element_size() == 1 and module is not None:
        scale = getattr(module, "weight_scale_inv", None)
        if scale is not None:
            block = getattr(module, "block_size", None)
            return dequantize_fp8(param.detach(), scale.detach(), block)
    if tensor_format(param, module) is not None:
        raise QuantizedWeightError(
            f"heretic cannot read the values of a weight stored as {tensor_format(param, module)}."
        )
    return param.detach()


@torch.no_grad()
def weight_from_outputs(module: nn.Module, chunk: int = 1024) -> torch.Tensor:
    """W (out, in) in float32 as a linear layer computes it: its outputs for the unit vectors,
    less its bias, in chunks of `chunk` inputs. Runs `module.forward`, so the forward hooks
    (an edit) are not applied."""
    n = int(module.in_features)
    weight = module.weight
    dtype = getattr(module, "compute_dtype", None) or torch.bfloat16
    device = weight.device
    columns = []
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        units = torch.zeros(k, n, dtype=dtype, device=device)
        units[torch.arange(k), start + torch.arange(k)] = 1
        out = module.forward(units).float()
        if module.bias is not None:
            out = out - module.bias.float()
        columns.append(out.T)
    return torch.cat(columns, dim=1)


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: Iterable[int] | None = None
) -> torch.Tensor:
    """float32 values of an FP8 weight (out, in) with its `weight_scale_inv`: one scale per
    (block[0] x block[1]) tile (the last tiles may be partial), one per row, or one in all (as
    DeepSeek / Qwen FP8 checkpoints store them)."""
    w = weight.to(torch.float32)
    s = scale_inv.to(device=w.device, dtype=torch.float32)
    if s.numel() == 1:
        return w * s.reshape(())
    rows, cols = w.shape
    if block is None:
        if s.dim() == 2 and s.shape[1] == 1 and s.shape[0] == rows:
            return w * s
        block = (-(-rows // s.shape[0]), -(-cols // s.shape[1]))
    br, bc = (int(b) for b in block)
    expected = (-(-rows // br), -(-cols // bc))
    if s.dim() != 2 or tuple(s.shape) != expected:
        raise QuantizedWeightError(
            f"An FP8 weight of shape {tuple(w.shape)} has scales of shape {tuple(s.shape)}, "
            f"not {expected} for blocks of {br}x{bc}: the checkpoint is inconsistent."
        )
    full = s.repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]
    return w * full


def refuse_in_place(formats: list[str], what: str, instead: str) -> None:
    """`what` would write into the weights, which is impossible for quantized ones."""
    if formats:
        raise QuantizedWeightError(
            f"{what} writes the edit into the weights, but they are stored as "
            f"{', '.join(formats)}: {instead}."
        )
