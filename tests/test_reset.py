"""Reset strategies: the same edit as the hooks, exact resets, and every cache error."""

from __future__ import annotations

import pytest
import torch

from heretic.abliteration import ComponentParams, strengths_from_params
from heretic.directions import normalize
from heretic.edit import EditHooks
from heretic.loading import load_model
from heretic.reset import (
    CachedEdit,
    ReloadEdit,
    WeightCache,
    WeightCacheError,
    editable_matrices,
    make_edit,
)
from heretic.sites import ATTN, MLP

PROMPTS = ["Name a colour.", "Count to three, please.", "What is a cat?"]


@pytest.fixture(scope="module")
def model(tiny_chat_model):
    return load_model(str(tiny_chat_model), dtype="float32")


def _directions(model) -> torch.Tensor:
    torch.manual_seed(0)
    return normalize(torch.randn(model.n_layers, model.hidden_size))


def _strengths(model):
    params = {ATTN: ComponentParams(0.0, 1.0, 0.8), MLP: ComponentParams(0.5, 1.0, 1.2)}
    return strengths_from_params(params, model.n_layers)


def _snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.model.parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("strategy", "row_normalization"), [("cache", "none"), ("reload", "none"), ("cache", "full")]
)
def test_in_place_strategies_match_the_hooks_and_reset_exactly(
    model, tiny_chat_model, strategy, row_normalization
):
    directions = _directions(model)
    pristine = _snapshot(model)
    base = model.first_token_logprobs(PROMPTS, 3)

    hooks = EditHooks(model.sites, directions, row_normalization)
    hooks.set_strengths(_strengths(model))
    hooked = model.first_token_logprobs(PROMPTS, 3)
    hooks.remove()

    def read():
        return editable_matrices(load_model(str(tiny_chat_model), dtype="float32").sites)

    logged: list[str] = []
    edit = make_edit(
        strategy,
        model.sites,
        directions,
        model_bytes=model.nbytes,
        read_matrices=read,
        log=logged.append,
        row_normalization=row_normalization,
    )
    edit.set_strengths(_strengths(model))
    merged = model.first_token_logprobs(PROMPTS, 3)
    assert not _same(_snapshot(model), pristine)
    # float32: merging the edit into W or projecting W's output is the same edit.
    torch.testing.assert_close(merged, hooked, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(merged, base, atol=1e-3)

    edit.set_strengths(_strengths(model))  # a second trial starts from the original weights
    torch.testing.assert_close(model.first_token_logprobs(PROMPTS, 3), merged)
    edit.clear()
    assert _same(_snapshot(model), pristine)
    torch.testing.assert_close(model.first_token_logprobs(PROMPTS, 3), base)
    if strategy == "cache":
        (line,) = logged
        assert line.startswith("Cache size: ") and "% of model)" in line
    edit.remove()


def test_cache_size_is_the_edit_sites_tensors_only(model):
    cache = WeightCache.create(model.sites, model.nbytes, log=lambda _: None)
    expected = sum(
        p.numel() * p.element_size()
        for site in model.sites
        for p in site.module.parameters()
        if p.dim() == 2
    )
    assert cache.nbytes == expected < model.nbytes


def test_out_of_memory_while_caching(model, monkeypatch):
    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.Tensor, "clone", no_memory)
    first = model.sites[0].name
    with pytest.raises(WeightCacheError, match=f"Out of memory while caching .*{first}.*adapter"):
        WeightCache.create(model.sites, log=lambda _: None)


def test_restore_validates_the_cache(model):
    cache = WeightCache.create(model.sites, log=lambda _: None)
    with pytest.raises(WeightCacheError, match="empty"):
        WeightCache([]).restore(model.sites)
    n = len(model.sites)
    with pytest.raises(WeightCacheError, match=f"1 edit sites but the model has {n}"):
        WeightCache(cache.matrices[:1]).restore(model.sites)

    missing = [list(tensors) for tensors in cache.matrices]
    missing[1] = []
    with pytest.raises(WeightCacheError, match=f"{model.sites[1].name}: the cache holds 0"):
        WeightCache(missing).restore(model.sites)

    wrong = [list(tensors) for tensors in cache.matrices]
    wrong[1] = [torch.zeros(3, 3)]
    with pytest.raises(WeightCacheError, match=f"Shape mismatch at {model.sites[1].name}"):
        WeightCache(wrong).restore(model.sites)


def test_dtype_mismatch_warns_and_converts(model):
    pristine = _snapshot(model)
    cache = WeightCache.create(model.sites, log=lambda _: None)
    cache.matrices[0] = [t.double() for t in cache.matrices[0]]
    with pytest.warns(UserWarning, match=f"dtype mismatch at {model.sites[0].name}"):
        cache.restore(model.sites)
    assert cache.matrices[0][0].dtype == torch.float32
    assert _same(_snapshot(model), pristine)


def test_unknown_strategy_and_reload_without_reader(model):
    directions = _directions(model)
    with pytest.raises(ValueError, match="unknown reset strategy"):
        make_edit("bogus", model.sites, directions)
    with pytest.raises(ValueError, match="read the weights"):
        make_edit("reload", model.sites, directions)
    assert isinstance(make_edit("cache", model.sites, directions, log=print), CachedEdit)
    reload = make_edit("reload", model.sites, directions, read_matrices=lambda: [])
    assert isinstance(reload, ReloadEdit)
