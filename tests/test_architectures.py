"""The edit on tiny random models of every supported architecture (no downloads).

For each: the decoder layers and the writers into the residual stream are found; with strength 1
the hooked modules' outputs have no component along r; and merging the edit into the weights
gives the same logits as the hooks, so what the search scored is what gets saved.
"""

import pytest
import torch
import transformers

from heretic.abliteration import EditHooks, merge_edit, restore_weights
from heretic.directions import normalize
from heretic.model import ATTN, COMPONENTS, MLP, editable_modules, find_decoder_layers

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
    layers = find_decoder_layers(model)
    modules = [editable_modules(layer, i) for i, layer in enumerate(layers)]
    return request.param, model, modules


def test_finds_layers_and_writers(arch):
    name, model, modules = arch
    assert len(modules) == COMMON["num_hidden_layers"]
    for components in modules:
        assert set(components) == set(COMPONENTS)
        assert all(components[c] for c in COMPONENTS)


def test_full_strength_leaves_no_component_along_r(arch):
    name, model, modules = arch
    directions = _directions(len(modules), COMMON["hidden_size"])
    hooks = EditHooks(modules, directions)
    hooks.set_strengths({c: torch.ones(len(modules)) for c in COMPONENTS})
    outputs: list[tuple[int, torch.Tensor]] = []
    capture = []
    for i, components in enumerate(modules):
        for c in COMPONENTS:
            for module in components[c]:

                def grab(_m, _inp, out, i=i):
                    outputs.append((i, out[0] if isinstance(out, tuple) else out))

                # Registered after the edit hook, so it sees the edited output.
                capture.append(module.register_forward_hook(grab))
    ids = torch.randint(0, COMMON["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model(input_ids=ids)
    assert len(outputs) == 2 * len(modules)
    for i, out in outputs:
        along = out @ directions[i]
        assert along.abs().max() < 1e-4 * max(1.0, float(out.abs().max())), (name, i)
    for h in capture:
        h.remove()
    hooks.remove()


@pytest.mark.parametrize("row_normalization", ["none", "full"])
def test_merged_weights_match_hooks_and_restore_exactly(arch, row_normalization):
    """Also with row normalization, which mixture-of-experts blocks (hooked as a whole) skip
    in both forms alike."""
    name, model, modules = arch
    n = len(modules)
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
        originals = merge_edit(
            modules, directions, strengths, COMMON["hidden_size"], row_normalization
        )
        merged = model(input_ids=ids).logits
        restore_weights(modules, originals)
        restored = model(input_ids=ids).logits
    assert not torch.allclose(base, hooked, atol=1e-4)  # the edit does something
    torch.testing.assert_close(merged, hooked, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(restored, base, atol=0, rtol=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
