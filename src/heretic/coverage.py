"""The coverage self-check: proof, on the loaded model, that the edit sites are every writer.

With every site of a layer at strength 1 and a layer input free of the direction r, the layer's
output must have no component along r. A writer that discovery missed (an unusual module, a
bias added outside any module, a second expert block) still writes along r, and the search
would then tune a model it cannot fully edit: heretic stops before the search instead.

r is a coordinate axis e_k, chosen per layer: removing it from a vector zeroes one coordinate,
which is exact in any dtype, so the check needs no tolerance for bf16 rounding. It runs twice
with different axes, so a writer that happens to write nothing along one axis is still seen.

A layer with several residual streams (hyper-connections, [B, S, N, D]) has coordinate k
zeroed in every input stream and checked in every output stream: each output stream is a
combination of input streams plus the writers scaled per stream, so none may carry r.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from heretic.discovery import text_runner
from heretic.edit import EditHooks
from heretic.errors import ModelLoadError
from heretic.sites import COMPONENTS, EditSite

RELATIVE_TOLERANCE = 1e-3
"""What an edited layer may still write along r, as a share of what it writes unedited."""


def _first(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _layer_writes_along(
    model: nn.Module, layers: nn.ModuleList, axes: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """Per layer, the largest |output[..., k]| (k = that layer's axis), with coordinate k of the
    layer's input zeroed."""
    found = torch.zeros(len(layers))
    handles = []
    for index, layer in enumerate(layers):
        k = int(axes[index])

        def pre_hook(_module, args, kwargs, k=k):
            if args:
                x = args[0].clone()
                x[..., k] = 0
                return (x, *args[1:]), kwargs
            x = kwargs["hidden_states"].clone()
            x[..., k] = 0
            return args, {**kwargs, "hidden_states": x}

        def post_hook(_module, _args, output, index=index, k=k):
            found[index] = _first(output)[..., k].float().abs().max().cpu()

        handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(post_hook))
    try:
        with torch.no_grad():
            text_runner(model)(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return found


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


def check_coverage(
    model: nn.Module, layers: nn.ModuleList, sites: Sequence[EditSite], hidden: int
) -> None:
    """Raise a `ModelLoadError` naming each layer whose output keeps a component along r with
    all of its sites at strength 1 (see the module docstring)."""
    n_layers = len(layers)
    vocab = model.get_input_embeddings().weight.shape[0]
    device = model.get_input_embeddings().weight.device
    ids = ((torch.arange(6) * 7919 + 11) % vocab).unsqueeze(0).to(device)
    generator = torch.Generator().manual_seed(0)
    failures: dict[int, float] = {}
    for _ in range(2):
        axes = torch.randint(0, hidden, (n_layers,), generator=generator)
        directions = torch.nn.functional.one_hot(axes, hidden).float()
        baseline = _layer_writes_along(model, layers, axes, ids)
        hooks = EditHooks(sites, directions)
        try:
            hooks.set_strengths({c: torch.ones(n_layers) for c in COMPONENTS})
            edited = _layer_writes_along(model, layers, axes, ids)
        finally:
            hooks.remove()
        for index in range(n_layers):
            share = float(edited[index] / baseline[index]) if baseline[index] > 0 else 0.0
            if share > RELATIVE_TOLERANCE:
                failures[index] = max(share, failures.get(index, 0.0))
    if failures:
        lines = []
        for index, share in sorted(failures.items()):
            layer_sites = [s for s in sites if s.layer == index]
            edited_names = ", ".join(s.name for s in layer_sites) or "none"
            suspects = ", ".join(_unedited_writers(layers[index], layer_sites, hidden))
            suspects = suspects or "none found by name"
            lines.append(
                f"layer {index} ({type(layers[index]).__name__}) keeps {share:.0%} of what it "
                f"writes along r; edited: {edited_names}; modules that may write unedited: "
                f"{suspects}"
            )
        raise ModelLoadError(
            "heretic cannot edit every writer into the residual stream of this model, so an "
            "edit would be incomplete:\n  " + "\n  ".join(lines) + "\nThis architecture is not "
            "supported yet; please report it with the model's name."
        )
