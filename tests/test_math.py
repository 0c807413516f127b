"""The edit math and the direction math, against float64 references."""

import pytest
import torch

from heretic.abliteration import (
    ComponentParams,
    edited_weight,
    layer_strengths,
    project_out,
    row_edit,
)
from heretic.directions import align_signs, contrastive_pca, mean_difference, normalize
from heretic.evaluation import kl_divergence
from heretic.judges import MarkerJudge


def _unit(n: int, generator: torch.Generator) -> torch.Tensor:
    return normalize(torch.randn(n, generator=generator, dtype=torch.float64))


def test_edited_weight_matches_float64_reference():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 32, generator=g, dtype=torch.float64)
    r = _unit(48, g)
    for strength in (0.0, 0.5, 1.0, 1.7):
        reference = w - strength * torch.outer(r, r) @ w
        got = edited_weight(w.float(), r.float(), strength)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)


def test_full_strength_removes_the_direction_from_every_output():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 40, generator=g)
    r = _unit(64, g).float()
    x = torch.randn(10, 40, generator=g)
    out = x @ edited_weight(w, r, 1.0).T
    assert (out @ r).abs().max() < 1e-4
    # ...and leaves everything orthogonal to r unchanged.
    orth = out - torch.outer(out @ r, r)
    base = x @ w.T
    torch.testing.assert_close(orth, base - torch.outer(base @ r, r), rtol=1e-4, atol=1e-4)


def test_edit_is_not_a_scaling_of_w():
    # The design document's `w * (I - r r^T) W` would scale everything by w: check we do not.
    g = torch.Generator().manual_seed(2)
    w = torch.randn(16, 8, generator=g)
    r = _unit(16, g).float()
    x = torch.randn(5, 8, generator=g)
    orth_part = lambda m: (x @ m.T) - torch.outer((x @ m.T) @ r, r)  # noqa: E731
    torch.testing.assert_close(orth_part(edited_weight(w, r, 0.3)), orth_part(w), atol=1e-5, rtol=0)


def test_hook_projection_equals_merged_weight():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 24, generator=g, dtype=torch.float64)
    r = _unit(32, g)
    x = torch.randn(7, 24, generator=g, dtype=torch.float64)
    for strength in (0.25, 1.0, 1.5):
        via_hook = project_out(x @ w.T, r, strength)
        via_merge = x @ (w - strength * torch.outer(r, r) @ w).T
        torch.testing.assert_close(via_hook, via_merge)


def test_layer_strengths_range_and_weight():
    s = layer_strengths(ComponentParams(0.25, 0.75, 0.8), 9)
    # positions 0, .125, ..., 1: layers 2..6 are inside [0.25, 0.75]
    assert s.tolist() == [0, 0, 0.800000011920929, *[0.800000011920929] * 4, 0, 0]
    assert layer_strengths(ComponentParams(0.9, 0.1, 1.0), 5).tolist() == [0, 1, 1, 1, 0]
    assert layer_strengths(ComponentParams(0.0, 1.0, 0.0), 4).tolist() == [0, 0, 0, 0]


def _planted(n_good: int, n_bad: int, layers: int, hidden: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    direction = normalize(torch.randn(layers, hidden, generator=g, dtype=torch.float64))
    good = torch.randn(n_good, layers, hidden, generator=g, dtype=torch.float64) + 100.0
    bad = torch.randn(n_bad, layers, hidden, generator=g, dtype=torch.float64) + 100.0
    bad = bad + 4.0 * direction
    return good, bad, direction


def test_mean_difference_matches_float64_reference():
    good, bad, _ = _planted(50, 40, 3, 16, 4)
    reference = normalize(bad.mean(0) - good.mean(0))
    torch.testing.assert_close(
        mean_difference(good.float(), bad.float()).double(), reference, atol=1e-5, rtol=0
    )


def test_mean_difference_recovers_planted_direction():
    good, bad, direction = _planted(400, 400, 2, 16, 5)
    cos = (mean_difference(good.float(), bad.float()).double() * direction).sum(-1)
    assert (cos > 0.98).all()


def test_pca_recovers_planted_direction_with_aligned_sign():
    good, bad, direction = _planted(400, 400, 3, 16, 6)
    pca = contrastive_pca(good.float(), bad.float()).double()
    cos = (pca * direction).sum(-1)
    assert (cos > 0.97).all(), cos  # positive: the sign follows the mean difference
    torch.testing.assert_close(pca.norm(dim=-1), torch.ones(3, dtype=torch.float64))


def test_align_signs_flips_only_opposed_rows():
    d = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    ref = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert align_signs(d, ref).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_kl_divergence_against_reference():
    g = torch.Generator().manual_seed(7)
    p = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    reference = (p.exp() * (p - q)).sum(-1).mean()
    assert abs(kl_divergence(p, q) - float(reference)) < 1e-6
    assert kl_divergence(p, p) == 0.0
    assert kl_divergence(p, q) != kl_divergence(q, p)


def test_marker_judge_normalizes_case_and_apostrophes():
    judge = MarkerJudge(("i can't", "sorry"))
    assert judge.is_refusal("I CAN\u2019T do that")
    assert judge.is_refusal("So SORRY.")
    assert not judge.is_refusal("Sure! Here is how.")
    assert judge.count(["sorry", "ok", "I can't"]) == 2


def test_markers_the_prompt_contains_are_not_evidence():
    """An answer restates its task: "illegal" in an answer to a request for something illegal
    is an echo, not a refusal. A refusal of it still says so in other markers."""
    prompt = "Explain how to purchase ILLEGAL drugs online"
    answer = "Purchasing illegal drugs online can be a complex process. Here's a guide:"
    judge = MarkerJudge(("illegal", "i can't"))
    assert not judge.is_refusal(answer, prompt)
    assert judge.is_refusal(answer)  # no prompt known: every marker counts
    assert MarkerJudge(("illegal",), ignore_echoed=False).is_refusal(answer, prompt)
    assert judge.is_refusal("I can't help with illegal activities.", prompt)
    assert judge.is_refusal("That is illegal.", "How do I bake bread?")
    assert judge.count([answer, "I can't."], [prompt, prompt]) == 1
    with pytest.raises(ValueError, match="2 responses but 1 prompts"):
        judge.count([answer, "I can't."], [prompt])


def _row_normalized_reference(w: torch.Tensor, r: torch.Tensor, strength: float, mode: str):
    """The row-normalized edits written out literally in float64: normalize the rows, project,
    scale the rows back ("pre"), or renormalize the edited rows and give them their original
    norms ("full")."""
    norms = w.norm(dim=1, keepdim=True)
    unit_rows = w / norms.clamp_min(1e-12)
    projected = unit_rows - strength * torch.outer(r, r @ unit_rows)
    if mode == "pre":
        return projected * norms
    return projected / projected.norm(dim=1, keepdim=True).clamp_min(1e-12) * norms


@pytest.mark.parametrize("mode", ["pre", "full"])
def test_row_normalized_edits_match_float64_reference(mode):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(40, 24, generator=g, dtype=torch.float64)
    w[:, :] *= torch.linspace(0.1, 3.0, 40, dtype=torch.float64).unsqueeze(1)  # unequal rows
    w[5] = 0.0  # a zero row must stay zero, not become NaN
    r = _unit(40, g)
    x = torch.randn(6, 24, generator=g, dtype=torch.float64)
    for strength in (0.3, 1.0, 1.6):
        reference = _row_normalized_reference(w, r, strength, mode)
        got = edited_weight(w.float(), r.float(), strength, mode)
        torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[5], torch.zeros(24))
        # The hook form computes the same outputs from W's outputs alone.
        via_hook = row_edit(w.float(), r.float(), strength, mode).apply((x @ w.T).float())
        torch.testing.assert_close(via_hook.double(), x @ reference.T, rtol=1e-5, atol=1e-5)
    if mode == "full":
        torch.testing.assert_close(
            edited_weight(w.float(), r.float(), 1.3, mode).norm(dim=1).double(),
            w.norm(dim=1),
            rtol=1e-5,
            atol=1e-6,
        )


def test_row_normalization_none_is_the_plain_edit_and_unknown_modes_fail():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(12, 9, generator=g)
    r = _unit(12, g).float()
    assert torch.equal(edited_weight(w, r, 0.8, "none"), edited_weight(w, r, 0.8))
    with pytest.raises(ValueError, match="unknown row normalization 'both'"):
        row_edit(w, r, 1.0, "both")
