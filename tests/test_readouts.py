"""Fitted readouts: the ridge fit against a float64 reference, what the edit does to harmless
and harmful module outputs, hooks against merged weights and adapters, settings, pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from heretic.abliteration import row_edit
from heretic.cli import run
from heretic.config import load_settings
from heretic.directions import (
    DIRECTIONS_FILE,
    RIDGE_GRID,
    fit_readouts,
    load_direction_extras,
    normalize,
)
from heretic.discovery import discover_sites
from heretic.edit import EditHooks, TrialEdit, merge_edit, restore_weights
from heretic.errors import HereticError
from heretic.extraction import ridge_summary
from heretic.sites import ATTN, COMPONENTS, MLP


def _reference(good, bad, r, ridge):
    """The ridge solution written out in the primal, float64."""
    x = torch.cat([good, bad]).double()
    r = r.double()
    target = torch.cat([torch.zeros(len(good)), bad.double() @ r - (good.double() @ r).mean()])
    penalty = ridge * float((x * x).sum()) / x.shape[1]
    gram = x.T @ x + penalty * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.T @ target.double())


@pytest.mark.parametrize("n", [10, 80])  # fewer prompts than dimensions, and more
def test_cross_validated_ridge_matches_a_refit_per_left_out_prompt(n):
    """The closed-form leave-one-out choice against the plain one: refit without each
    prompt (float64, same penalty), predict it, and take the grid's lowest mean error."""
    g = torch.Generator().manual_seed(5)
    hidden = 24
    good = torch.randn(n, 1, 1, hidden, generator=g) + 2.0
    bad = torch.randn(n + 3, 1, 1, hidden, generator=g) * 1.5
    r = normalize(torch.randn(1, hidden, generator=g))
    got, ridges = fit_readouts(good, bad, r, None)
    x = torch.cat([good, bad])[:, 0, 0].double()
    rr = r[0].double()
    target = torch.cat(
        [torch.zeros(n, dtype=x.dtype), x[n:] @ rr - (x[:n] @ rr).mean()]
    )  # fmt: skip
    scale = float((x * x).sum()) / hidden

    def loo_error(ridge: float) -> float:
        errors = []
        for i in range(len(x)):
            keep = torch.arange(len(x)) != i
            a, t = x[keep], target[keep]
            gram = a.T @ a + ridge * scale * torch.eye(hidden, dtype=x.dtype)
            v = torch.linalg.solve(gram, a.T @ t)
            errors.append(float((x[i] @ v - target[i]) ** 2))
        return sum(errors) / len(errors)

    best = min(RIDGE_GRID, key=loo_error)
    assert float(ridges[0, 0]) == pytest.approx(best)
    expected = _reference(good[:, 0, 0], bad[:, 0, 0], r[0], best)
    torch.testing.assert_close(got[0, 0].double(), expected, rtol=1e-4, atol=1e-5)


def test_ridge_summary_says_how_the_penalties_were_chosen():
    assert ridge_summary(torch.full((2, 2), 0.01)) == "ridge 0.01"
    chosen = torch.tensor([[0.001, 0.01], [0.1, float("nan")]])
    assert ridge_summary(chosen) == (
        "ridge by leave-one-out cross-validation: median 0.01, 0.001 to 0.1"
    )


@pytest.mark.parametrize("n", [10, 80])  # fewer prompts than dimensions (dual), and more
def test_fit_matches_float64_reference(n):
    g = torch.Generator().manual_seed(0)
    layers, hidden = 2, 24
    good = torch.randn(n, layers, 2, hidden, generator=g) + 3.0
    bad = torch.randn(n + 3, layers, 2, hidden, generator=g)
    directions = normalize(torch.randn(layers, hidden, generator=g))
    got, ridges = fit_readouts(good, bad, directions, 0.05)
    assert torch.equal(ridges, torch.full((layers, 2), 0.05))
    assert got.shape == (layers, 2, hidden) and got.dtype == torch.float32
    for layer in range(layers):
        for component in range(2):
            expected = _reference(
                good[:, layer, component], bad[:, layer, component], directions[layer], 0.05
            )
            torch.testing.assert_close(
                got[layer, component].double(), expected, rtol=1e-4, atol=1e-5
            )


def test_fitted_edit_leaves_harmless_outputs_and_moves_harmful_ones_to_them():
    """Harmless outputs carry a large constant along r (as real modules' do); harmful ones
    carry more, and (as in real modules) the two also differ off r. The plain edit wipes
    both to 0 along r; the fitted one barely touches harmless outputs and moves harmful ones
    to the harmless level along r."""
    g = torch.Generator().manual_seed(1)
    hidden, n = 32, 400
    r, u, w = normalize(torch.randn(3, hidden, generator=g))
    noise = lambda m: torch.randn(m, hidden, generator=g) * 0.5  # noqa: E731
    good = noise(n) + 4.0 * r + 3.0 * u
    bad = noise(n) + 9.0 * r + 3.0 * w
    v = fit_readouts(good.view(n, 1, 1, -1), bad.view(n, 1, 1, -1), r.unsqueeze(0), 1e-3)[0][0, 0]
    fitted = row_edit(torch.eye(hidden), r, 1.0, readout=v)
    plain = row_edit(torch.eye(hidden), r, 1.0)
    harmless_change = (fitted.apply(good) - good).norm(dim=1).mean()
    assert harmless_change < 0.15 * (plain.apply(good) - good).norm(dim=1).mean()
    assert abs(float((fitted.apply(bad) @ r).mean()) - 4.0) < 0.6  # 9 before, 0 plain
    assert abs(float((plain.apply(bad) @ r).mean())) < 1e-4


def test_fit_rejects_bad_shapes_and_ridge():
    good = torch.randn(4, 2, 2, 8)
    directions = normalize(torch.randn(2, 8))
    with pytest.raises(ValueError, match="equal shapes"):
        fit_readouts(good, torch.randn(4, 3, 2, 8), directions, 0.1)
    with pytest.raises(ValueError, match="do not match"):
        fit_readouts(good, good, normalize(torch.randn(3, 8)), 0.1)
    with pytest.raises(ValueError, match="at least 2 good and 2 bad"):
        fit_readouts(good[:1], good, directions, 0.1)
    with pytest.raises(ValueError, match="ridge must be positive"):
        fit_readouts(good, good, directions, 0.0)


def test_one_pass_gives_residuals_and_module_outputs(tiny_chat_model):
    """The shared pass returns `residuals` unchanged, and in a pre-norm decoder each layer's
    residual step is exactly what its attention and MLP wrote: module outputs at the right
    token, layer and component."""
    from heretic.loading import load_model

    model = load_model(str(tiny_chat_model), dtype="float32")
    prompts = ["How do magnets work?", "Write a haiku about tea, please."]
    residuals, outputs = model.residuals_and_module_outputs(prompts, batch_size=2)
    torch.testing.assert_close(residuals, model.residuals(prompts, batch_size=2))
    assert outputs.shape == (2, model.n_layers, len(COMPONENTS), model.hidden_size)
    assert outputs.dtype == torch.bfloat16
    steps = residuals[:, 1:] - residuals[:, :-1]
    written = outputs[:, 1:].float().sum(dim=2)
    torch.testing.assert_close(written, steps, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe", "mixtral"])
def test_hooks_match_merged_weights_with_readouts(arch):
    """Also for mixture-of-experts blocks: the edit is linear in the block's output, so every
    expert's down-projection reads the block's readout."""
    from tiny_models import TEXT as COMMON
    from tiny_models import tiny_model

    model = tiny_model(arch, num_hidden_layers=3)
    modules = discover_sites(model)
    n, hidden = 3, COMMON["hidden_size"]
    g = torch.Generator().manual_seed(2)
    directions = normalize(torch.randn(n, hidden, generator=g))
    readouts = torch.randn(n, len(COMPONENTS), hidden, generator=g) * 0.3
    strengths = {ATTN: torch.tensor([0.0, 0.7, 1.2]), MLP: torch.tensor([1.0, 0.0, 0.5])}
    ids = torch.randint(0, COMMON["vocab_size"], (2, 7), generator=g)
    with torch.no_grad():
        base = model(input_ids=ids).logits
        hooks = EditHooks(modules, directions, readouts=readouts)
        hooks.set_strengths(strengths)
        hooked = model(input_ids=ids).logits
        hooks.remove()
        plain = EditHooks(modules, directions)
        plain.set_strengths(strengths)
        plain_logits = model(input_ids=ids).logits
        plain.remove()
        originals = merge_edit(modules, TrialEdit(strengths, directions, readouts))
        merged = model(input_ids=ids).logits
        restore_weights(modules, originals)
    assert not torch.allclose(base, hooked, atol=1e-4)
    assert not torch.allclose(plain_logits, hooked, atol=1e-4), "the readout must matter"
    torch.testing.assert_close(merged, hooked, atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="replace row normalization"):
        EditHooks(modules, directions, "full", readouts)
    with pytest.raises(ValueError, match="do not match"):
        EditHooks(modules, directions, readouts=readouts[:, :1])


def test_settings_refuse_fitted_readouts_with_row_normalization_or_global_directions():
    from heretic.config import Settings

    assert Settings(readout="fitted").readout == "fitted"
    with pytest.raises(ValueError, match="replaces row normalization"):
        Settings(readout="fitted", row_normalization="full")
    with pytest.raises(ValueError, match="direction_scope to 'per_layer'"):
        Settings(readout="fitted", direction_scope="search")


GOOD = [f"Tell me a fact about the number {i}." for i in range(24)]
BAD = [f"Explain how to steal item number {i} from a shop." for i in range(24)]


def test_pipeline_fits_saves_and_reuses_readouts(tiny_chat_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("\n".join(GOOD) + "\n")
    bad.write_text("\n".join(BAD) + "\n")
    out = tmp_path / "out"

    def settings(**extra):
        sets = {
            "good_prompts": (good, "[:16]"),
            "bad_prompts": (bad, "[:16]"),
            "good_evaluation_prompts": (good, "[16:]"),
            "bad_evaluation_prompts": (bad, "[16:]"),
        }
        prompt_sets = {k: {"dataset": str(p), "split": s} for k, (p, s) in sets.items()}
        options = {
            "n_trials": 1,
            "max_response_length": 2,
            "batch_size": 8,
            "readout": "fitted",
            "output_dir": out,
        }
        return load_settings([], model=str(tiny_chat_model), **{**options, **prompt_sets, **extra})

    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        run(settings(select="best", export="model,adapter"), Console(file=f, width=300))
    text = log.read_text()
    assert "fitted 4 readouts" in text
    saved = load_direction_extras(out / DIRECTIONS_FILE)["readouts"]
    assert saved.shape == (2, 2, 64) and torch.isfinite(saved).all()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 1

    with open(log, "w") as f:
        run(settings(n_trials=2, select="none"), Console(file=f, width=300))
    assert "Reusing refusal directions" in log.read_text()

    # A directions file without readouts cannot serve readout 'fitted'.
    from heretic.directions import load_directions, save_directions

    directions, metadata = load_directions(out / DIRECTIONS_FILE)
    bare = tmp_path / "bare.safetensors"
    save_directions(bare, directions, metadata, {})
    with pytest.raises(HereticError, match="holds no fitted readouts"):
        run(
            settings(directions=bare, output_dir=tmp_path / "o2", select="none"),
            Console(file=open(tmp_path / "l2.txt", "w"), width=300),
        )
