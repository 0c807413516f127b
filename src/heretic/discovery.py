"""Edit sites: every module whose output is added to the residual stream, found by following
the model's own computation rather than a list of module names.

Architectures name their residual writers differently (`o_proj`, `out_proj`, `dense`, `w2`,
`per_layer_projection`, fused expert tensors, Mamba mixers), run several in parallel, or
normalize a writer's output before adding it (Gemma's post-norms). A name list misses some and
then ships a half-edited model. Instead, `find_sites` runs one short forward pass with autograd
on and reads each decoder layer's graph: the layer output is its input plus a sum of branches
(the residual additions); each branch is traced back, through shape-only operations and
post-norms, to the module that produced it. That module is an edit site; the weights behind its
output (a linear layer's matrix and bias, or inside a block the final matrices of every expert
with their orientation) are read from the same graph, so the output axis of a fused 3-D expert
tensor is known from how it is multiplied, never guessed from its shape.

Each site is classified by what it mixes: a *token mixer* (attention, linear attention, Mamba,
short convolution: its output at one position depends on other positions) or a *channel mixer*
(dense MLP, mixture of experts, per-layer input projections). These are the user-facing
components `attn` and `mlp` (`ATTN`, `MLP`). A layer with only one of them, several of one
kind, or parallel writers is normal.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from heretic.errors import ModelLoadError
from heretic.graph import (
    TensorFinder,
    Trace,
    branch_modules,
    check_declared_orientation,
    normalized_residual,
    residual_branches,
    sibling_experts,
)
from heretic.sites import ATTN, MLP, EditSite, WriterTensor


def _text_decoder(model: nn.Module) -> nn.Module:
    """The text decoder (a vision-language model's `language_model`), never a vision or audio
    tower, whose layers can be as many as the decoder's."""
    get_decoder = getattr(model, "get_decoder", None)
    if get_decoder is not None:
        with contextlib.suppress(Exception):
            decoder = get_decoder()
            if isinstance(decoder, nn.Module):
                return decoder
    return model


_TEXT_RUNNERS = {"Llama4ForConditionalGeneration": "language_model"}
"""Vision-language classes run through their language model (a complete causal LM: embedding,
decoder, LM head) on text-only prompts, by the attribute that holds it. Only classes whose
text-only forward is exactly that language model on the same ids, read from transformers' code:
Llama 4's embeds the ids with the language model's own embedding and passes them on with the
mask, positions and cache untouched. In transformers 5.24 its forward fails for every input,
after all layers have run, building its output from a field the language model's output lacks
(`outputs.image_outputs`). Other classes always run whole."""


def text_runner(model: nn.Module) -> nn.Module:
    """The module that runs a text-only prompt (forward passes and generation): the model
    itself, or for the classes of `_TEXT_RUNNERS` their language model. The model's own names,
    weights and saved form stay the whole model's (the output still takes images)."""
    attribute = _TEXT_RUNNERS.get(type(model).__name__)
    runner = getattr(model, attribute, None) if attribute else None
    return runner if isinstance(runner, nn.Module) else model


_TOWERS = ("vision", "visual", "audio", "image", "speech")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The text decoder's layers, found structurally so that new architectures need no table
    entry."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    n_layers = getattr(text_config, "num_hidden_layers", None)
    candidates = []
    for root in (_text_decoder(model), model):
        candidates = [
            (name, module)
            for name, module in root.named_modules()
            if isinstance(module, nn.ModuleList)
            and len(module) > 0
            and not any(tower in name.lower() for tower in _TOWERS)
        ]
        for name, module in candidates:
            if name.endswith("layers") and (n_layers is None or len(module) == n_layers):
                return module
    names = ", ".join(name for name, _ in candidates) or "none"
    raise ModelLoadError(
        f"Cannot find the decoder layers of {type(model).__name__} "
        f"(expected a ModuleList named '*layers' with {n_layers} entries; found: {names}). "
        "This architecture is not supported yet."
    )


def discover_sites(model: nn.Module) -> list[EditSite]:
    """The edit sites of a transformers model (its text decoder's layers)."""
    hidden = int(model.config.get_text_config().hidden_size)
    return find_sites(model, find_decoder_layers(model), hidden)


@dataclass
class _Probe:
    """Per decoder layer: its (detached, grad-requiring) input, its output and the trace."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    traces: dict[int, Trace] = field(default_factory=dict)


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _install_probe(layers: nn.ModuleList, names: dict[nn.Module, str], probe: _Probe) -> list:
    handles = []
    for index, layer in enumerate(layers):
        trace = probe.traces.setdefault(index, Trace(names, dict(layer.named_parameters())))

        def pre_hook(_module, args, kwargs, index=index):
            # A fresh leaf per layer isolates each layer's graph from the layers below it.
            if args:
                x = args[0].detach().requires_grad_(True)
                probe.inputs[index] = x
                return (x, *args[1:]), kwargs
            x = kwargs["hidden_states"].detach().requires_grad_(True)
            probe.inputs[index] = x
            return args, {**kwargs, "hidden_states": x}

        def post_hook(_module, _args, output, index=index):
            probe.outputs[index] = _first_tensor(output)

        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook))
        for _, module in layer.named_modules():
            if module is layer:
                continue

            def record(module, args, kwargs, output, trace=trace):
                tensor = _first_tensor(output)
                if tensor is not None and tensor.grad_fn is not None:
                    trace.outputs.setdefault(tensor.grad_fn, []).append(module)
                    trace.tensors.setdefault(module, tensor)
                first = _first_tensor(args)
                if first is None:
                    first = kwargs.get("hidden_states")
                if isinstance(first, torch.Tensor) and first.requires_grad:
                    trace.input_tensors.setdefault(module, first)
                    if first.grad_fn is not None:
                        trace.inputs.setdefault(module, first.grad_fn)

            handles.append(module.register_forward_hook(record, with_kwargs=True))
    return handles


def _run_probe(model: nn.Module, layers: nn.ModuleList, n_tokens: int = 6) -> _Probe:
    names = {module: name for name, module in model.named_modules()}
    probe = _Probe()
    params = [p for p in model.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    handles = _install_probe(layers, names, probe)
    embeddings = model.get_input_embeddings()
    vocab = embeddings.weight.shape[0]
    ids = (torch.arange(n_tokens) * 7919 + 11) % vocab
    try:
        for p in params:
            p.requires_grad_(True)
        text_runner(model)(input_ids=ids.unsqueeze(0).to(embeddings.weight.device), use_cache=False)
    except Exception as e:
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise ModelLoadError(
            f"{type(model).__name__} fails on a text-only prompt ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}), so heretic cannot run it. This is "
            "a problem of the model's code in this transformers version."
        ) from e
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    missing = [i for i in range(len(layers)) if i not in probe.outputs]
    if missing:
        raise ModelLoadError(
            f"Decoder layers {missing} did not run on a text prompt: heretic cannot find what "
            "they write into the residual stream."
        )
    return probe


def _component(module: nn.Module, layer: nn.Module, trace: Trace, layer_input: torch.Tensor) -> str:
    """ATTN when the module's output at the last position depends on earlier positions of what
    its branch reads (the input of the layer's child that holds it): attention, linear
    attention, Mamba and convolutions do; MLPs, experts and per-layer projections do not."""
    reads = layer_input
    for child in layer.children():
        if module is child or any(m is module for m in child.modules()):
            reads = trace.input_tensors.get(child, layer_input)
            break
    out = trace.tensors[module]
    last = out.reshape(-1, out.shape[-1])[-1]
    probe = torch.randn(last.shape, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(
        (last.float() * probe.to(last.device)).sum(),
        reads,
        retain_graph=True,
        allow_unused=True,
    )
    if grad is None:
        return MLP
    return ATTN if bool(grad.reshape(-1, grad.shape[-1])[:-1].abs().sum() > 0) else MLP


def _site(
    module: nn.Module,
    gain: torch.Tensor | None,
    layer: int,
    component: str,
    trace: Trace,
    params: dict[int, str],
    named: dict[str, nn.Parameter],
    hidden: int,
) -> EditSite:
    name = trace.names[module]
    if isinstance(module, nn.Linear):
        if module.out_features != hidden:
            raise ModelLoadError(
                f"{name} writes into the residual stream but has {module.out_features} outputs, "
                f"not the hidden size {hidden}. This architecture is not supported."
            )
        weights = [WriterTensor(f"{name}.weight", module.weight, 0, owner=module)]
        biases = []
        if module.bias is not None:
            biases = [WriterTensor(f"{name}.bias", module.bias, 0, owner=module)]
        return EditSite(layer, component, name, module, weights, biases, gain)
    finder = TensorFinder(params, hidden, name)
    finder.walk(trace.tensors[module].grad_fn)
    if not finder.weights:
        raise ModelLoadError(
            f"{name} ({type(module).__name__}) writes into the residual stream of layer {layer}, "
            "but heretic finds no weight matrix behind its output to edit. This architecture is "
            "not supported."
        )
    weights = sibling_experts(list(finder.weights.values()), named)
    biases = sibling_experts(list(finder.biases.values()), named)
    check_declared_orientation(module, name, weights)
    return EditSite(layer, component, name, module, weights, biases, gain)


def _refuse_normalized_residual(
    layer: nn.Module,
    layer_name: str,
    out: torch.Tensor,
    x: torch.Tensor,
    trace: Trace,
    hidden: int,
) -> None:
    """Stop at a layer that adds a norm of its own residual back into it (Gemma 3n's LAuReL
    block): its residual is rescaled per channel, which no edit of the writers can keep a
    direction out of (`graph.normalized_residual`)."""
    found = normalized_residual(out.grad_fn, x, trace, hidden)
    if found is None:
        return
    norm, via = found
    adder = f"{trace.names[via]} ({type(via).__name__})" if via is not None else "the layer"
    raise ModelLoadError(
        f"{layer_name} ({type(layer).__name__}): {adder} adds the output of "
        f"{trace.names[norm]} ({type(norm).__name__}), the layer's own residual normalized "
        "with a per-channel gain, back into the residual stream without a weight. A residual "
        "free of a direction r is no longer free of it after a per-channel gain, so no edit of "
        "the writers removes r completely, and heretic cannot edit this model. This "
        "architecture is not supported."
    )


def find_sites(model: nn.Module, layers: nn.ModuleList, hidden: int) -> list[EditSite]:
    """Every residual writer of every decoder layer, from one probing forward pass."""
    with torch.inference_mode(False), torch.enable_grad():
        return _find_sites(model, layers, hidden)


def _find_sites(model: nn.Module, layers: nn.ModuleList, hidden: int) -> list[EditSite]:
    probe = _run_probe(model, layers)
    named = dict(model.named_parameters())
    params = {id(p): name for name, p in named.items()}
    sites: list[EditSite] = []
    for index in range(len(layers)):
        trace, x = probe.traces[index], probe.inputs[index]
        layer_name = trace.names[layers[index]] or f"layer {index}"
        out = probe.outputs[index]
        if out is not None:
            _refuse_normalized_residual(layers[index], layer_name, out, x, trace, hidden)
        branches = residual_branches(out.grad_fn, x, hidden) if out is not None else None
        if not branches:
            raise ModelLoadError(
                f"{layer_name} ({type(layers[index]).__name__}) does not add its writers onto "
                "its input (no residual connection found), so heretic cannot edit it."
            )
        found: dict[nn.Module, torch.Tensor | None] = {}
        for branch in branches:
            for module, gain in branch_modules(branch, trace, hidden, layer_name):
                found.setdefault(module, gain)
        for module, gain in found.items():
            component = _component(module, layers[index], trace, x)
            sites.append(_site(module, gain, index, component, trace, params, named, hidden))
    return sites
