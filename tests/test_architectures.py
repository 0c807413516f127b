"""The edit on tiny random models of every supported architecture (no downloads).

For each: the decoder layers and the writers into the residual stream are found; with strength 1
the hooked modules' outputs have no component along r; and merging the edit into the weights
gives the same logits as the hooks, so what the search scored is what gets saved.
"""

import pytest
import torch
import transformers

from heretic.directions import normalize
from heretic.edit import EditHooks, TrialEdit, merge_edit, restore_weights
from heretic.sites import ATTN, COMPONENTS, MLP, discover_sites

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

CONFIGS = {
    "llama": (transformers.LlamaConfig, {}),
    "qwen2": (transformers.Qwen2Config, {}),
    "qwen3": (transformers.Qwen3Config, {"head_dim": 16}),
    "gemma3": (transformers.Gemma3TextConfig, {"head_dim": 16, "sliding_window": 16}),
    "mistral": (transformers.MistralConfig, {}),
    "phi3": (transformers.Phi3Config, {"pad_token_id": 0}),
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "head_dim": 16},
    ),
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def tiny_model(name: str) -> torch.nn.Module:
    config_class, extra = CONFIGS[name]
    torch.manual_seed(0)
    config = config_class(**COMMON, **extra)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _directions(n_layers: int, hidden: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return normalize(torch.randn(n_layers, hidden, generator=g))


@pytest.fixture(params=sorted(CONFIGS))
def arch(request):
    model = tiny_model(request.param)
    return request.param, model, discover_sites(model)


def test_finds_layers_and_writers(arch):
    name, model, sites = arch
    assert {(s.layer, s.component) for s in sites} == {
        (i, c) for i in range(COMMON["num_hidden_layers"]) for c in COMPONENTS
    }


@pytest.mark.parametrize("row_normalization", ["none", "full"])
def test_merged_weights_match_hooks_and_restore_exactly(arch, row_normalization):
    """Also with row normalization, which mixture-of-experts blocks (hooked as a whole) skip
    in both forms alike."""
    name, model, modules = arch
    n = COMMON["num_hidden_layers"]
    directions = _directions(n, COMMON["hidden_size"])
    strengths = {ATTN: torch.tensor([0.0, 0.7, 1.2])[:n], MLP: torch.tensor([1.0, 0.0, 0.5])[:n]}
    ids = torch.randint(0, COMMON["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(input_ids=ids).logits
        hooks = EditHooks(modules, directions, row_normalization)
        hooks.set_strengths(strengths)
        hooked = model(input_ids=ids).logits
        hooks.remove()
        originals = merge_edit(modules, TrialEdit(strengths, directions, None, row_normalization))
        merged = model(input_ids=ids).logits
        restore_weights(modules, originals)
        restored = model(input_ids=ids).logits
    assert not torch.allclose(base, hooked, atol=1e-4)  # the edit does something
    torch.testing.assert_close(merged, hooked, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(restored, base, atol=0, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
