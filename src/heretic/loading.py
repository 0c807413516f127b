"""Loading a model: hub id, folder or GGUF file; the class to load with; dtype fallback;
vision-language checkpoints with their processor."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import nn

from heretic.errors import ModelLoadError
from heretic.model import _DTYPES, Model, ModelSource, _resolve_dtype, resolve_source
from heretic.quantization import (
    QUANTIZATION_NAMES,
    bnb_config,
    check_bnb_backend,
    checkpoint_quantization,
)
from heretic.reasoning import Reasoning


def load_model(
    model: str,
    *,
    gguf_file: str | None = None,
    dtype: str = "bfloat16",
    device_map: str = "auto",
    trust_remote_code: bool = False,
    system_prompt: str | None = None,
    reasoning: Reasoning | None = None,
    log: Callable[[str], None] | None = None,
    check_logits: bool = True,
    quantization: str = "none",
    max_memory: dict[int | str, str] | None = None,
) -> Model:
    """Load a hub id, local folder or GGUF file as a heretic `Model`.

    A vision-language checkpoint loads whole (`AutoModelForImageTextToText`) with its
    processor, so that the edited output still takes images; only its text decoder is edited.

    The model must give finite logits for a first response token in the dtype it runs in (in
    float16 many bf16-trained models overflow into inf, and the search would then score NaN).
    `dtype="auto"` tries the checkpoint's own dtype, then bfloat16, float16 and float32, and
    keeps the first that passes, telling `log` which; a named dtype that fails is an error.
    `check_logits=False` skips that check (a copy loaded only to read its weights).

    `quantization` ("bnb_4bit", "bnb_8bit") loads the weights quantized by bitsandbytes (see
    `quantization.py`); `max_memory` ({GPU index or "cpu": size}) caps what accelerate puts
    on each device with `device_map` (a model that does not fit spills to the next device).
    """
    from transformers import AutoTokenizer

    source = resolve_source(model, gguf_file)
    kwargs = {"trust_remote_code": trust_remote_code}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    tokenizer = _loading(source, lambda: AutoTokenizer.from_pretrained(source.path, **kwargs))
    auto_class, multimodal = _loading(source, lambda: _auto_class(source, kwargs))
    processor = _processor(source, kwargs) if multimodal else None
    device = _device_map(device_map, max_memory)
    _check_quantization(source, kwargs, quantization, device, log)

    def build(load_dtype: torch.dtype | str, device: str | None) -> Model:
        loaded = _load_weights(
            auto_class, source, kwargs, load_dtype, device, quantization, max_memory
        )
        if source.gguf_file:
            loaded = _dequantized_copy(loaded, dtype, device_map)
        _check_not_on_disk(loaded, source)
        return Model(
            loaded,
            tokenizer,
            source=source,
            system_prompt=system_prompt,
            processor=processor,
            reasoning=reasoning,
        )

    if source.gguf_file:
        return build(torch.float32, None)
    return _first_finite(lambda d: build(d, device), source, dtype, check_logits, log)


def _load_weights(
    auto_class,
    source: ModelSource,
    kwargs: dict,
    load_dtype: torch.dtype | str,
    device: str | None,
    quantization: str,
    max_memory: dict[int | str, str] | None,
) -> nn.Module:
    """One load of the weights, in `load_dtype` on `device` (`load_model` calls it once per
    dtype it tries): quantized by bitsandbytes when `quantization` asks, placed by accelerate
    within the `max_memory` caps (which may leave layers on the CPU, so bitsandbytes is told
    to allow that)."""
    # A copy each time: transformers rewrites the sizes in place.
    extra: dict = {} if max_memory is None else {"max_memory": dict(max_memory)}
    config = bnb_config(quantization, load_dtype, allow_cpu_offload=max_memory is not None)
    if config is not None:
        extra["quantization_config"] = config
    return _loading(
        source,
        lambda: from_pretrained(
            auto_class, source.path, dtype=load_dtype, device_map=device, **kwargs, **extra
        ),
    )


def from_pretrained(auto_class, path: str, **kwargs) -> nn.Module:
    """`auto_class.from_pretrained`: the one call that loads a model's weights (tests watch
    what reaches it)."""
    return auto_class.from_pretrained(path, **kwargs)


def _check_quantization(
    source: ModelSource,
    kwargs: dict,
    quantization: str,
    device: str | None,
    log: Callable[[str], None] | None,
) -> None:
    """Refuse what cannot be quantized (a GGUF file, an already-quantized checkpoint) and a
    machine where bitsandbytes cannot run; tell `log` how a quantized checkpoint loads."""
    from transformers import AutoConfig

    stored = None
    if not source.gguf_file:
        config = _loading(source, lambda: AutoConfig.from_pretrained(source.path, **kwargs))
        stored = checkpoint_quantization(config)
    if quantization == "none":
        if stored is not None and log is not None:
            log(
                f"the checkpoint is stored quantized ({stored}): searching on it as "
                "transformers loads it; the export edits the checkpoint's own tensors"
            )
        return
    if source.gguf_file:
        raise ModelLoadError(
            f"quantization = {quantization!r} does not apply to a GGUF file ({source.description}"
            " is loaded dequantized): set quantization = 'none'."
        )
    if stored is not None:
        raise ModelLoadError(
            f"{source.description} is already quantized ({stored}), so it cannot be loaded with "
            f"quantization = {quantization!r}: set quantization = 'none' to search on it as it is."
        )
    check_bnb_backend(quantization, _backend_device(device))
    if log is not None:
        log(f"loading the weights quantized: {QUANTIZATION_NAMES[quantization]}")


def _first_finite(
    build: Callable[[torch.dtype | str], Model],
    source: ModelSource,
    dtype: str,
    check_logits: bool,
    log: Callable[[str], None] | None,
) -> Model:
    """The model built in the first dtype whose first-token logits are finite (see
    `load_model`); each failed copy is freed before the next is loaded."""
    candidates: list[torch.dtype | str] = [_resolve_dtype(dtype)]
    if dtype == "auto":
        candidates += [torch.bfloat16, torch.float16, torch.float32]
    failed: list[torch.dtype] = []
    for candidate in candidates:
        if candidate in failed:
            continue
        result = build(candidate)
        chosen = result.model.dtype
        if chosen not in failed and (not check_logits or _finite_first_token(result)):
            if dtype == "auto" and log is not None:
                note = f" ({', '.join(map(_dtype_name, failed))} gave NaN/inf)" if failed else ""
                log(f"dtype auto: running in {_dtype_name(chosen)}{note}")
            return result
        failed.append(chosen)
        del result
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    raise _no_finite_dtype(source, dtype, failed)


def _no_finite_dtype(source: ModelSource, dtype: str, failed: list[torch.dtype]) -> ModelLoadError:
    names = ", ".join(map(_dtype_name, failed))
    if dtype == "auto":
        return ModelLoadError(
            f"{source.description} gives NaN/inf logits in every dtype tried ({names}): the "
            "checkpoint's weights are probably broken."
        )
    return ModelLoadError(
        f"{source.description} gives NaN/inf logits in {names}: set dtype to 'auto' (tries the "
        "checkpoint's dtype, bfloat16, float16, float32) or to 'float32'."
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _finite_first_token(model: Model) -> bool:
    """Whether the logits of a first response token (one short chat prompt) are all finite."""
    return bool(torch.isfinite(model.first_token_logprobs(["Say hello."], 1)).all())


def _loading(source: ModelSource, load: Callable[[], object], what: str = "model"):
    """`load()`, with transformers' loading errors turned into a ModelLoadError about `what`."""
    try:
        return load()
    except (OSError, ValueError, KeyError, ImportError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "trust_remote_code" in str(e):
            message = "it needs its own code: rerun with --trust-remote-code if you trust it"
        raise ModelLoadError(f"Cannot load {what} {source.description}: {message}") from e


def _auto_class(source: ModelSource, kwargs: dict):
    """The class to load with, and whether the checkpoint is multimodal: the class its config's
    `architectures` names when transformers has it (some text models, like Mistral 4, are only
    registered for image-text-to-text), else AutoModelForImageTextToText for a checkpoint with a
    vision part and AutoModelForCausalLM otherwise."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    if source.gguf_file:
        return AutoModelForCausalLM, False
    config = AutoConfig.from_pretrained(source.path, **kwargs)
    multimodal = getattr(config, "vision_config", None) is not None
    for name in getattr(config, "architectures", None) or []:
        named = getattr(transformers, name, None)
        if isinstance(named, type) and hasattr(named, "from_pretrained"):
            return named, multimodal
    return (AutoModelForImageTextToText if multimodal else AutoModelForCausalLM), multimodal


def _processor(source: ModelSource, kwargs: dict):
    """The checkpoint's processor (image preprocessing + tokenizer + chat template), saved
    with the output so it still takes images; None, with a notice, when it has none."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source.path, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:
        print(
            f"Note: {source.description} has a vision part but no processor could be loaded "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); the output will "
            "hold the tokenizer only."
        )
        return None


def _check_not_on_disk(model: nn.Module, source: ModelSource) -> None:
    """accelerate offloads what fits on no device to disk (weights left on the meta device),
    which heretic does not support: every pass would read them back."""
    on_disk = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_meta)
    if on_disk:
        raise ModelLoadError(
            f"{source.description} does not fit in the memory max_memory allows: "
            f"{on_disk / 2**30:.2f} GB of it would be offloaded to disk, which heretic does not "
            "support. Raise the caps (cpu=... for CPU memory) or use quantization = 'bnb_4bit'."
        )


def _backend_device(device: str | None) -> str:
    """The device the quantized layers will run on, for bitsandbytes' backend check."""
    if device is None or device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return device if device.startswith("cuda") else "cuda"


def _device_map(device_map: str, max_memory: dict | None = None) -> str | None:
    """ "auto" without a GPU loads plainly on the CPU, unless max_memory asks accelerate to
    place the model (it then honours the CPU's cap too)."""
    if device_map == "auto" and not torch.cuda.is_available() and max_memory is None:
        return None
    return device_map


def _dequantized_copy(model: nn.Module, dtype: str, device_map: str) -> nn.Module:
    """A GGUF-loaded model carries a quantization config and refuses `save_pretrained`:
    rebuild a plain model from its config and move the (already dequantized) weights over."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    target = torch.float32 if dtype == "auto" else _DTYPES[dtype]
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    del model
    clean = clean.to(target)
    device = _device_map(device_map)
    if device and device != "auto":
        clean = clean.to(device)
    elif device == "auto":
        clean = clean.to("cuda")
    return clean


def load_configured(
    settings,
    model: str | None = None,
    *,
    device_map: str | None = None,
    dtype: str | None = None,
    log: Callable[[str], None] | None = None,
) -> Model:
    """`settings.model` (or `model`, with no `gguf_file`) loaded as the settings describe it;
    with `dtype`, a copy to read weights from (in the dtype the search model runs in, with no
    logits check)."""
    return load_model(
        model or settings.model,
        gguf_file=None if model else settings.gguf_file,
        dtype=dtype or settings.dtype,
        device_map=device_map or settings.device_map,
        trust_remote_code=settings.trust_remote_code,
        system_prompt=settings.system_prompt,
        reasoning=settings.reasoning(),
        log=log,
        check_logits=dtype is None,
        quantization=settings.quantization,
        max_memory=settings.max_memory_map(),
    )
