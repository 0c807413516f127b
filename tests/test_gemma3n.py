"""Gemma 3n cannot be edited completely, and heretic stops naming why.

Its decoder keeps `altup_num_inputs` residual streams. Each layer predicts every stream as a
per-token linear mix of the streams (AltUp's predict), runs attention, LAuReL and the MLP on the
active stream, corrects every stream by the active stream's change times a per-stream scalar
(correct), and adds `per_layer_projection`'s output to the other streams. Mixes with scalar
coefficients keep streams free of a direction r, and so would the writers (`self_attn.o_proj`,
`laurel.linear_right`, `mlp.down_proj`, `per_layer_projection`, each through its post-norm) once
projected off r; `altup_projections` / `altup_unembed_projections` and their magnitude rescale
sit before the first and after the last layer. What breaks it is LAuReL: the block returns its
input plus its update, and its input is `input_layernorm(active stream) = g * x / rms(x)`, so each
layer adds its own residual rescaled per channel by g. A residual free of r is not free of it
after that gain, whatever is done to the writers. The tests show both halves: discovery refuses
naming the LAuReL block and the norm, and projecting every writer off r leaves r in the streams
unless the gain is made uniform (which also shows those four are all the other writers). The
coverage check, given those four writers as sites, sees it too: not through its coordinate axes,
which an elementwise gain keeps at zero, but through its random direction.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_model

from heretic.coverage import check_coverage
from heretic.discovery import discover_sites
from heretic.errors import ModelLoadError
from heretic.sites import ATTN, MLP, EditSite, WriterTensor

GEMMA3N = dict(
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    num_kv_shared_layers=2,  # the last two layers reuse the keys and values of the first two
    laurel_rank=8,
    activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
)


@pytest.fixture(scope="module")
def gemma3n():
    torch.set_num_threads(1)
    return tiny_model("gemma3n_text", **GEMMA3N)


def test_discovery_names_the_laurel_block_and_the_norm_it_adds_back(gemma3n):
    with pytest.raises(ModelLoadError) as error:
        discover_sites(gemma3n)
    message = str(error.value)
    assert message.startswith("model.layers.0 (Gemma3nTextDecoderLayer): model.layers.0.laurel ")
    assert "adds the output of model.layers.0.input_layernorm (Gemma3nRMSNorm)" in message
    assert "per-channel gain" in message


def test_heretic_stops_loading_a_gemma3n_checkpoint(chat_tokenizer_dir, tmp_path):
    """The refusal comes at load, through heretic's own path, before any search."""
    from transformers import AutoTokenizer

    from heretic.loading import load_model

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    tiny_model("gemma3n_text", vocab_size=len(tokenizer), **GEMMA3N).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"laurel .*input_layernorm .*per-channel gain"):
        load_model(str(tmp_path), dtype="float32")


def _writers(layer):
    """Every module writing into Gemma 3n's streams, with the norm applied to its output."""
    return [
        (layer.self_attn.o_proj, layer.post_attention_layernorm),
        (layer.laurel.linear_right, layer.laurel.post_laurel_norm),
        (layer.mlp.down_proj, layer.post_feedforward_layernorm),
        (layer.per_layer_projection, layer.post_per_layer_input_norm),
    ]


def _kept_along(model, r: torch.Tensor, edit: bool) -> torch.Tensor:
    """Per layer, the largest |stream . r| of its output streams, with r removed from every
    input stream and (when `edit`) from every writer, as the plain edit does with post-norms."""
    kept = torch.zeros(len(model.model.layers))
    handles = []
    for index, layer in enumerate(model.model.layers):

        def pre(_module, args, kwargs):
            x = args[0]
            return (x - (x @ r)[..., None] * r, *args[1:]), kwargs

        def post(_module, _args, out, index=index):
            kept[index] = (out @ r).abs().max()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post))
        for writer, norm in _writers(layer) if edit else []:
            u = torch.nn.functional.normalize(norm.weight.detach() * r, dim=0)
            handles.append(
                writer.register_forward_hook(lambda _m, _a, o, u=u: o - (o @ u)[..., None] * u)
            )
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(3, 9).unsqueeze(0), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return kept


def test_the_laurel_skip_keeps_a_direction_no_edit_of_the_writers_removes():
    model = tiny_model("gemma3n_text", **GEMMA3N)
    generator = torch.Generator().manual_seed(1)
    r = torch.nn.functional.normalize(torch.randn(64, generator=generator), dim=0)
    unedited = _kept_along(model, r, edit=False)
    assert bool((unedited > 0).all())
    # Every writer projected off r: the streams still carry r, through input_layernorm's gain.
    assert float((_kept_along(model, r, edit=True) / unedited).max()) > 0.02
    # A coordinate axis (the coverage check's probe) passes the gain untouched.
    axis = torch.nn.functional.one_hot(torch.tensor(5), 64).float()
    assert float(_kept_along(model, axis, edit=True).max()) == 0.0
    # With a uniform gain the same edit is complete: those four are every other writer.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(float(layer.input_layernorm.weight.mean()))
    assert float((_kept_along(model, r, edit=True) / _kept_along(model, r, False)).max()) < 1e-5


def _hand_made_sites(model) -> list[EditSite]:
    """The four writers of every layer as edit sites, with their post-norms' gains (discovery
    refuses the model, so the coverage check gets them by hand)."""
    names = {id(module): name for name, module in model.named_modules()}
    sites = []
    for index, layer in enumerate(model.model.layers):
        for writer, norm in _writers(layer):
            name = names[id(writer)]
            component = ATTN if writer is layer.self_attn.o_proj else MLP
            weights = [WriterTensor(f"{name}.weight", writer.weight, out_axis=0)]
            gain = norm.weight.detach().float()
            sites.append(EditSite(index, component, name, writer, weights, gain=gain))
    return sites


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_coverage_check_sees_the_laurel_gain(dtype):
    torch.set_num_threads(1)
    model = tiny_model("gemma3n_text", dtype=dtype, **GEMMA3N)
    layers = model.model.layers
    with pytest.raises(
        ModelLoadError, match=r"layer 0 \(Gemma3nTextDecoderLayer\) keeps .* random"
    ):
        check_coverage(model, layers, _hand_made_sites(model), 64)
    with torch.no_grad():
        for layer in layers:
            layer.input_layernorm.weight.fill_(float(layer.input_layernorm.weight.float().mean()))
    check_coverage(model, layers, _hand_made_sites(model), 64)
