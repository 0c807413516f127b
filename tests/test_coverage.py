"""The coverage self-check's probes: a residual rescaled per channel fails it although it keeps
every coordinate axis (its random direction sees it), a uniform gain and bf16 rounding do not.

Discovery refuses these layers itself (no residual connection, a norm added back), so the sites
here are found before the layer is wrapped: the check alone must see what the wrapper does.
"""

from __future__ import annotations

import pytest
import torch
from test_discovery import _NormalizedSkip, _ScaledResidual
from tiny_models import tiny_model

from heretic.coverage import RELATIVE_TOLERANCE, _probes, check_coverage, probe_layers
from heretic.discovery import discover_sites, find_decoder_layers
from heretic.edit import EditHooks
from heretic.errors import ModelLoadError
from heretic.sites import COMPONENTS


def _wrapped(wrap, dtype: torch.dtype = torch.float32):
    """A 2-layer Llama, its sites, and layer 1 wrapped by `wrap` after discovery."""
    torch.set_num_threads(1)
    model = tiny_model("llama", dtype=dtype, num_hidden_layers=2)
    sites = discover_sites(model)
    layers = find_decoder_layers(model)
    layers[1] = wrap(layers[1]).to(dtype)
    return model, layers, sites


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_residual_scaled_per_channel_fails_naming_the_layer(dtype):
    model, layers, sites = _wrapped(lambda layer: _ScaledResidual(layer, 64), dtype)
    with pytest.raises(ModelLoadError) as error:
        check_coverage(model, layers, sites, 64)
    message = str(error.value)
    assert "layer 1 (_ScaledResidual) keeps " in message
    assert "along a random direction beyond rounding, none along coordinate axes" in message
    assert "layer 0" not in message


def test_a_uniform_gain_on_the_residual_passes():
    """A uniform gain keeps every direction out: the probe sees the per-channel part only."""

    def uniform(layer):
        scaled = _ScaledResidual(layer, 64)
        scaled.scale.data.fill_(1.3)
        return scaled

    check_coverage(*_wrapped(uniform), 64)


def test_a_normalized_residual_added_back_fails_naming_the_layer():
    """Gemma 3n's LAuReL pattern: the layer adds its input's RMS norm (a per-channel gain)."""
    model, layers, sites = _wrapped(_NormalizedSkip)
    with pytest.raises(ModelLoadError, match=r"layer 1 \(_NormalizedSkip\) keeps .* random"):
        check_coverage(model, layers, sites, 64)


def test_bf16_rounding_of_a_large_residual_passes_a_complete_edit():
    """A residual 100x what the layers write (as massive activations make it): in bf16 the
    complete edit keeps far more than RELATIVE_TOLERANCE of what a layer writes along a random
    direction, all of it rounding of the residual, and the check must pass it."""
    torch.set_num_threads(1)
    model = tiny_model("llama", dtype=torch.bfloat16, num_hidden_layers=2)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(100)
    layers, sites = find_decoder_layers(model), discover_sites(model)
    check_coverage(model, layers, sites, 64)
    _, directions = _probes(2, 64)[-1]
    ids = torch.arange(3, 9).unsqueeze(0)
    unedited = probe_layers(model, layers, sites, directions, ids)
    hooks = EditHooks(sites, directions)
    hooks.set_strengths({c: torch.ones(2) for c in COMPONENTS})
    edited = probe_layers(model, layers, sites, directions, ids)
    hooks.remove()
    kept = [float(e.along.max() / u.along.max()) for u, e in zip(unedited, edited, strict=True)]
    assert min(kept) > 10 * RELATIVE_TOLERANCE
