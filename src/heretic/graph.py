"""Reading a decoder layer's autograd graph: which branches join the residual stream, which
module produced each, and which weight tensors (with their output axis) are behind a block.

`discovery.py` runs one probing forward pass with autograd on; the functions here walk the
recorded graph. They only look at operation types, never at module or parameter names, so a new
architecture needs no table entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from heretic.errors import ModelLoadError
from heretic.sites import WriterTensor

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


def _skip_shape_ops(fn, steps: int | None = None):
    while fn is not None and (type(fn).__name__ in _SHAPE_OPS or _is_scale(fn)):
        children = _children(fn)
        if len(children) != 1 or steps == 0:
            break
        fn = children[0]
        steps = None if steps is None else steps - 1
    return fn


def residual_branches(fn, layer_input: torch.Tensor, hidden: int) -> list | None:
    """The branches added onto the residual path from the layer's input to `fn`, or None when
    `fn` does not reach the input through additions, shape operations and stream mixing alone.

    Stream mixing is a matrix product `M @ streams` with the residual on the right and its last
    axis the hidden size: hyper-connections (DeepSeek V4, GLM-5-Next) keep `hc_mult` residual
    streams [B, S, N, D] and carry them to the next layer as `comb^T @ streams`. Each output
    stream is a linear combination of input streams, so streams free of a direction r stay free
    of it, whatever the (input-dependent) weights: the edit is the plain residual one."""
    fn = _skip_shape_ops(fn)
    if type(fn).__name__ == "AccumulateGrad" and fn.variable is layer_input:
        return []
    if type(fn).__name__ in ("BmmBackward0", "MmBackward0"):
        streams = _stream_mix_operand(fn, hidden)
        return None if streams is None else residual_branches(streams, layer_input, hidden)
    if fn is None or type(fn).__name__ not in ("AddBackward0", "SubBackward0"):
        return None
    children = _children(fn)
    for i, child in enumerate(children):
        found = residual_branches(child, layer_input, hidden)
        if found is not None:
            return found + children[:i] + children[i + 1 :]
    return None


def _stream_mix_operand(fn, hidden: int):
    """The right operand of a product `M @ X` whose rows are hidden-size vectors (X: [.., N, D],
    M: [.., N', N]): a combination of X's rows that never mixes channels. None otherwise."""
    left, right = (getattr(fn, attr, None) for attr in ("_saved_self", "_saved_mat2"))
    if not isinstance(left, torch.Tensor) or not isinstance(right, torch.Tensor):
        return None
    if right.dim() < 2 or right.shape[-1] != hidden or left.shape[-1] != right.shape[-2]:
        return None
    return fn.next_functions[1][0]


def _row_gain_operand(fn, hidden: int):
    """For `gain * x` with a gain of one scalar per row (last axis 1: hyper-connections' `post`
    weight per stream, [B, S, N, 1] times a block output [B, S, 1, D]), the operand x: scaling
    a vector free of r as a whole keeps it free of r. None for any other product."""
    if type(fn).__name__ != "MulBackward0":
        return None
    # next_functions are (self, other), the operands saved as _saved_self and _saved_other.
    saved = [getattr(fn, attr, None) for attr in ("_saved_self", "_saved_other")]
    if not all(isinstance(s, torch.Tensor) and s.dim() > 0 for s in saved):
        return None
    for index, (own, other) in enumerate([(saved[0], saved[1]), (saved[1], saved[0])]):
        if own.shape[-1] == hidden and other.shape[-1] == 1:
            return fn.next_functions[index][0]
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
class Trace:
    """What one probing forward pass recorded about the modules of a layer."""

    names: dict[nn.Module, str]
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    outputs: dict[object, list[nn.Module]] = field(default_factory=dict)  # grad_fn -> modules
    tensors: dict[nn.Module, torch.Tensor] = field(default_factory=dict)
    inputs: dict[nn.Module, object] = field(default_factory=dict)  # module -> input grad_fn
    input_tensors: dict[nn.Module, torch.Tensor] = field(default_factory=dict)


def _is_weighted(module: nn.Module) -> bool:
    """A module with a weight matrix of its own (a linear layer, fused experts): its output is
    a writer's, never the residual carried through."""
    return isinstance(module, nn.Linear) or any(
        p.dim() >= 2 for p in module.parameters(recurse=False)
    )


def _pick(modules: list[nn.Module]) -> nn.Module:
    """Of the modules that output the same tensor (inner ones first), the innermost one that
    holds weights of its own (a linear layer or a fused expert module), else the innermost."""
    for module in modules:
        if _is_weighted(module):
            return module
    return modules[0]


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower() and not any(
        p.dim() >= 2 for p in module.parameters()
    )


def branch_modules(
    fn, trace: Trace, hidden: int, layer_name: str
) -> list[tuple[nn.Module, torch.Tensor | None]]:
    """The writer modules of one residual branch, each with the gain of a post-norm (if any)."""
    candidates: list[nn.Module] = []
    while True:  # one node at a time: a module's output may sit between two shape operations
        candidates.extend(trace.outputs.get(fn, []))
        inner = _skip_shape_ops(fn, steps=1)
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
    scaled = _row_gain_operand(fn, hidden) if fn is not None else None
    if scaled is not None:
        return branch_modules(scaled, trace, hidden, layer_name)
    op = type(fn).__name__ if fn is not None else "a constant"
    variable = getattr(fn, "variable", None)
    if isinstance(variable, nn.Parameter):
        owner = next((n for n, p in trace.params.items() if p is variable), "a parameter")
        op = f"the parameter {owner} {tuple(variable.shape)}"
    raise ModelLoadError(
        f"{layer_name} adds something to the residual stream ({op}) that heretic cannot trace "
        "back to a module, so it cannot edit it. This architecture is not supported."
    )


# Copies of a tensor or of part of it (`x.repeat(...)`, a view written in place: `x[1:] += y`).
_COPIES = {"RepeatBackward0", "AsStridedBackward0", "CopySlices"}


def _weightless_inputs(fn, hidden: int) -> list:
    """The inputs that `fn` passes on without a weight: through copies, shape operations,
    additions, constant scales and gains of one scalar per row. Empty for any other operation."""
    name = type(fn).__name__
    if name in _SHAPE_OPS or name in _COPIES or name in ("AddBackward0", "SubBackward0"):
        return _children(fn)
    if _is_scale(fn):
        return _children(fn)
    operand = _row_gain_operand(fn, hidden)
    return [operand] if operand is not None else []


def _from_residual(
    tensor: torch.Tensor, layer_input: torch.Tensor, trace: Trace, hidden: int
) -> bool:
    """Whether `tensor` carries the layer's input on without a weight (the residual itself, a
    copy or a scalar-weighted sum of it), as a pre-norm's input does."""
    if tensor is layer_input:
        return True
    stack, seen = [tensor.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__ == "AccumulateGrad" and fn.variable is layer_input:
            return True
        if not any(_is_weighted(m) for m in trace.outputs.get(fn, [])):
            stack.extend(_weightless_inputs(fn, hidden))
    return False


def normalized_residual(
    fn, layer_input: torch.Tensor, trace: Trace, hidden: int
) -> tuple[nn.Module, nn.Module | None] | None:
    """A norm of the layer's own residual whose output the layer adds back into its residual
    without a weight (Gemma 3n's LAuReL block returns its normalized input plus its update),
    with the module that adds it (None when the layer does); None when there is none.

    The norm's output is `g * x / rms(x)`: the residual rescaled per channel by the gain g. A
    residual free of a direction r is not free of it after an elementwise gain (unless g is
    uniform), and no edit of the writers reaches it, so such a layer cannot be edited
    completely. The coverage check's random-direction probe sees it too (its coordinate axes
    cannot: an elementwise gain keeps a zero coordinate at zero), but only as a share of r
    kept; this names the norm."""
    stack, seen = [(fn, None)], set()
    while stack:
        node, via = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        modules = trace.outputs.get(node, [])
        norm = next((m for m in modules if _is_norm(m)), None)
        if norm is not None:
            reads = trace.input_tensors.get(norm)
            if reads is not None and _from_residual(reads, layer_input, trace, hidden):
                return norm, via
            continue  # a post-norm of a writer: what it normalizes is no residual
        if any(_is_weighted(m) for m in modules):
            continue
        # The innermost module whose own forward produced this node (not one returning its input).
        adders = [m for m in modules if trace.inputs.get(m) is not node]
        via = adders[0] if adders else via
        stack.extend((child, via) for child in _weightless_inputs(node, hidden))
    return None


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


class TensorFinder:
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


def sibling_experts(found: list[WriterTensor], named: dict[str, nn.Parameter]) -> list:
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


def check_declared_orientation(module: nn.Module, site: str, weights: list[WriterTensor]):
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
