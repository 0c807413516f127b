"""The model: chat formatting, batched residuals, first-token log-probs, generation.

Loading is `loading.py`; decoding that drops and pools rows is `decoding.py`.

This is the only module that touches transformers internals. It knows architectures (where the
decoder layers and the matrices that write into the residual stream live), not the math of the
edit: `sites.py` finds the residual writers (`Model.sites`), `edit.py` edits them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from heretic.coverage import check_coverage
from heretic.decoding import Decoding
from heretic.discovery import find_decoder_layers, find_sites, text_runner
from heretic.errors import ModelLoadError
from heretic.layer_outputs import LayerOutputs, last_position
from heretic.reasoning import Reasoning, ResponseReader, mentions_thinking, open_block
from heretic.sites import COMPONENTS, EditSite

_DTYPES = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from: a hub id or folder, optionally a GGUF file inside it."""

    path: str
    gguf_file: str | None

    @property
    def description(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def resolve_source(
    model: str, gguf_file: str | None = None, option: str = "--model"
) -> ModelSource:
    """Split a local `.gguf` file path into (folder, file), the form transformers wants.
    `option` names the setting the path came from, in the messages."""
    if not model:
        raise ModelLoadError(
            f"No model given: pass {option} with a Hugging Face id, a model folder or a .gguf file."
        )
    path = Path(model).expanduser()
    if model.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist: check {option}.")
        return ModelSource(str(path.parent.resolve()), path.name)
    looks_local = model.startswith((".", "/", "~")) or path.exists() or model.count("/") > 1
    if looks_local and not path.exists():
        raise ModelLoadError(f"Model folder {path} does not exist: check {option}.")
    if path.is_dir():
        if not (path / "config.json").is_file() and gguf_file is None:
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            fix = "pass --gguf-file" if option == "--model" else f"give {option} the path of"
            hint = f" (it holds GGUF files: {fix} {ggufs[0]})" if ggufs else ""
            raise ModelLoadError(f"{path} has no config.json, so it is not a model folder{hint}.")
        return ModelSource(str(path.resolve()), gguf_file)
    return ModelSource(model, gguf_file)


def _resolve_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else _DTYPES[name]


def _module_output(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


class Model:
    """A loaded chat model plus everything heretic asks of it."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        source: ModelSource,
        system_prompt: str | None,
        processor=None,
        reasoning: Reasoning | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.source = source
        self.system_prompt = system_prompt
        self.reasoning = reasoning or Reasoning()
        if getattr(tokenizer, "chat_template", None) is None:
            tokenizer.chat_template = getattr(processor, "chat_template", None)
        if getattr(tokenizer, "chat_template", None) is None:
            raise ModelLoadError(
                f"{source.description} has no chat template, so it is probably a base model: "
                "abliteration removes refusals from chat models; use the instruct/chat version."
            )
        if self.reasoning.enable_thinking is not None and "enable_thinking" not in str(
            tokenizer.chat_template
        ):
            raise ModelLoadError(
                f"enable_thinking is set, but the chat template of {source.description} has no "
                "enable_thinking switch, so it would be ignored: unset enable_thinking (use "
                "response_prefix to steer the thinking instead)."
            )
        # What runs text-only prompts (Llama 4's vision-language class: its language model,
        # decoding with the model's generation config, as the model's own `generate` would);
        # `model` stays what is edited, named and saved.
        self.runner = text_runner(model)
        if self.runner is not model:
            self.runner.generation_config = model.generation_config
        self.layers = find_decoder_layers(model)
        self.sites: list[EditSite] = find_sites(model, self.layers, self.hidden_size)
        check_coverage(model, self.layers, self.sites, self.hidden_size)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model.eval()
        self.model.requires_grad_(False)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def config(self):
        """The transformers config (of the whole model; `get_text_config()` for the decoder)."""
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def architecture(self) -> str:
        """The transformers class the model loaded as, for messages."""
        return type(self.model).__name__

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @cached_property
    def residual_streams(self) -> int:
        """Residual streams per token of a layer's output: hyper-connections' hc_mult
        (DeepSeek V4, GLM-5-Next), else 1. A stored layer output is that many times the hidden
        size; read from one short pass, not from the config."""
        shapes: list[torch.Size] = []

        def hook(_module, _args, output):
            shapes.append(_module_output(output).shape)

        handle = self.layers[0].register_forward_hook(hook)
        try:
            with torch.inference_mode():
                ids = torch.tensor([[self.tokenizer.pad_token_id or 0] * 2], device=self.device)
                self.runner(input_ids=ids, use_cache=False)
        finally:
            handle.remove()
        return max(1, shapes[0][2:].numel() // self.hidden_size)

    def padded_tokens(
        self, prompts: Sequence[str], batch_size: int, continuations: Sequence[str] | None = None
    ) -> int:
        """Token positions (padding included) of the batches of a pass over `prompts`."""
        total = 0
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            extra = None if continuations is None else continuations[start : start + batch_size]
            total += len(chunk) * self.encode(chunk, extra)["input_ids"].shape[1]
        return total

    @property
    def nbytes(self) -> int:
        """Size of the model's parameters in memory."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    @property
    def quantization(self) -> list[str]:
        """How the edit sites' weights are stored when not in plain floats (a model loaded in
        4/8 bits, an FP8 checkpoint as loaded on a GPU); empty for a plain model."""
        return sorted({f for site in self.sites for f in site.quantization})

    def compile(self) -> None:
        """torch.compile the forward pass (dynamic shapes: batches and lengths vary); refused
        for a quantized model (compiling through bitsandbytes' kernels is unsupported here,
        and --compile needs an in-place reset strategy, which quantized weights rule out)."""
        if self.quantization:
            raise ModelLoadError(
                f"--compile is not supported on a quantized model ({', '.join(self.quantization)}"
                "): drop --compile."
            )
        self.runner.forward = torch.compile(self.runner.forward, dynamic=True)

    def greedy(self, max_new_tokens: int, **inputs):
        """transformers' `generate`, greedy, with the tokenizer's pad token: the one way the
        search, the chat and the decoders generate (extra keyword arguments pass through:
        input ids, mask, cache, streamer)."""
        return self.runner.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # ----- prompts -------------------------------------------------------------------------

    def format_messages(self, messages: list[dict[str, str]]) -> str:
        """A conversation as the model sees it, up to where its next response starts: the
        template's generation prompt (with the thinking switch when set), then the response
        prefix, which is part of the prompt for every pass (directions, KL, responses)."""
        switch = {}
        if self.reasoning.enable_thinking is not None:
            switch["enable_thinking"] = self.reasoning.enable_thinking
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **switch
        )
        return text + self.reasoning.response_prefix

    def format_chat(self, prompt: str) -> str:
        """The prompt as the model sees it, up to where its response starts."""
        user = {"role": "user", "content": prompt}
        messages = [user]
        if self.system_prompt:
            messages = [{"role": "system", "content": self.system_prompt}, user]
        try:
            return self.format_messages(messages)
        except Exception:
            if not self.system_prompt:
                raise
            # Some templates (Gemma's older ones) reject a system role: fold it into the turn.
            merged = {"role": "user", "content": f"{self.system_prompt}\n\n{prompt}"}
            return self.format_messages([merged])

    @cached_property
    def reader(self) -> ResponseReader:
        """How this model's responses split into thinking and answer (see `reasoning`)."""
        probe = "Say hello."
        formatted = self.format_chat(probe)
        tail = formatted[formatted.rfind(probe) + len(probe) :]
        open_at_start = open_block(tail)
        tokenizer = self.tokenizer
        added = getattr(tokenizer, "added_tokens_decoder", {})
        special = set(tokenizer.all_special_tokens)
        special |= {t.content for t in added.values() if getattr(t, "special", False)}
        names = [str(tokenizer.chat_template), *(t.content for t in added.values())]
        return ResponseReader(
            decode=lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip),
            special_tokens=tuple(special),
            open_at_start=open_at_start,
            may_think=open_at_start is not None or mentions_thinking(names),
        )

    def encode(
        self, prompts: Sequence[str], continuations: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Token ids of the formatted prompts, each followed by its continuation when given
        (the base model's chain of thought, so that a pass predicts the first answer token)."""
        texts = [self.format_chat(p) for p in prompts]
        if continuations is not None:
            texts = [t + c for t, c in zip(texts, continuations, strict=True)]
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.device) for k, v in batch.items()}

    # ----- batched passes ------------------------------------------------------------------

    @torch.inference_mode()
    def residuals(
        self, prompts: Sequence[str], batch_size: int, progress: Callable[[int], None] | None = None
    ) -> torch.Tensor:
        """Residual stream after every decoder layer at the last prompt token.

        Returns float32 (n_prompts, n_layers, hidden). Captured with hooks on the layers, so the
        final norm is never mixed in and the LM head is never computed.
        """
        (residuals,) = self._last_token_outputs(
            [(list(self.layers), torch.float32)], prompts, batch_size, progress
        )
        return residuals

    @torch.inference_mode()
    def residuals_and_module_outputs(
        self, prompts: Sequence[str], batch_size: int, progress: Callable[[int], None] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`residuals`, plus what each component writes into the residual stream at the last
        prompt token, from the same forward pass (the fitted readouts need both).

        The module outputs are (n_prompts, n_layers, len(COMPONENTS), hidden) in bfloat16: half
        the memory of float32, and the fits that use them work in float64. A component with
        several sites in a layer gets their sum (a readout applied to each site reads the sum,
        since the edit is linear); one with none gets zeros.
        """
        residuals, outputs = self._last_token_outputs(
            [(list(self.layers), torch.float32), ([s.module for s in self.sites], torch.float32)],
            prompts,
            batch_size,
            progress,
        )
        summed = torch.zeros(len(prompts), self.n_layers, len(COMPONENTS), self.hidden_size)
        for index, site in enumerate(self.sites):
            summed[:, site.layer, COMPONENTS.index(site.component)] += outputs[:, index]
        return residuals, summed.to(torch.bfloat16)

    def _last_token_outputs(
        self,
        groups: list[tuple[list[nn.Module], torch.dtype]],
        prompts: Sequence[str],
        batch_size: int,
        progress: Callable[[int], None] | None = None,
    ) -> list[torch.Tensor]:
        """One pass over `prompts`; per group of modules, their outputs at the last prompt
        token as (n_prompts, len(modules), width) in the group's dtype. A module that sees its
        input flattened to (tokens, width) (expert blocks) is read at each row's last token."""
        captured: list[list[torch.Tensor | None]] = [[None] * len(m) for m, _ in groups]
        rows = [0]

        def make_hook(group: int, i: int, dtype: torch.dtype):
            def hook(_module, _inputs, output):
                h = last_position(_module_output(output), rows[0])
                captured[group][i] = h.to(dtype).cpu()

            return hook

        handles = [
            module.register_forward_hook(make_hook(g, i, dtype))
            for g, (modules, dtype) in enumerate(groups)
            for i, module in enumerate(modules)
        ]
        out: list[list[torch.Tensor]] = [[] for _ in groups]
        try:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                rows[0] = len(chunk)
                self._base_model()(**self.encode(chunk), use_cache=False)
                for g in range(len(groups)):
                    out[g].append(torch.stack(captured[g], dim=1))  # type: ignore[arg-type]
                if progress:
                    progress(len(chunk))
        finally:
            for h in handles:
                h.remove()
        return [torch.cat(parts) for parts in out]

    def _base_model(self) -> nn.Module:
        """The runner without its LM head where it can go (residual passes need no logits):
        its base model, or the decoder of a language model that names no base model."""
        base = getattr(self.runner, "base_model", None)
        if isinstance(base, nn.Module) and base is not self.runner:
            return base
        return self.runner.get_decoder() if self.runner is not self.model else self.runner

    @torch.inference_mode()
    def first_token_logprobs(
        self,
        prompts: Sequence[str],
        batch_size: int,
        *,
        record: LayerOutputs | None = None,
        resume: LayerOutputs | None = None,
        start_layer: int = 0,
        continuations: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Log-probabilities (float32, n_prompts x vocab) of the first response token (after
        each prompt's continuation, when given).

        `record` stores the outputs of its checkpoint layers for every batch of this pass;
        `resume` (from a pass over the same prompts and batch size) skips every layer below
        `start_layer` down to its nearest checkpoint, which replays its stored output instead.
        """
        skip_to = -1 if resume is None else resume.checkpoint_below(start_layer)
        out = []
        for index, start in enumerate(range(0, len(prompts), batch_size)):
            extra = None if continuations is None else continuations[start : start + batch_size]
            batch = self.encode(prompts[start : start + batch_size], extra)
            with contextlib.ExitStack() as stack:
                if record is not None:
                    stack.enter_context(self._recording(record))
                if skip_to >= 0:
                    stack.enter_context(self._replaying(resume, index, skip_to))  # type: ignore[arg-type]
                logits = self.runner(**batch, use_cache=False, logits_to_keep=1).logits[:, -1, :]
            out.append(torch.log_softmax(logits.float(), dim=-1).cpu())
        return torch.cat(out)

    @contextlib.contextmanager
    def _recording(self, record: LayerOutputs) -> Iterator[None]:
        batch_outputs: dict[int, torch.Tensor] = {}

        def make_hook(i: int):
            def hook(_module, _inputs, output):
                record.tuple_output = len(output) if isinstance(output, tuple) else 0
                batch_outputs[i] = record.keep(i, output)

            return hook

        handles = [self.layers[i].register_forward_hook(make_hook(i)) for i in record.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        record.batches.append(batch_outputs)

    @contextlib.contextmanager
    def _replaying(self, resume: LayerOutputs, batch_index: int, upto: int) -> Iterator[None]:
        """Layers 0..upto-1 pass their input through untouched (nothing reads it: the next
        layer is skipped too); layer `upto` returns its stored output for this batch, a tuple's
        extras included (the next layer may read them)."""
        stored = resume.stored(batch_index, upto)
        # A skipped layer returning a tuple (hidden states, attention weights, ...) gets the
        # same arity; its extras are None, as they are without output_attentions.
        extras = (None,) * max(int(resume.tuple_output) - 1, 0)
        wrap = (lambda h: (h, *extras)) if resume.tuple_output else (lambda h: h)

        def passthrough(*args, **kwargs):
            return wrap(args[0] if args else kwargs["hidden_states"])

        def replay(*_args, **_kwargs):
            return stored

        for i in range(upto + 1):
            self.layers[i].forward = replay if i == upto else passthrough
        try:
            yield
        finally:
            for i in range(upto + 1):
                del self.layers[i].forward

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        batch_size: int,
        is_decided: Callable[[str, str], bool] | None = None,
    ) -> list[str]:
        """Greedy responses. A sequence for which `is_decided(text, prompt)` is true stops
        early."""
        responses: list[str] = []
        for chunk in self.generate_chunks(prompts, max_new_tokens, batch_size, is_decided):
            responses += chunk
        return responses

    def refused_chunks(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        batch_size: int,
        is_refusal: Callable[[str, str], bool],
    ) -> Iterator[list[bool]]:
        """Whether each greedy response is a refusal, one list per batch (in prompt order):
        its answer as `is_refusal` judges it (decoding stops once it does), or no answer at all
        (still thinking at the cap)."""
        for start in range(0, len(prompts), batch_size):
            decoding = self.decoding(
                prompts[start : start + batch_size], max_new_tokens, is_refusal
            )
            while not decoding.done:
                decoding.step()
            yield [
                decoding.unanswered(row) or is_refusal(decoding.response(row), decoding.prompt(row))
                for row in range(decoding.n_rows)
            ]

    def generate_chunks(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        batch_size: int,
        is_decided: Callable[[str, str], bool] | None = None,
        check_every: int = 8,
    ) -> Iterator[list[str]]:
        """Greedy responses, one list per batch (in prompt order), so a caller can stop early."""
        for start in range(0, len(prompts), batch_size):
            decoding = self.decoding(
                prompts[start : start + batch_size], max_new_tokens, is_decided, check_every
            )
            while not decoding.done:
                decoding.step()
            yield decoding.responses()

    def decoding(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        is_decided: Callable[[str, str], bool] | None = None,
        check_every: int = 8,
        max_thinking_tokens: int | None = None,
    ) -> Decoding:
        """Greedy decoding of one batch, advanced `check_every` tokens per `step()`; a thinking
        cap other than the model's with `max_thinking_tokens`."""
        decoding = Decoding(self, prompts, max_new_tokens, is_decided, check_every)
        if max_thinking_tokens is not None:
            decoding.max_thinking_tokens = max_thinking_tokens
        return decoding

    def length_order(self, prompts: Sequence[str]) -> list[int]:
        """Prompt indices sorted by token length (stable), so batches of neighbours need
        little padding: padded positions cost as much compute as real ones."""
        lengths = [
            len(self.tokenizer(self.format_chat(p), add_special_tokens=False)["input_ids"])
            for p in prompts
        ]
        return sorted(range(len(prompts)), key=lambda i: lengths[i])

    def _stop_token_ids(self) -> set[int]:
        ids = self.model.generation_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _short_pass(self, prompts: Sequence[str], tokens: int) -> None:
        """Decode about `tokens` tokens per prompt in one batch, thinking or not (a thinking
        model would otherwise run to its thinking cap, and timing batch sizes would take ages)."""
        decoding = self.decoding(prompts, tokens, max_thinking_tokens=tokens)
        while not decoding.done:
            decoding.step()

    def find_batch_size(
        self, prompts: Sequence[str], max_batch_size: int, reserve_bytes: int = 0
    ) -> int:
        """The batch size with the best generation throughput that fits in memory, with
        `reserve_bytes` of the model's accelerator held back meanwhile (what the search will
        keep there besides the batches: the stored layer outputs)."""
        best_size, best_rate = 1, 0.0
        size = min(8, max_batch_size)
        with self._reserved(reserve_bytes):
            while size <= max_batch_size:
                rate = self._throughput([prompts[i % len(prompts)] for i in range(size)])
                if rate is None or rate < best_rate * 1.05:
                    break
                best_size, best_rate = size, max(rate, best_rate)
                size *= 2
        return best_size

    def _throughput(self, sample: list[str]) -> float | None:
        """Prompts per second of a short greedy pass over `sample`; None when out of memory."""
        try:
            self._short_pass(sample[: min(4, len(sample))], 2)  # warm-up
            start = time.perf_counter()
            self._short_pass(sample, 8)
            return len(sample) / (time.perf_counter() - start)
        except torch.OutOfMemoryError:
            return None
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _reserved(self, n_bytes: int) -> Iterator[None]:
        """Hold `n_bytes` of the model's accelerator (nothing on a CPU, whose memory the
        batch size search does not probe)."""
        held = None
        if n_bytes > 0 and self.device.type != "cpu":
            held = torch.empty(n_bytes, dtype=torch.uint8, device=self.device)
        try:
            yield
        finally:
            del held


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    start = time.perf_counter()
    yield lambda: time.perf_counter() - start
