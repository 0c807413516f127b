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
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from heretic.errors import ModelLoadError

# Component names used everywhere (parameters, metadata, warm-start profiles): the token mixer
# and the channel mixer of a layer.
ATTN = "attn.o_proj"
MLP = "mlp.down_proj"
COMPONENTS = (ATTN, MLP)
COMPONENT_ROLES = {ATTN: "token mixer", MLP: "channel mixer"}

# Operations that move or copy values without mixing channels.
_SHAPE_OPS = {
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "CloneBackward0",
    "ToCopyBackward0",
    "AliasBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "UnsqueezeBackward0",
    "ExpandBackward0",
    "SliceBackward0",
    "SelectBackward0",
    "IndexBackward0",
    "IndexSelectBackward0",
    "PermuteBackward0",
    "TransposeBackward0",
    "TransposeBackward1",
    "TBackward0",
}
_TRANSPOSES = {"TransposeBackward0", "TransposeBackward1", "TBackward0"}
_MATMULS = {"MmBackward0", "BmmBackward0", "AddmmBackward0", "GroupedMmBackward0"}
# Linear in a block's output: followed inside a block when reading its writer tensors.
_LINEAR_OPS = {"SumBackward1", "IndexAddBackward0", "CatBackward0", "StackBackward0"}


@dataclass(eq=False)
class WriterTensor:
    """A parameter that an edit of its site changes, with its residual (output) axis.

    `expert_axis` is set for fused expert tensors (E, out, in) / (E, in, out) and their
    per-expert biases (E, out).
    """

    name: str
    param: nn.Parameter
    out_axis: int
    expert_axis: int | None = None


@dataclass(eq=False)
class EditSite:
    """One residual writer of one decoder layer: the module whose output a hook edits, and the
    tensors a merge, an in-place reset, an adapter and a GGUF export change.

    `gain` is the elementwise gain of a norm applied to the module's output before it is added
    to the residual (Gemma's post-norms): removing the unit direction `normalize(gain * r)` from
    the module's output removes r from what the norm writes, since an RMS norm only rescales its
    input as a whole before the gain.
    """

    layer: int
    component: str
    name: str
    module: nn.Module
    weights: list[WriterTensor]
    biases: list[WriterTensor] = field(default_factory=list)
    gain: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        if isinstance(self.module, nn.Linear):
            return "linear"
        return "experts" if any(w.expert_axis is not None for w in self.weights) else "block"

    @property
    def is_linear(self) -> bool:
        return self.kind == "linear"

    def direction(self, r: torch.Tensor) -> torch.Tensor:
        """The unit direction to remove from this module's output for the residual direction r."""
        if self.gain is None:
            return r
        u = self.gain.to(device=r.device, dtype=torch.float32) * r.float()
        return u / u.norm().clamp_min(1e-12)

    def tensors(self) -> list[WriterTensor]:
        return [*self.weights, *self.biases]

    def describe(self) -> str:
        return f"{self.name} ({type(self.module).__name__}, {COMPONENT_ROLES[self.component]})"


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


def sites_by_layer(sites: Sequence[EditSite], n_layers: int) -> list[list[EditSite]]:
    out: list[list[EditSite]] = [[] for _ in range(n_layers)]
    for site in sites:
        out[site.layer].append(site)
    return out


def _children(fn) -> list:
    return [c for c, _ in fn.next_functions if c is not None]


def _is_scale(fn) -> bool:
    """A multiplication or division by a constant (python number or a tensor without grad)."""
    name = type(fn).__name__
    if name in ("MulBackward1", "DivBackward1"):
        return True
    if name in ("MulBackward0", "DivBackward0"):
        return len(_children(fn)) == 1 and any(c is None for c, _ in fn.next_functions)
    return False


def _skip_shape_ops(fn):
    while fn is not None and (type(fn).__name__ in _SHAPE_OPS or _is_scale(fn)):
        children = _children(fn)
        if len(children) != 1:
            break
        fn = children[0]
    return fn


def residual_branches(fn, layer_input: torch.Tensor) -> list | None:
    """The branches added onto the residual path from the layer's input to `fn`, or None when
    `fn` does not reach the input through additions and shape operations alone."""
    fn = _skip_shape_ops(fn)
    if type(fn).__name__ == "AccumulateGrad" and fn.variable is layer_input:
        return []
    if fn is None or type(fn).__name__ not in ("AddBackward0", "SubBackward0"):
        return None
    children = _children(fn)
    for i, child in enumerate(children):
        found = residual_branches(child, layer_input)
        if found is not None:
            return found + children[:i] + children[i + 1 :]
    return None


def _norm_gain(norm: nn.Module, hidden: int, name: str) -> torch.Tensor:
    """The elementwise gain g of an RMS-style norm (norm(x) = g * x / rms(x)), checked on a
    random input; a norm that subtracts the mean (LayerNorm) or adds a bias is not one."""
    param = next(norm.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    ones = torch.ones(1, hidden, device=device, dtype=dtype)
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    with torch.no_grad():
        gain = norm(ones).float().reshape(-1)
        got = norm(x).float().reshape(-1)
    x32 = x.float().reshape(-1)
    expected = gain * x32 / x32.pow(2).mean().sqrt()
    tolerance = 1e-3 if dtype == torch.float32 else 5e-2
    if not torch.allclose(got, expected, rtol=tolerance, atol=tolerance * float(gain.abs().max())):
        raise ModelLoadError(
            f"{name} ({type(norm).__name__}) normalizes a residual writer's output but is not an "
            "RMS norm (it centers or shifts its input), so no edit of the writer can remove a "
            "direction from what it adds. This architecture is not supported."
        )
    return gain.cpu()


@dataclass
class _Trace:
    """What one probing forward pass recorded about the modules of a layer."""

    names: dict[nn.Module, str]
    outputs: dict[object, list[nn.Module]] = field(default_factory=dict)  # grad_fn -> modules
    tensors: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    inputs: dict[nn.Module, object] = field(default_factory=dict)  # module -> input grad_fn
    input_tensors: dict[nn.Module, torch.Tensor] = field(default_factory=dict)


def _pick(modules: list[nn.Module]) -> nn.Module:
    """Of the modules that output the same tensor (inner ones first), the innermost one that
    holds weights of its own (a linear layer or a fused expert module), else the innermost."""
    for module in modules:
        if isinstance(module, nn.Linear) or any(
            p.dim() >= 2 for p in module.parameters(recurse=False)
        ):
            return module
    return modules[0]


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and not any(
        p.dim() >= 2 for p in module.parameters()
    )


def branch_modules(
    fn, trace: _Trace, hidden: int, layer_name: str
) -> list[tuple[nn.Module, torch.Tensor | None]]:
    """The writer modules of one residual branch, each with the gain of a post-norm (if any)."""
    candidates: list[nn.Module] = []
    while True:
        candidates.extend(trace.outputs.get(fn, []))
        inner = _skip_shape_ops(fn)
        if inner is fn:
            break
        fn = inner
    if candidates:
        module = _pick(candidates)
        if _is_norm(module):
            gain = _norm_gain(module, hidden, trace.names[module])
            found = branch_modules(trace.inputs[module], trace, hidden, layer_name)
            return [(m, gain if g is None else g * gain) for m, g in found]
        return [(module, None)]
    if fn is not None and type(fn).__name__ in ("AddBackward0", "SubBackward0"):
        return [
            found
            for child in _children(fn)
            for found in branch_modules(child, trace, hidden, layer_name)
        ]
    op = type(fn).__name__ if fn is not None else "a constant"
    raise ModelLoadError(
        f"{layer_name} adds something to the residual stream ({op}) that heretic cannot trace "
        "back to a module, so it cannot edit it. This architecture is not supported."
    )


def _param_chain(fn, params: dict[int, str]) -> tuple[nn.Parameter, int] | None:
    """The parameter an operand comes from (through indexing and shape operations), with the
    number of transposes on the way."""
    transposes = 0
    while fn is not None:
        name = type(fn).__name__
        if name == "AccumulateGrad":
            variable = fn.variable
            return (variable, transposes) if id(variable) in params else None
        if name not in _SHAPE_OPS:
            return None
        transposes += name in _TRANSPOSES
        children = _children(fn)
        if len(children) != 1:
            return None
        fn = children[0]
    return None


def _full_width_operands(fn) -> list:
    """Of a product's operands, those that carry the hidden values (not a per-row routing or
    gating weight, whose last axis is 1)."""
    shapes = []
    for attr in ("_saved_self", "_saved_other"):
        saved = getattr(fn, attr, None)
        shapes.append(tuple(saved.shape) if isinstance(saved, torch.Tensor) else None)
    children = [c for c, _ in fn.next_functions]
    # next_functions are (self, other); the gradient of self saves other and vice versa.
    keep = []
    for index, child in enumerate(children):
        own = shapes[index]
        if child is not None and (own is None or len(own) == 0 or own[-1] != 1):
            keep.append(child)
    return keep


class _TensorFinder:
    """Reads the writer tensors of a block (not a plain linear layer) from its output's graph:
    the matrices of the last matrix products before the output, the biases added after them."""

    def __init__(self, params: dict[int, str], hidden: int, site_name: str):
        self.params = params
        self.hidden = hidden
        self.site_name = site_name
        self.weights: dict[int, WriterTensor] = {}
        self.biases: dict[int, WriterTensor] = {}

    def walk(self, fn) -> None:
        stack, seen = [fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            name = type(node).__name__
            if name in _MATMULS:
                self._matmul(node)
            elif name in ("AddBackward0", "SubBackward0"):
                for child in _children(node):
                    if not self._bias(child):
                        stack.append(child)
            elif name in ("MulBackward0", "DivBackward0"):
                stack.extend(_full_width_operands(node))
            elif name in _SHAPE_OPS or name in _LINEAR_OPS or _is_scale(node):
                stack.extend(_children(node))

    def _record(self, target: dict[int, WriterTensor], param: nn.Parameter, out_axis: int):
        out_axis %= param.dim()
        if param.shape[out_axis] != self.hidden:
            raise ModelLoadError(
                f"{self.site_name} writes through {self.params[id(param)]} "
                f"{tuple(param.shape)}, whose output axis {out_axis} is not the hidden size "
                f"{self.hidden}. This architecture is not supported."
            )
        expert_axis = 0 if param.dim() == (3 if target is self.weights else 2) else None
        target[id(param)] = WriterTensor(self.params[id(param)], param, out_axis, expert_axis)

    def _matmul(self, node) -> None:
        children = [c for c, _ in node.next_functions]
        if type(node).__name__ == "AddmmBackward0":
            self._bias(children[0])
            children = children[1:]
        # out = a @ b: the weight is b (its last axis is the output unless transposed) or a.
        for position, child in enumerate(children[:2]):
            chain = _param_chain(child, self.params)
            if chain is None:
                continue
            param, transposes = chain
            if position == 1:
                out_axis = -1 if transposes % 2 == 0 else -2
            else:
                out_axis = -2 if transposes % 2 == 0 else -1
            self._record(self.weights, param, out_axis)

    def _bias(self, fn) -> bool:
        chain = _param_chain(fn, self.params)
        if chain is None or chain[0].dim() > 2:
            return False
        self._record(self.biases, chain[0], -1)
        return True


def _sibling_experts(found: list[WriterTensor], named: dict[str, nn.Parameter]) -> list:
    """Experts kept as a list of modules (`experts.3.down_proj.weight`): the graph shows only
    the experts the probe's tokens were routed to, so every sibling with the same path is added."""
    out: dict[str, WriterTensor] = {w.name: w for w in found}
    for tensor in found:
        match = re.match(r"(.*\.experts\.)\d+(\..*)$", tensor.name)
        if match is None:
            continue
        pattern = re.compile(re.escape(match.group(1)) + r"\d+" + re.escape(match.group(2)) + "$")
        for name, param in named.items():
            if pattern.match(name) and name not in out:
                out[name] = WriterTensor(name, param, tensor.out_axis, tensor.expert_axis)
    return list(out.values())


def _check_declared_orientation(module: nn.Module, site: str, weights: list[WriterTensor]):
    """Expert modules that declare their layout (`is_transposed`) must agree with the graph."""
    declared = getattr(module, "is_transposed", None)
    if declared is None:
        return
    for w in weights:
        if w.expert_axis is not None and (w.out_axis == 2) != bool(declared):
            raise ModelLoadError(
                f"{site}: {w.name} is used with its output on axis {w.out_axis}, but the module "
                f"declares is_transposed={declared}. This architecture is not supported."
            )


@dataclass
class _Probe:
    """Per decoder layer: its (detached, grad-requiring) input, its output and the trace."""

    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    traces: dict[int, _Trace] = field(default_factory=dict)


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _install_probe(layers: nn.ModuleList, names: dict[nn.Module, str], probe: _Probe) -> list:
    handles = []
    for index, layer in enumerate(layers):
        trace = probe.traces.setdefault(index, _Trace(names))

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
        model(input_ids=ids.unsqueeze(0).to(embeddings.weight.device), use_cache=False)
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


def _component(
    module: nn.Module, layer: nn.Module, trace: _Trace, layer_input: torch.Tensor
) -> str:
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
    trace: _Trace,
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
        weights = [WriterTensor(f"{name}.weight", module.weight, 0)]
        biases = [] if module.bias is None else [WriterTensor(f"{name}.bias", module.bias, 0)]
        return EditSite(layer, component, name, module, weights, biases, gain)
    finder = _TensorFinder(params, hidden, name)
    finder.walk(trace.tensors[module].grad_fn)
    if not finder.weights:
        raise ModelLoadError(
            f"{name} ({type(module).__name__}) writes into the residual stream of layer {layer}, "
            "but heretic finds no weight matrix behind its output to edit. This architecture is "
            "not supported."
        )
    weights = _sibling_experts(list(finder.weights.values()), named)
    biases = _sibling_experts(list(finder.biases.values()), named)
    _check_declared_orientation(module, name, weights)
    return EditSite(layer, component, name, module, weights, biases, gain)


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
        branches = residual_branches(out.grad_fn, x) if out is not None else None
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


def iter_tensors(sites: Sequence[EditSite]) -> Iterator[tuple[EditSite, WriterTensor]]:
    for site in sites:
        for tensor in site.tensors():
            yield site, tensor
