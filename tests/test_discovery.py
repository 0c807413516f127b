"""Discovery and the coverage self-check on layers heretic does not know: each stops with a
message naming the layer and what it cannot edit; nothing is skipped silently."""

from __future__ import annotations

import pytest
import torch
from tiny_models import coverage_failure, tiny_model
from torch import nn

from heretic.discovery import discover_sites, find_decoder_layers
from heretic.errors import ModelLoadError
from heretic.sites import ATTN, MLP


class _ExtraBias(nn.Module):
    """Wraps a decoder layer and adds a learned vector to its output: a residual writer that is
    no module's output."""

    def __init__(self, layer: nn.Module, hidden: int):
        super().__init__()
        self.layer = layer
        self.extra = nn.Parameter(torch.full((hidden,), 0.5))

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        h = h + self.extra
        return (h, *out[1:]) if isinstance(out, tuple) else h


class _ScaledResidual(nn.Module):
    """Scales the residual stream per channel by a learned vector (as Doge does): a layer
    whose output is not its input plus writers."""

    def __init__(self, layer: nn.Module, hidden: int):
        super().__init__()
        self.layer = layer
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, hidden))

    def forward(self, hidden_states, *args, **kwargs):
        return self.layer(hidden_states * self.scale, *args, **kwargs)


class _NormalizedSkip(nn.Module):
    """Adds the layer's normalized input to its output (as Gemma 3n's LAuReL block and BLOOM's
    post-layernorm residual do): the residual rescaled per channel by the norm's gain."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, *args, **kwargs):
        out = self.layer(hidden_states, *args, **kwargs)
        return out + self.layer.input_layernorm(hidden_states)


def test_sites_of_a_dense_model():
    model = tiny_model("llama", num_hidden_layers=2)
    sites = discover_sites(model)
    assert [(s.layer, s.component, s.name) for s in sites] == [
        (0, ATTN, "model.layers.0.self_attn.o_proj"),
        (0, MLP, "model.layers.0.mlp.down_proj"),
        (1, ATTN, "model.layers.1.self_attn.o_proj"),
        (1, MLP, "model.layers.1.mlp.down_proj"),
    ]


def test_fused_experts_orientation_comes_from_the_computation_not_the_shape():
    """gpt-oss keeps experts as (E, in, out) with biases; with the expert size equal to the
    hidden size the shapes cannot tell the axes apart, the graph can."""
    model = tiny_model("gpt_oss", num_hidden_layers=1, intermediate_size=64)
    (experts,) = [s for s in discover_sites(model) if s.component == MLP]
    (weight,) = experts.weights
    assert weight.param.shape == (4, 64, 64)
    assert (weight.out_axis, weight.expert_axis) == (2, 0)
    assert [b.name for b in experts.biases] == ["model.layers.0.mlp.experts.down_proj_bias"]


def test_post_norm_gain_turns_the_direction():
    model = tiny_model("gemma3_text", num_hidden_layers=1)
    sites = discover_sites(model)
    assert all(site.gain is not None for site in sites)
    r = torch.nn.functional.normalize(torch.randn(64), dim=0)
    u = sites[0].direction(r)
    expected = torch.nn.functional.normalize(sites[0].gain * r, dim=0)
    torch.testing.assert_close(u, expected)


def test_a_vector_added_outside_any_module_is_named():
    model = tiny_model("llama", num_hidden_layers=2)
    layers = find_decoder_layers(model)
    layers[1] = _ExtraBias(layers[1], 64)
    with pytest.raises(
        ModelLoadError,
        match=r"model.layers.1 adds .*the parameter extra \(64,\).*cannot trace back to a module",
    ):
        discover_sites(model)


def test_a_layer_that_rescales_its_residual_is_refused():
    model = tiny_model("llama", num_hidden_layers=2)
    layers = find_decoder_layers(model)
    layers[0] = _ScaledResidual(layers[0], 64)
    with pytest.raises(ModelLoadError, match=r"model.layers.0 .*no residual connection found"):
        discover_sites(model)


def test_a_layer_that_adds_its_normalized_residual_is_refused():
    """Discovery names the norm whose per-channel gain it adds (the coverage check sees the
    leak too, test_coverage, but cannot say where it comes from)."""
    model = tiny_model("llama", num_hidden_layers=2)
    layers = find_decoder_layers(model)
    layers[1] = _NormalizedSkip(layers[1])
    with pytest.raises(
        ModelLoadError,
        match=r"model.layers.1 \(_NormalizedSkip\): the layer adds the output of "
        r"model.layers.1.layer.input_layernorm \(LlamaRMSNorm\), .* per-channel gain",
    ):
        discover_sites(model)


def test_coverage_check_names_the_layer_and_the_unedited_module():
    message = coverage_failure(tiny_model("llama", num_hidden_layers=2), 1, MLP)
    assert "layer 1 (LlamaDecoderLayer)" in message and "mlp.down_proj (Linear)" in message
    assert "layer 0" not in message
