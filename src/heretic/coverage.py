"""The coverage self-check: proof, on the loaded model, that the edit sites are every writer.

With every site of a layer at strength 1 and a layer input free of the direction r, the layer's
output must have no component along r. A writer that discovery missed (an unusual module, a
bias added outside any module, a second expert block) still writes along r, and so does a layer
that rescales its residual per channel (an elementwise gain on the residual, which no edit of the
writers reaches): the search would then tune a model it cannot fully edit, and heretic stops
before the search instead.

Two kinds of probe r, each run with the edit off (what the layer writes along r) and on:

- Coordinate axes e_k, chosen per layer, twice with different axes (so a writer that happens to
  write nothing along one axis is still seen). Removing an axis zeroes one coordinate, which is
  exact in any dtype, so the edited layer may keep only `RELATIVE_TOLERANCE` of what it writes.
  But an elementwise gain keeps a zero coordinate at zero: axes cannot see a per-channel rescale.
- One fixed-seed random unit direction per layer (a normalized Gaussian vector), which a
  per-channel gain g turns: `(g * x) . r` is not 0 for x free of r unless g is uniform. Removing
  it is exact only up to rounding, and that rounding is not small next to what the layer writes:
  it scales with the residual the layer carries, which can be hundreds of times larger (massive
  activations; on the organism in bf16 a complete edit keeps up to 128% of what a layer writes
  along r). So what the edited layer keeps counts only beyond `ROUNDING_TOLERANCE` *
  eps * (|x * r| + |y * r|) at each position (x the layer's input, y its output: the size of the
  rounding of a sum of elementwise products with r; eps that of the coarsest dtype the layer's
  input, output and edit sites run in: Mamba keeps its residual in float32 and edits in bf16),
  and the rest must stay within `RELATIVE_TOLERANCE` of what it writes. On a tiny Llama that sees
  a gain whose channels spread by 0.1% (standard deviation) in float32 and by 20% in bf16 (10%
  is within bf16's allowance and passes).

Each probe is two forward passes of six tokens, six in all: the random probe adds half to the
check's cost (0.41 -> 0.61 s on the organism on one CPU thread, of a 4.7 s load).

A layer with several residual streams (hyper-connections, [B, S, N, D]) has r removed from every
input stream and checked in every output stream: each output stream is a combination of input
streams plus the writers scaled per stream, so none may carry r.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from heretic.discovery import text_runner
from heretic.edit import EditHooks
from heretic.errors import ModelLoadError
from heretic.sites import COMPONENTS, EditSite

RELATIVE_TOLERANCE = 1e-3
"""What an edited layer may still write along r, as a share of what it writes unedited (beyond
rounding, for the random probe)."""

ROUNDING_TOLERANCE = 8.0
"""The random probe's allowance for rounding, in units of eps * (|x * r| + |y * r|). One
rounding of each element (relative error up to eps/2) moves `v . r` by about
eps/2 / sqrt(3) * |v * r|, and a layer rounds a few times (its input with r removed, each edit,
each residual addition). Of complete edits, the largest |y . r| measured in these units is 3.8 in
float32, whose dot products accumulate roundings of their own, and 2.0 in bf16, whose matrix
products accumulate in float32 and round once (every family of the architecture matrix; 2.8 and
0.8 on the organism); 8 leaves twice the largest."""

PROBE_SEED = 0
"""The seed of the probes (axes and random directions): the check is the same at every load."""


@dataclass
class LayerProbe:
    """One layer's output under a probe, per position (and stream): |y . r| and the rounding
    scale eps * (|x * r| + |y * r|) of the same position."""

    along: torch.Tensor
    rounding: torch.Tensor


def _first(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _without(x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """x with r removed along its last axis (float32 math, cast back): for an axis r exactly
    x with that coordinate zeroed."""
    r = r.to(x.device)
    xf = x.float()
    return (xf - (xf @ r).unsqueeze(-1) * r).to(x.dtype)


def probe_layers(
    model: nn.Module,
    layers: nn.ModuleList,
    sites: Sequence[EditSite],
    directions: torch.Tensor,
    ids: torch.Tensor,
) -> list[LayerProbe]:
    """One forward pass with directions[l] removed from the input of layer l; per layer, its
    output's component along that direction (whatever edit hooks are installed apply)."""
    n_layers = len(layers)
    eps = [0.0] * n_layers
    spread_in: list[torch.Tensor] = [torch.zeros(())] * n_layers
    found: list[LayerProbe | None] = [None] * n_layers

    def note_dtype(index: int, tensor: torch.Tensor) -> None:
        eps[index] = max(eps[index], torch.finfo(tensor.dtype).eps)

    def pre_hook(_module, args, kwargs, index=0):
        x = _without(args[0] if args else kwargs["hidden_states"], directions[index])
        note_dtype(index, x)
        spread_in[index] = (x.float() * directions[index].to(x.device)).norm(dim=-1).cpu()
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    def post_hook(_module, _args, output, index=0):
        y = _first(output)
        note_dtype(index, y)
        r = directions[index].to(y.device)
        spread = (y.float() * r).norm(dim=-1).cpu()
        x_spread = spread_in[index]
        spread = spread + (x_spread if x_spread.shape == spread.shape else x_spread.amax())
        found[index] = LayerProbe((y.float() @ r).abs().cpu(), eps[index] * spread)

    handles = [
        site.module.register_forward_hook(
            lambda _m, _a, out, index=site.layer: note_dtype(index, _first(out))
        )
        for site in sites
    ]
    for index, layer in enumerate(layers):
        handles.append(
            layer.register_forward_pre_hook(partial(pre_hook, index=index), with_kwargs=True)
        )
        handles.append(layer.register_forward_hook(partial(post_hook, index=index)))
    try:
        with torch.no_grad():
            text_runner(model)(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [index for index, probe in enumerate(found) if probe is None]
    if missing:
        raise ModelLoadError(
            f"decoder layers {missing} did not run on a text prompt, so heretic cannot check "
            "that it edits them; please report this model."
        )
    return [probe for probe in found if probe is not None]


def _unedited_writers(layer: nn.Module, sites: Sequence[EditSite], hidden: int) -> list[str]:
    """Modules of a layer that could write into the residual stream but are not edit sites."""
    covered = {id(m) for site in sites for m in site.module.modules()}
    names = []
    for name, module in layer.named_modules():
        if id(module) in covered or not name:
            continue
        if isinstance(module, nn.Linear) and module.out_features == hidden:
            names.append(f"{name} ({type(module).__name__})")
    return names


def _probes(n_layers: int, hidden: int) -> list[tuple[str, torch.Tensor]]:
    """The probe directions (n_layers, hidden), by kind: two sets of coordinate axes, then one of
    random unit directions; fixed-seed, so every load checks the same."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    probes = []
    for _ in range(2):
        axes = torch.randint(0, hidden, (n_layers,), generator=generator)
        probes.append(("axis", torch.nn.functional.one_hot(axes, hidden).float()))
    gaussian = torch.randn(n_layers, hidden, generator=generator)
    probes.append(("random", torch.nn.functional.normalize(gaussian, dim=-1)))
    return probes


def _shares(
    model: nn.Module,
    layers: nn.ModuleList,
    sites: Sequence[EditSite],
    directions: torch.Tensor,
    exact: bool,
) -> list[float]:
    """Per layer, what it keeps along its probe with every site at strength 1, as a share of
    what it writes along it unedited; beyond rounding unless the probe is `exact`."""
    n_layers = len(layers)
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    ids = ((torch.arange(6) * 7919 + 11) % vocab).unsqueeze(0).to(device)
    baseline = probe_layers(model, layers, sites, directions, ids)
    hooks = EditHooks(sites, directions)
    try:
        hooks.set_strengths({c: torch.ones(n_layers) for c in COMPONENTS})
        edited = probe_layers(model, layers, sites, directions, ids)
    finally:
        hooks.remove()
    shares = []
    for unedited, probe in zip(baseline, edited, strict=True):
        allowed = 0.0 if exact else ROUNDING_TOLERANCE * probe.rounding
        kept = float((probe.along - allowed).clamp_min(0).max())
        writes = float(unedited.along.max())
        shares.append(kept / writes if writes > 0 else 0.0)
    return shares


def check_coverage(
    model: nn.Module, layers: nn.ModuleList, sites: Sequence[EditSite], hidden: int
) -> None:
    """Raise a `ModelLoadError` naming each layer whose output keeps a component along r with
    all of its sites at strength 1 (see the module docstring)."""
    kept = {"axis": [0.0] * len(layers), "random": [0.0] * len(layers)}
    for kind, directions in _probes(len(layers), hidden):
        shares = _shares(model, layers, sites, directions, exact=kind == "axis")
        kept[kind] = [max(a, b) for a, b in zip(kept[kind], shares, strict=True)]
    lines = []
    for index, layer in enumerate(layers):
        axis, random = kept["axis"][index], kept["random"][index]
        if max(axis, random) <= RELATIVE_TOLERANCE:
            continue
        layer_sites = [s for s in sites if s.layer == index]
        edited_names = ", ".join(s.name for s in layer_sites) or "none"
        suspects = ", ".join(_unedited_writers(layer, layer_sites, hidden))
        how = f"{axis:.1%} of what it writes along a coordinate axis"
        if axis <= RELATIVE_TOLERANCE:
            how = (
                f"{random:.1%} of what it writes along a random direction beyond rounding, "
                "none along coordinate axes (a per-channel gain on its residual keeps axes "
                "but not other directions)"
            )
        lines.append(
            f"layer {index} ({type(layer).__name__}) keeps {how}; edited: {edited_names}; "
            f"modules that may write unedited: {suspects or 'none found by name'}"
        )
    if lines:
        raise ModelLoadError(
            "heretic cannot edit every writer into the residual stream of this model, so an "
            "edit would be incomplete:\n  " + "\n  ".join(lines) + "\nThis architecture is not "
            "supported yet; please report it with the model's name."
        )
