"""Reset strategies: how a trial's edit is switched on, and how the model goes back after it.

All three offer the interface of `abliteration.EditHooks` (`set_strengths(strengths,
directions=None)`, `clear`, `remove`), so the search, the chat and the export do not care which
one runs:

- `adapter` (default): `EditHooks`, the edit as forward hooks; base weights are never touched,
  so a reset is free and needs no memory.
- `cache`: the edit is merged into the weights in place. Only the editable matrices (attention
  out-projection, MLP down-projection of every layer) are cloned once into a `WeightCache`;
  a reset copies back the matrices the trial changed. Costs memory (the cache) and a copy.
- `reload`: the edit is merged in place, and a reset reads the editable matrices back from the
  model's files on disk. Needs no extra memory between trials but is by far the slowest.

Merged weights and hooks compute the same edit, but not bit for bit: a merged matrix is
rounded to the model's dtype once, a hook rounds the projected activations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import torch
from torch import nn

from heretic.abliteration import (
    EditHooks,
    _edit_tensor,
    _writer_matrices,
    check_directions,
    check_readouts,
    check_trial_directions,
    component_readout,
    module_row_normalization,
)
from heretic.errors import HereticError
from heretic.model import COMPONENTS

RESET_STRATEGIES = ("adapter", "cache", "reload")


class WeightCacheError(HereticError):
    """The layer-wise weight cache cannot be built or does not fit the model."""


Layers = list[dict[str, list[nn.Module]]]
"""`Model.modules`: per layer, per component, the modules whose outputs an edit changes."""


def editable_matrices(modules: Layers) -> list[dict[str, list[nn.Parameter]]]:
    """Per layer, per component, the weight tensors an edit changes (in a fixed order)."""
    return [
        {
            component: [param for module in module_list for param, _ in _writer_matrices(module)]
            for component, module_list in layer.items()
        }
        for layer in modules
    ]


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GB"


class WeightCache:
    """Clones of the editable matrices, validated against the model on creation and restore."""

    def __init__(self, matrices: list[dict[str, list[torch.Tensor]]]):
        self.matrices = matrices

    @classmethod
    def create(cls, modules: Layers, model_bytes: int | None = None, log=print) -> WeightCache:
        """Clone every editable matrix; log the cache's size and share of the model."""
        cached: list[dict[str, list[torch.Tensor]]] = []
        for index, layer in enumerate(modules):
            try:
                params = editable_matrices([layer])[0]
            except Exception as e:
                raise WeightCacheError(
                    f"Cannot access layer {index} to cache its weights ({e}). "
                    "Use --reset-strategy adapter."
                ) from e
            try:
                cached.append({c: [p.detach().clone() for p in ps] for c, ps in params.items()})
            except torch.OutOfMemoryError as e:
                raise WeightCacheError(
                    f"Out of memory while caching the weights of layer {index}: the cache "
                    "needs a copy of every attention out-projection and MLP down-projection. "
                    "Use --reset-strategy adapter (no copy at all)."
                ) from e
            except RuntimeError as e:
                if "memory" not in str(e).lower():
                    raise
                raise WeightCacheError(
                    f"Out of memory while caching the weights of layer {index} ({e}). "
                    "Use --reset-strategy adapter (no copy at all)."
                ) from e
        cache = cls(cached)
        cache.validate(modules)
        size = cache.nbytes
        share = f" ({100 * size / model_bytes:.1f}% of model)" if model_bytes else ""
        log(f"Cache size: {_gib(size)}{share}")
        return cache

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for layer in self.matrices
            for tensors in layer.values()
            for t in tensors
        )

    def validate(self, modules: Layers) -> list[dict[str, list[nn.Parameter]]]:
        """Check the cache fits the model; returns the model's matrices, matched to it.

        A dtype mismatch (the model was cast after caching) is not fatal: the cached tensor is
        converted, with a warning, since copying it back converts anyway.
        """
        if not self.matrices:
            raise WeightCacheError(
                "The weight cache is empty: it was never filled. Use --reset-strategy adapter."
            )
        if len(self.matrices) != len(modules):
            raise WeightCacheError(
                f"The weight cache has {len(self.matrices)} layers but the model has "
                f"{len(modules)}: it was made for another model. Use --reset-strategy adapter."
            )
        params = editable_matrices(modules)
        for index, (cached, layer) in enumerate(zip(self.matrices, params, strict=True)):
            if cached is None:
                raise WeightCacheError(f"Layer {index} is missing from the weight cache.")
            for component in COMPONENTS:
                if component not in layer:
                    continue
                if component not in cached:
                    raise WeightCacheError(
                        f"Component {component} is missing in layer {index} of the weight cache."
                    )
                tensors, targets = cached[component], layer[component]
                if len(tensors) != len(targets):
                    raise WeightCacheError(
                        f"Shape mismatch at layer {index} component {component}: the cache "
                        f"holds {len(tensors)} matrices, the model {len(targets)}."
                    )
                for k, (tensor, target) in enumerate(zip(tensors, targets, strict=True)):
                    if tensor.shape != target.shape:
                        raise WeightCacheError(
                            f"Shape mismatch at layer {index} component {component}: cache "
                            f"{tuple(tensor.shape)}, model {tuple(target.shape)}."
                        )
                    if tensor.dtype != target.dtype:
                        warnings.warn(
                            f"Weight cache dtype mismatch at layer {index} component "
                            f"{component}: cache {tensor.dtype}, model {target.dtype}; "
                            "converting the cache.",
                            stacklevel=2,
                        )
                        tensors[k] = tensor.to(target.dtype)
        return params

    @torch.no_grad()
    def restore(self, modules: Layers, layers: set[tuple[int, str]] | None = None) -> None:
        """Copy the cached matrices back (only the (layer, component) pairs given, if any)."""
        params = self.validate(modules)
        for index, layer in enumerate(params):
            for component, targets in layer.items():
                if layers is not None and (index, component) not in layers:
                    continue
                for target, tensor in zip(targets, self.matrices[index][component], strict=True):
                    target.copy_(tensor)


class _InPlaceEdit:
    """Merges a trial's edit into the weights from pristine copies; subclasses restore them."""

    def __init__(
        self,
        modules: Layers,
        directions: torch.Tensor,
        hidden_size: int,
        row_normalization: str = "none",
        readouts: torch.Tensor | None = None,
    ):
        check_directions(directions, len(modules))
        check_readouts(readouts, directions)
        self.modules = modules
        self.row_normalization = row_normalization
        self.readouts = None if readouts is None else readouts.float()
        self.directions = directions.float()
        self.hidden_size = hidden_size
        self.touched: set[tuple[int, str]] = set()

    def _pristine(self, index: int, component: str) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def set_strengths(
        self, strengths: Mapping[str, torch.Tensor], directions: torch.Tensor | None = None
    ) -> None:
        """Merge the trial's edit; `directions` (n_layers, hidden) are the trial's own, or None
        for the directions given at construction."""
        check_trial_directions(directions, self.directions)
        trial_directions = self.directions if directions is None else directions.float()
        self.clear()
        params = editable_matrices(self.modules)
        for index, layer in enumerate(params):
            r = trial_directions[index]
            for component, targets in layer.items():
                weight = float(strengths[component][index]) if component in strengths else 0.0
                if weight == 0.0:
                    continue
                flags = [
                    (fused, module_row_normalization(module, self.row_normalization))
                    for module in self.modules[index][component]
                    for _, fused in _writer_matrices(module)
                ]
                originals = self._pristine(index, component)
                readout = component_readout(self.readouts, index, component)
                for target, original, (fused, mode) in zip(targets, originals, flags, strict=True):
                    edited = _edit_tensor(
                        original.to(target.device),
                        r,
                        weight,
                        fused,
                        self.hidden_size,
                        mode,
                        readout,
                    )
                    target.copy_(edited)
                self.touched.add((index, component))

    def clear(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        self.clear()


class CachedEdit(_InPlaceEdit):
    """The `cache` strategy: pristine matrices come from a `WeightCache`."""

    def __init__(
        self,
        modules: Layers,
        directions: torch.Tensor,
        hidden_size: int,
        model_bytes: int | None = None,
        log=print,
        row_normalization: str = "none",
        readouts: torch.Tensor | None = None,
    ):
        super().__init__(modules, directions, hidden_size, row_normalization, readouts)
        self.cache = WeightCache.create(modules, model_bytes, log)

    def _pristine(self, index: int, component: str) -> list[torch.Tensor]:
        return self.cache.matrices[index][component]

    def clear(self) -> None:
        if self.touched:
            self.cache.restore(self.modules, self.touched)
        self.touched = set()

    def remove(self) -> None:
        self.clear()
        self.cache = WeightCache([])


class ReloadEdit(_InPlaceEdit):
    """The `reload` strategy: pristine matrices are read from disk by `read_matrices`."""

    def __init__(
        self,
        modules: Layers,
        directions: torch.Tensor,
        hidden_size: int,
        read_matrices: Callable[[], list[dict[str, list[torch.Tensor]]]],
        row_normalization: str = "none",
        readouts: torch.Tensor | None = None,
    ):
        super().__init__(modules, directions, hidden_size, row_normalization, readouts)
        self.read_matrices = read_matrices

    def _pristine(self, index: int, component: str) -> list[torch.Tensor]:
        # set_strengths runs after clear(), so the weights in the model are the pristine ones
        # (each edited tensor is computed in full before it is copied over its original).
        return list(editable_matrices([self.modules[index]])[0][component])

    @torch.no_grad()
    def clear(self) -> None:
        if not self.touched:
            return
        WeightCache(self.read_matrices()).restore(self.modules, self.touched)
        self.touched = set()


def make_edit(
    strategy: str,
    modules: Layers,
    directions: torch.Tensor,
    hidden_size: int,
    *,
    model_bytes: int | None = None,
    read_matrices: Callable[[], list[dict[str, list[torch.Tensor]]]] | None = None,
    log=print,
    row_normalization: str = "none",
    readouts: torch.Tensor | None = None,
):
    """The edit switch for `strategy` (one of RESET_STRATEGIES)."""
    if strategy == "adapter":
        return EditHooks(modules, directions, row_normalization, readouts)
    if strategy == "cache":
        return CachedEdit(
            modules, directions, hidden_size, model_bytes, log, row_normalization, readouts
        )
    if strategy == "reload":
        if read_matrices is None:
            raise ValueError("the reload strategy needs a way to read the weights from disk")
        return ReloadEdit(
            modules, directions, hidden_size, read_matrices, row_normalization, readouts
        )
    raise ValueError(f"unknown reset strategy {strategy!r} (choose from {RESET_STRATEGIES})")
