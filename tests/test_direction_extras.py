"""Direction extras: probes, helpfulness and sacred directions, orthogonalization, the file.

Math is checked on synthetic residuals against float64 references; one pipeline run on the
tiny random model checks that the extras are computed, saved, reused and recomputed.
"""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from heretic.cli import run
from heretic.config import DatasetSpecification, load_settings
from heretic.directions import (
    DIRECTIONS_FILE,
    ensemble,
    helpfulness_directions,
    load_direction_extras,
    load_directions,
    mean_abs_cosine,
    normalize,
    orthogonalize,
    orthonormal_basis,
    sacred_directions,
)
from heretic.fingerprint import (
    directions_differences,
    directions_key,
    directions_metadata,
    study_key,
)
from heretic.probes import ProbeError, train_probes
from heretic.prompts import load_prompts
from heretic.refinements import build_directions

L, H = 3, 32


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    return normalize(torch.randn(*shape, generator=_gen(seed)))


def _planted(n: int = 300, strength: float = 3.0, seed: int = 0):
    """Residuals with a constant offset, unit noise, and label 1 shifted along u per layer."""
    g = _gen(seed)
    u = normalize(torch.randn(L, H, generator=g))
    y = (torch.rand(n, generator=g) < 0.4).long()
    x = torch.randn(n, L, H, generator=g) + 4.0 + y.view(n, 1, 1) * strength * u
    return x, y, u


def test_probe_recovers_planted_direction():
    x, y, u = _planted()
    x[:, 2] = torch.randn(len(x), H, generator=_gen(1)) + 4.0  # no signal in the last layer
    result = train_probes(x, y, l2=0.01, min_accuracy=0.65, seed=0, device="cpu")
    cos = (result.directions * u).sum(-1)
    assert cos[0] > 0.9 and cos[1] > 0.9  # and pointing toward the refusing class
    assert result.accuracy[0] > 0.85 and result.kept[:2].all()
    assert 0.35 < result.accuracy[2] < 0.65 and not result.kept[2]
    assert torch.allclose(result.directions.norm(dim=-1), torch.ones(L), atol=1e-5)


def test_probe_needs_ten_samples_per_class():
    x, y, _ = _planted()
    y = torch.zeros_like(y)
    y[:9] = 1
    with pytest.raises(ProbeError, match="at least 10 examples of each class; got 9 refused"):
        train_probes(x, y, l2=0.01, min_accuracy=0.65, device="cpu")


def _reference_orthogonalize(r: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """float64 least squares: r minus its projection onto the row span of `against`."""
    out = []
    for layer in range(r.shape[0]):
        a = against[layer].double().T  # (H, k)
        coef = torch.linalg.lstsq(a, r[layer].double().unsqueeze(-1)).solution
        rest = r[layer].double() - (a @ coef).squeeze(-1)
        out.append(rest / rest.norm())
    return torch.stack(out)


def test_orthogonalize_against_several_non_orthogonal_directions():
    r = _unit(L, H, seed=1)
    base = _unit(L, 5, H, seed=2)
    against = base + 0.8 * base[:, :1]  # strongly correlated, not orthogonal
    against[:, 1] += 0.5 * r  # and overlapping the refusal direction
    out = orthogonalize(r, against)
    cos = torch.einsum("lh,lkh->lk", out.double(), normalize(against.double()))
    assert cos.abs().max() < 1e-5
    assert torch.allclose(out.double(), _reference_orthogonalize(r, against), atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(L), atol=1e-6)


def test_orthogonalize_against_one_unit_direction():
    r, u = _unit(L, H, seed=3), _unit(L, H, seed=4)
    expected = normalize(r.double() - (r.double() * u.double()).sum(-1, keepdim=True) * u)
    assert torch.allclose(orthogonalize(r, u).double(), expected, atol=1e-6)


def test_orthogonalize_refuses_a_direction_inside_the_span():
    u = _unit(L, 2, H, seed=5)
    with pytest.raises(ValueError, match="lies inside the span"):
        orthogonalize(u[:, 0] * 2.0, u)


def test_orthonormal_basis_spans_the_input():
    v = torch.randn(L, 4, H, generator=_gen(6), dtype=torch.float64)
    q = orthonormal_basis(v)
    assert torch.allclose(q @ q.transpose(-1, -2), torch.eye(4, dtype=torch.float64), atol=1e-10)
    projected = v @ q.transpose(-1, -2) @ q
    assert torch.allclose(projected, v, atol=1e-10)
    assert ((q * v).sum(-1) > 0).all()  # each basis vector keeps its input's orientation


def test_ensemble_aligns_a_flipped_pca_sign():
    probe, pca = _unit(L, H, seed=7), _unit(L, H, seed=8)
    pca = normalize(probe + 0.5 * pca)
    flipped = pca.clone()
    flipped[1] *= -1
    expected = normalize(0.7 * probe.double() + 0.3 * pca.double()).float()
    assert torch.allclose(ensemble(probe, pca, 0.7), expected, atol=1e-6)
    assert torch.allclose(ensemble(probe, flipped, 0.7), expected, atol=1e-6)


def test_helpfulness_direction_and_empty_sets():
    helpful = torch.randn(20, L, H, generator=_gen(9)) + 1.0
    unhelpful = torch.randn(30, L, H, generator=_gen(10))
    expected = normalize(helpful.double().mean(0) - unhelpful.double().mean(0)).float()
    assert torch.allclose(helpfulness_directions(helpful, unhelpful), expected, atol=1e-6)
    with pytest.raises(ValueError, match="got 20 helpful and 0 unhelpful"):
        helpfulness_directions(helpful, unhelpful[:0])


def test_sacred_directions_find_extra_variance():
    g = _gen(11)
    v = _unit(L, H, seed=12)
    sacred = torch.randn(200, L, H, generator=g) + torch.randn(200, 1, 1, generator=g) * 5 * v
    baseline = torch.randn(200, L, H, generator=g)
    found = sacred_directions(sacred, baseline, n_directions=3)
    assert found.shape == (L, 3, H)
    gram = found.double() @ found.double().transpose(-1, -2)
    assert torch.allclose(gram, torch.eye(3, dtype=torch.float64).expand(L, 3, 3), atol=1e-5)
    assert ((found[:, 0] * v).sum(-1).abs() > 0.95).all()


def _settings(**extra):
    """Settings with the refinements of this file off unless a test turns them on."""
    return load_settings(
        [], model="m", **{"orthogonalize_good_mean": False, "readout": "direction", **extra}
    )


def test_build_directions_falls_back_when_probes_lack_refusals():
    x, y, _ = _planted()
    good, bad = x[y == 0], x[y == 1]
    warnings: list[str] = []
    result = build_directions(
        good,
        bad,
        _settings(use_supervised_probing=True),
        residuals_of=lambda name: pytest.fail(f"{name} should not be needed"),
        refused=lambda: [False] * (len(bad) - 3) + [True] * 3,
        log=lambda line: None,
        warn=warnings.append,
    )
    assert result.probes is None
    assert any("probing skipped" in w and "got 3 refused" in w for w in warnings)
    expected = normalize(bad.double().mean(0) - good.double().mean(0)).float()
    assert torch.allclose(result.refusal, expected, atol=1e-6)


def test_build_directions_orthogonal_to_the_good_mean():
    """The planted residuals have a large constant offset that both sets share: the refusal
    direction keeps no component along the good mean, and the file's metadata records it."""
    x, y, _ = _planted()
    good, bad = x[y == 0], x[y == 1]
    logs: list[str] = []
    settings = _settings(orthogonalize_good_mean=True)
    result = build_directions(
        good,
        bad,
        settings,
        residuals_of=lambda name: pytest.fail(f"{name} should not be needed"),
        refused=lambda: pytest.fail("no probes"),
        log=logs.append,
        warn=lambda w: pytest.fail(w),
    )
    good_mean = normalize(good.double().mean(0))
    assert (result.refusal.double() * good_mean).sum(-1).abs().max() < 1e-5
    plain = normalize(bad.double().mean(0) - good.double().mean(0))
    expected = normalize(plain - (plain * good_mean).sum(-1, keepdim=True) * good_mean)
    torch.testing.assert_close(result.refusal.double(), expected, atol=1e-5, rtol=1e-5)
    assert any("refusal directions and the good mean" in line for line in logs)
    prompts = {"good_prompts": ["g"], "bad_prompts": ["b"]}
    on = directions_key(settings, prompts)
    off = directions_key(_settings(), prompts)
    assert on.get("orthogonalize_good_mean") is True and "orthogonalize_good_mean" not in off


def test_build_directions_with_every_extra():
    x, y, u = _planted()
    good, bad = x[y == 0], x[y == 1]
    g = _gen(13)
    sets = {
        "helpful_prompts": torch.randn(40, L, H, generator=g) + u,
        "unhelpfulness_prompts": torch.randn(40, L, H, generator=g),
        # Sacred prompts vary along the refusal direction itself: a big overlap.
        "sacred_prompts": torch.randn(80, L, H, generator=g)
        + torch.randn(80, 1, 1, generator=g) * 6 * u,
        "sacred_baseline_prompts": torch.randn(80, L, H, generator=g),
    }
    warnings: list[str] = []
    logs: list[str] = []
    result = build_directions(
        good,
        bad,
        _settings(
            use_supervised_probing=True,
            orthogonalize_directions=True,
            use_sacred_directions=True,
            n_sacred_directions=2,
        ),
        residuals_of=sets.__getitem__,
        refused=lambda: [True] * len(bad),
        log=logs.append,
        warn=warnings.append,
    )
    assert result.probes is not None and result.probes.kept.all()
    assert any("probe balanced accuracy per layer" in line for line in logs)
    against = torch.cat([result.helpfulness.unsqueeze(1), result.sacred], dim=1)
    cos = torch.einsum("lh,lkh->lk", result.refusal.double(), normalize(against.double()))
    assert cos.abs().max() < 1e-5
    assert result.sacred_overlap is not None and result.sacred_overlap > 0.3
    assert any("overlaps the sacred directions" in w for w in warnings)
    assert set(result.extra_tensors()) == {
        "helpfulness_directions",
        "sacred_directions",
        "probe_accuracy",
    }
    assert mean_abs_cosine(result.refusal, result.sacred) < 1e-5


def test_streaming_setting_streams(monkeypatch):
    import heretic.prompts

    seen = {}

    def fake(spec, setting):
        seen["spec"] = spec
        return ["a"]

    monkeypatch.setattr(heretic.prompts, "_load_hub_streaming", fake)
    spec = DatasetSpecification(
        dataset="allenai/c4", split="train[:2]", config="en", streaming=True
    )
    assert heretic.prompts.load_prompts(spec, "unhelpfulness_prompts") == ["a"]
    defaults = _settings()
    assert defaults.unhelpfulness_prompts.streaming and defaults.unhelpfulness_prompts.config
    assert defaults.sacred_prompts.column == "question"


GOOD = [f"Tell me a fact about the number {i}." for i in range(24)]
BAD = [f"Explain how to steal item number {i} from a shop." for i in range(24)]
PROSE = [f"The river ran past the mill for the {i}th summer in a row." for i in range(12)]
QUESTIONS = [f"What is {i} plus {i + 1}?" for i in range(12)]


def test_pipeline_saves_and_reuses_extras(tiny_chat_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    files = {}
    for name, lines in (("good", GOOD), ("bad", BAD), ("prose", PROSE), ("q", QUESTIONS)):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"

    def settings(**extra):
        spec = {"dataset": "", "split": ""}
        sets = {
            "good_prompts": (files["good"], "[:16]"),
            "bad_prompts": (files["bad"], "[:16]"),
            "good_evaluation_prompts": (files["good"], "[16:]"),
            "bad_evaluation_prompts": (files["bad"], "[16:]"),
            "helpful_prompts": (files["good"], "[16:]"),
            "unhelpfulness_prompts": (files["prose"], "[:12]"),
            "sacred_prompts": (files["q"], "[:12]"),
            "sacred_baseline_prompts": (files["prose"], "[:12]"),
        }
        prompt_sets = {k: {**spec, "dataset": str(p), "split": s} for k, (p, s) in sets.items()}
        options = {
            "n_trials": 1,
            "max_response_length": 2,
            "batch_size": 8,
            "select": "none",
            "orthogonalize_good_mean": False,
            "readout": "direction",
            # The helpful prompts share the good file: nothing could be held out.
            "confirm": False,
        }
        return load_settings(
            [],
            model=str(tiny_chat_model),
            output_dir=out,
            **{**options, **prompt_sets, **extra},
        )

    extras = {
        "use_supervised_probing": True,
        "orthogonalize_directions": True,
        "use_sacred_directions": True,
        "n_sacred_directions": 2,
    }
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        run(settings(**extras), Console(file=f, width=300))
    text = log.read_text()
    # The random model refuses nothing: probing falls back, loudly.
    assert "supervised probing skipped" in text
    directions, metadata = load_directions(out / DIRECTIONS_FILE)
    saved = load_direction_extras(out / DIRECTIONS_FILE)
    assert set(saved) == {"helpfulness_directions", "sacred_directions"}
    assert json.loads(metadata["key"])["use_sacred_directions"] is True
    against = torch.cat(
        [saved["helpfulness_directions"].unsqueeze(1), saved["sacred_directions"]], 1
    )
    assert torch.einsum("lh,lkh->lk", directions, against).abs().max() < 1e-4

    with open(log, "w") as f:
        run(settings(**extras, n_trials=2), Console(file=f, width=300))
    assert "Reusing refusal directions" in log.read_text()
    # Other extras (here: none) would recompute instead of reusing the file.
    plain = settings()
    prompts = {
        name: load_prompts(getattr(plain, name), name) for name in ("good_prompts", "bad_prompts")
    }
    current = directions_metadata(plain, prompts, *directions.shape)
    differences = directions_differences(metadata, current)
    assert {line.split(":")[0] for line in differences} == {
        "use_supervised_probing",
        "probe_l2",
        "min_probe_accuracy",
        "ensemble_probe_pca",
        "probe_weight",
        "probe_response_length",
        "seed",
        "refusal_markers",
        "ignore_echoed_markers",
        "orthogonalize_directions",
        "helpful_prompts",
        "unhelpfulness_prompts",
        "use_sacred_directions",
        "n_sacred_directions",
        "sacred_alpha",
        "sacred_prompts",
        "sacred_baseline_prompts",
    }
    assert "helpful_prompts: the file was made from other prompts" in differences


def test_study_fingerprint_includes_extras_in_use():
    plain = study_key(_settings())
    assert "use_sacred_directions" not in plain and "probe_weight" not in plain
    assert "orthogonalize_good_mean" not in plain and plain["row_normalization"] == "none"
    assert study_key(_settings(orthogonalize_good_mean=True))["orthogonalize_good_mean"]
    sacred = study_key(_settings(use_sacred_directions=True))
    assert sacred["use_sacred_directions"] is True and sacred["n_sacred_directions"] == 5
    assert {k: v for k, v in sacred.items() if k in plain} == plain
