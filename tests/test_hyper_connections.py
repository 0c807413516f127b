"""Hyper-connections (DeepSeek V4, GLM-5-Next): the residual is `hc_mult` streams
[B, S, N, D], each block reads a weighted collapse of them, and its output is added back as
`post[..., None] * out[..., None, :] + comb^T @ streams`. Discovery finds the writers through
the per-stream gain and the stream mixing, the coverage check sees every stream, the residuals
for the directions are the mean of the streams, and a layer that mixes its streams across
channels is refused."""

from __future__ import annotations

import pytest
import torch
from tiny_models import coverage_failure, tiny_model
from torch import nn

from heretic.discovery import discover_sites, find_decoder_layers
from heretic.edit import TrialEdit
from heretic.errors import ExportError, ModelLoadError
from heretic.export import adapter_weights
from heretic.gguf_export import plan_edits
from heretic.layer_outputs import last_position
from heretic.sites import ATTN, COMPONENTS, MLP


class _ChannelMixedStreams(nn.Module):
    """Multiplies a multi-stream layer's output by a learned hidden x hidden matrix: the streams
    are no longer a combination of input streams plus writers."""

    def __init__(self, layer: nn.Module, hidden: int):
        super().__init__()
        self.layer = layer
        self.mix = nn.Parameter(torch.eye(hidden) + 0.01)

    def forward(self, hidden_states, *args, **kwargs):
        return torch.matmul(self.layer(hidden_states, *args, **kwargs), self.mix)


@pytest.fixture(scope="module")
def deepseek_v4():
    torch.set_num_threads(1)
    return tiny_model("deepseek_v4")


def test_writers_are_found_through_the_stream_gain_and_mixing(deepseek_v4):
    sites = discover_sites(deepseek_v4)
    assert [(s.layer, s.component, s.name) for s in sites if s.layer == 1] == [
        (1, ATTN, "model.layers.1.self_attn.o_b_proj"),
        (1, MLP, "model.layers.1.mlp"),
    ]
    (experts,) = [s for s in sites if s.layer == 1 and s.component == MLP]
    assert sorted(w.name for w in experts.weights) == [
        "model.layers.1.mlp.experts.down_proj",
        "model.layers.1.mlp.shared_experts.down_proj.weight",
    ]
    assert all(s.gain is None for s in sites)  # a per-stream gain does not turn r


def test_coverage_check_reads_every_stream(deepseek_v4):
    message = coverage_failure(deepseek_v4, 2, ATTN)
    assert "layer 2 (DeepseekV4DecoderLayer)" in message
    assert "self_attn.o_b_proj (Linear)" in message and "layer 1 " not in message


def test_streams_mixed_across_channels_are_refused():
    model = tiny_model("deepseek_v4", num_hidden_layers=2, layer_types=None, mlp_layer_types=None)
    layers = find_decoder_layers(model)
    layers[1] = _ChannelMixedStreams(layers[1], 64)
    with pytest.raises(ModelLoadError, match=r"model.layers.1 .*no residual connection found"):
        discover_sites(model)


def test_the_residual_of_several_streams_is_their_mean_at_the_last_position():
    h = torch.randn(2, 5, 4, 8)
    torch.testing.assert_close(last_position(h, 2), h[:, -1].mean(dim=1))
    plain = torch.randn(2, 5, 8)
    assert torch.equal(last_position(plain, 2), plain[:, -1])
    flat = plain.reshape(10, 8)  # an expert block sees (tokens, hidden)
    assert torch.equal(last_position(flat, 2), plain[:, -1])


def test_gguf_export_names_the_writer_llama_cpp_has_no_name_for(deepseek_v4):
    """llama.cpp's GGUF layout for DeepSeek V4 (its grouped output projection o_b_proj) is not
    known here: a GGUF export stops naming the tensor instead of skipping it."""

    sites = discover_sites(deepseek_v4)
    directions = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1)
    edit = TrialEdit({c: torch.ones(4) for c in COMPONENTS}, directions)
    names = {f"blk.{i}.{t}.weight" for i in range(4) for t in ("ffn_down_exps", "ffn_down_shexp")}
    with pytest.raises(ExportError, match=r"model.layers.0.self_attn.o_b_proj.weight.*--export"):
        plan_edits(names, sites, edit)


def test_lora_adapter_names_the_fused_experts(deepseek_v4):
    """The adapter cannot express an edit of fused expert tensors: it names the block (the
    merged export and the hooks edit it)."""

    sites = discover_sites(deepseek_v4)
    directions = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1)
    edit = TrialEdit({c: torch.ones(4) for c in COMPONENTS}, directions)
    with pytest.raises(ExportError, match=r"model.layers.0.mlp .*mixture of experts"):
        adapter_weights(sites, edit)
