"""Reset strategies: how a trial's edit is switched on, and how the model goes back after it.

All three offer the interface of `edit.EditHooks` (`set_strengths(strengths,
directions=None)`, `clear`, `remove`), so the search, the chat and the export do not care which
one runs:

- `adapter` (default): `EditHooks`, the edit as forward hooks; base weights are never touched,
  so a reset is free and needs no memory.
- `cache`: the edit is merged into the weights in place. Only the edit sites' tensors (every
  matrix and bias that writes into the residual stream) are cloned once into a `WeightCache`;
  a reset copies back the tensors the trial changed. Costs memory (the cache) and a copy.
- `reload`: the edit is merged in place, and a reset reads the edit sites' tensors back from the
  model's files on disk. Needs no extra memory between trials but is by far the slowest.

Merged weights and hooks compute the same edit, but not bit for bit: a merged matrix is
rounded to the model's dtype once, a hook rounds the projected activations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from heretic.abliteration import check_trial_directions
from heretic.edit import EditHooks, TrialEdit, edited_tensor
from heretic.errors import HereticError
from heretic.quantization import refuse_in_place
from heretic.sites import EditSite

RESET_STRATEGIES = ("adapter", "cache", "reload")


class WeightCacheError(HereticError):
    """The layer-wise weight cache cannot be built or does not fit the model."""


def editable_matrices(sites: Sequence[EditSite]) -> list[list[nn.Parameter]]:
    """Per edit site, the tensors an edit changes (weights and biases, in a fixed order)."""
    return [[tensor.param for tensor in site.tensors()] for site in sites]


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GB"


class WeightCache:
    """Clones of the edit sites' tensors, validated against the model on creation and restore."""

    def __init__(self, matrices: list[list[torch.Tensor]]):
        self.matrices = matrices

    @classmethod
    def create(
        cls, sites: Sequence[EditSite], model_bytes: int | None = None, log=print
    ) -> WeightCache:
        """Clone every edit site's tensors; log the cache's size and share of the model."""
        cached: list[list[torch.Tensor]] = []
        for site, params in zip(sites, editable_matrices(sites), strict=True):
            try:
                cached.append([p.detach().clone() for p in params])
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not isinstance(e, torch.OutOfMemoryError) and "memory" not in str(e).lower():
                    raise
                raise WeightCacheError(
                    f"Out of memory while caching the weights of {site.name}: the cache needs a "
                    "copy of every tensor that writes into the residual stream. Use "
                    "--reset-strategy adapter (no copy at all)."
                ) from e
        cache = cls(cached)
        cache.validate(sites)
        size = cache.nbytes
        share = f" ({100 * size / model_bytes:.1f}% of model)" if model_bytes else ""
        log(f"Cache size: {_gib(size)}{share}")
        return cache

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for tensors in self.matrices for t in tensors)

    def validate(self, sites: Sequence[EditSite]) -> list[list[nn.Parameter]]:
        """Check the cache fits the model; returns the model's tensors, matched to it.

        A dtype mismatch (the model was cast after caching) is not fatal: the cached tensor is
        converted, with a warning, since copying it back converts anyway.
        """
        if not self.matrices:
            raise WeightCacheError(
                "The weight cache is empty: it was never filled. Use --reset-strategy adapter."
            )
        if len(self.matrices) != len(sites):
            raise WeightCacheError(
                f"The weight cache has {len(self.matrices)} edit sites but the model has "
                f"{len(sites)}: it was made for another model. Use --reset-strategy adapter."
            )
        params = editable_matrices(sites)
        for site, tensors, targets in zip(sites, self.matrices, params, strict=True):
            if len(tensors) != len(targets):
                raise WeightCacheError(
                    f"Shape mismatch at {site.name}: the cache holds {len(tensors)} tensors, "
                    f"the model {len(targets)}."
                )
            for k, (tensor, target) in enumerate(zip(tensors, targets, strict=True)):
                if tensor.shape != target.shape:
                    raise WeightCacheError(
                        f"Shape mismatch at {site.name}: cache {tuple(tensor.shape)}, model "
                        f"{tuple(target.shape)}."
                    )
                if tensor.dtype != target.dtype:
                    warnings.warn(
                        f"Weight cache dtype mismatch at {site.name}: cache {tensor.dtype}, "
                        f"model {target.dtype}; converting the cache.",
                        stacklevel=2,
                    )
                    tensors[k] = tensor.to(target.dtype)
        return params

    @torch.no_grad()
    def restore(self, sites: Sequence[EditSite], only: set[int] | None = None) -> None:
        """Copy the cached tensors back (only the sites whose indices are given, if any)."""
        params = self.validate(sites)
        for index, (targets, tensors) in enumerate(zip(params, self.matrices, strict=True)):
            if only is not None and index not in only:
                continue
            for target, tensor in zip(targets, tensors, strict=True):
                target.copy_(tensor)


class _InPlaceEdit:
    """Merges a trial's edit into the weights from pristine copies; subclasses restore them."""

    def __init__(
        self,
        sites: Sequence[EditSite],
        directions: torch.Tensor,
        row_normalization: str = "none",
        readouts: torch.Tensor | None = None,
    ):
        self.sites = list(sites)
        self.directions = directions.float()
        self.readouts = None if readouts is None else readouts.float()
        self.row_normalization = row_normalization
        TrialEdit({}, self.directions, self.readouts, row_normalization)  # validates
        self.touched: set[int] = set()

    def _pristine(self, index: int) -> list[torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def set_strengths(
        self, strengths: Mapping[str, torch.Tensor], directions: torch.Tensor | None = None
    ) -> None:
        """Merge the trial's edit; `directions` (n_layers, hidden) are the trial's own, or None
        for the directions given at construction."""
        check_trial_directions(directions, self.directions)
        source = self.directions if directions is None else directions.float()
        edit = TrialEdit(strengths, source, self.readouts, self.row_normalization)
        self.clear()
        for index, site in enumerate(self.sites):
            row = edit.row_edit(site)
            if row is None:
                continue
            originals = self._pristine(index)
            for tensor, original in zip(site.tensors(), originals, strict=True):
                target = tensor.param
                edited = edited_tensor(row, tensor, original.to(target.device))
                target.copy_(edited.to(target.dtype))
            self.touched.add(index)

    def clear(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        self.clear()


class CachedEdit(_InPlaceEdit):
    """The `cache` strategy: pristine tensors come from a `WeightCache`."""

    def __init__(
        self,
        sites: Sequence[EditSite],
        directions: torch.Tensor,
        model_bytes: int | None = None,
        log=print,
        row_normalization: str = "none",
        readouts: torch.Tensor | None = None,
    ):
        super().__init__(sites, directions, row_normalization, readouts)
        self.cache = WeightCache.create(self.sites, model_bytes, log)

    def _pristine(self, index: int) -> list[torch.Tensor]:
        return self.cache.matrices[index]

    def clear(self) -> None:
        if self.touched:
            self.cache.restore(self.sites, self.touched)
        self.touched = set()

    def remove(self) -> None:
        self.clear()
        self.cache = WeightCache([])


class ReloadEdit(_InPlaceEdit):
    """The `reload` strategy: pristine tensors are read from disk by `read_matrices`."""

    def __init__(
        self,
        sites: Sequence[EditSite],
        directions: torch.Tensor,
        read_matrices: Callable[[], list[list[torch.Tensor]]],
        row_normalization: str = "none",
        readouts: torch.Tensor | None = None,
    ):
        super().__init__(sites, directions, row_normalization, readouts)
        self.read_matrices = read_matrices

    def _pristine(self, index: int) -> list[torch.Tensor]:
        # set_strengths runs after clear(), so the weights in the model are the pristine ones
        # (each edited tensor is computed in full before it is copied over its original).
        return [tensor.param for tensor in self.sites[index].tensors()]

    @torch.no_grad()
    def clear(self) -> None:
        if not self.touched:
            return
        WeightCache(self.read_matrices()).restore(self.sites, self.touched)
        self.touched = set()


def make_edit(
    strategy: str,
    sites: Sequence[EditSite],
    directions: torch.Tensor,
    *,
    model_bytes: int | None = None,
    read_matrices: Callable[[], list[list[torch.Tensor]]] | None = None,
    log=print,
    row_normalization: str = "none",
    readouts: torch.Tensor | None = None,
):
    """The edit switch for `strategy` (one of RESET_STRATEGIES); the in-place strategies
    refuse a model whose edit sites are quantized."""
    if strategy == "adapter":
        return EditHooks(sites, directions, row_normalization, readouts)
    if strategy in ("cache", "reload"):
        refuse_in_place(
            sorted({f for site in sites for f in site.quantization}),
            f"--reset-strategy {strategy}",
            "use --reset-strategy adapter (hooks, the weights are never touched)",
        )
    if strategy == "cache":
        return CachedEdit(sites, directions, model_bytes, log, row_normalization, readouts)
    if strategy == "reload":
        if read_matrices is None:
            raise ValueError("the reload strategy needs a way to read the weights from disk")
        return ReloadEdit(sites, directions, read_matrices, row_normalization, readouts)
    raise ValueError(f"unknown reset strategy {strategy!r} (choose from {RESET_STRATEGIES})")
