"""Reset strategies: the same edit as the hooks, exact resets, and every cache error."""

from __future__ import annotations

import pytest
import torch

from heretic.abliteration import ComponentParams, EditHooks, strengths_from_params
from heretic.directions import normalize
from heretic.model import ATTN, COMPONENTS, MLP, load_model
from heretic.reset import (
    CachedEdit,
    ReloadEdit,
    WeightCache,
    WeightCacheError,
    editable_matrices,
    make_edit,
)

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

    hooks = EditHooks(model.modules, directions, row_normalization)
    hooks.set_strengths(_strengths(model))
    hooked = model.first_token_logprobs(PROMPTS, 3)
    hooks.remove()

    def read():
        return editable_matrices(load_model(str(tiny_chat_model), dtype="float32").modules)

    logged: list[str] = []
    edit = make_edit(
        strategy,
        model.modules,
        directions,
        model.hidden_size,
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


def test_cache_size_is_the_editable_matrices_only(model):
    cache = WeightCache.create(model.modules, model.nbytes, log=lambda _: None)
    expected = sum(
        p.numel() * p.element_size()
        for layer in model.modules
        for c in COMPONENTS
        for m in layer[c]
        for p in m.parameters()
        if p.dim() == 2
    )
    assert cache.nbytes == expected < model.nbytes


def test_cannot_access_a_layer(model):
    modules = [dict(layer) for layer in model.modules]
    modules[1][ATTN] = [object()]
    with pytest.raises(WeightCacheError, match="Cannot access layer 1 .*--reset-strategy adapter"):
        WeightCache.create(modules, log=lambda _: None)


def test_out_of_memory_while_caching(model, monkeypatch):
    def no_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch.Tensor, "clone", no_memory)
    with pytest.raises(WeightCacheError, match="Out of memory while caching .*layer 0.*adapter"):
        WeightCache.create(model.modules, log=lambda _: None)


def test_restore_validates_the_cache(model):
    cache = WeightCache.create(model.modules, log=lambda _: None)
    with pytest.raises(WeightCacheError, match="empty"):
        WeightCache([]).restore(model.modules)
    with pytest.raises(WeightCacheError, match=f"1 layers but the model has {model.n_layers}"):
        WeightCache(cache.matrices[:1]).restore(model.modules)

    missing = list(cache.matrices)
    missing[1] = None
    with pytest.raises(WeightCacheError, match="Layer 1 is missing"):
        WeightCache(missing).restore(model.modules)

    no_mlp = [dict(layer) for layer in cache.matrices]
    del no_mlp[0][MLP]
    with pytest.raises(WeightCacheError, match=f"Component {MLP} is missing in layer 0"):
        WeightCache(no_mlp).restore(model.modules)

    wrong = [dict(layer) for layer in cache.matrices]
    wrong[1] = {**wrong[1], ATTN: [torch.zeros(3, 3)]}
    with pytest.raises(WeightCacheError, match=f"Shape mismatch at layer 1 component {ATTN}"):
        WeightCache(wrong).restore(model.modules)


def test_dtype_mismatch_warns_and_converts(model):
    pristine = _snapshot(model)
    cache = WeightCache.create(model.modules, log=lambda _: None)
    cache.matrices[0][ATTN] = [t.double() for t in cache.matrices[0][ATTN]]
    with pytest.warns(UserWarning, match="dtype mismatch at layer 0 component"):
        cache.restore(model.modules)
    assert cache.matrices[0][ATTN][0].dtype == torch.float32
    assert _same(_snapshot(model), pristine)


def test_unknown_strategy_and_reload_without_reader(model):
    directions = _directions(model)
    with pytest.raises(ValueError, match="unknown reset strategy"):
        make_edit("bogus", model.modules, directions, model.hidden_size)
    with pytest.raises(ValueError, match="read the weights"):
        make_edit("reload", model.modules, directions, model.hidden_size)
    assert isinstance(make_edit("cache", model.modules, directions, 64, log=print), CachedEdit)
    reload = make_edit("reload", model.modules, directions, 64, read_matrices=lambda: [])
    assert isinstance(reload, ReloadEdit)
