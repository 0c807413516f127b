"""Memory placement: max_memory reaches accelerate's placement, bad values are clear errors, and
the stored layer outputs of layer skipping can live in CPU memory with the same KL."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.functional import normalize

from heretic import loading
from heretic.config import load_settings
from heretic.edit import EditHooks
from heretic.errors import ModelLoadError, SettingsError
from heretic.evaluation import Evaluator
from heretic.judges import MarkerJudge
from heretic.loading import load_model
from heretic.placement import (
    batch_size_reserve,
    layer_outputs_device,
    parse_max_memory,
)
from heretic.search import layer_outputs_store
from heretic.sites import COMPONENTS

CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)
GOOD = [f"Tell me a fact about the number {i}." for i in range(7)]


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, 1 = 24GB,cpu=64GiB") == {
        0: "20GiB",
        1: "24GB",
        "cpu": "64GiB",
    }
    assert parse_max_memory("cuda:1=500MiB") == {1: "500MiB"}
    assert parse_max_memory("cpu=1000000") == {"cpu": "1000000"}
    for bad, why in [
        ("disk=100GiB", "disk offload is not supported"),
        ("gpu0=1GiB", "unknown device 'gpu0'"),
        ("0=lots", "'lots' is not a size"),
        ("0=1GiB,cuda:0=2GiB", "given twice"),
        ("0:1GiB", "is not DEVICE=SIZE"),
        (" , ", "is empty"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_max_memory(bad)


def test_max_memory_settings():
    settings = load_settings(["--model", "m", "--max-memory", "0=20GiB,cpu=64GiB"])
    assert settings.max_memory_map() == {0: "20GiB", "cpu": "64GiB"}
    assert load_settings(["--model", "m"]).max_memory_map() is None
    with pytest.raises(SettingsError, match="device_map 'cpu' places the model itself"):
        load_settings(["--model", "m", "--max-memory", "cpu=8GiB", "--device-map", "cpu"])
    with pytest.raises(SettingsError, match="max_memory: Value error, disk offload"):
        load_settings(["--model", "m", "--max-memory", "disk=8GiB"])
    with pytest.raises(SettingsError, match="layer_outputs_device"):
        load_settings(["--model", "m", "--layer-outputs-device", "gpu"])


@pytest.mark.parametrize("quantization", ["none", "bnb_4bit"])
def test_placement_settings_reach_from_pretrained(tiny_chat_model, monkeypatch, quantization):
    """max_memory goes to from_pretrained with device_map 'auto' (kept even without a GPU, so
    accelerate applies the CPU's cap); bitsandbytes may then keep offloaded layers in fp32."""
    seen: list[dict] = []
    real = loading.from_pretrained

    def watched(auto_class, path, **kwargs):
        seen.append(copy.deepcopy(kwargs))  # transformers rewrites max_memory in place
        return real(auto_class, path, **kwargs)

    monkeypatch.setattr(loading, "from_pretrained", watched)
    model = load_model(str(tiny_chat_model), max_memory={"cpu": "2GiB"}, quantization=quantization)
    (kwargs,) = seen
    assert kwargs["max_memory"] == {"cpu": "2GiB"} and kwargs["device_map"] == "auto"
    assert {p.device.type for p in model.model.parameters()} == {"cpu"}
    if quantization == "none":
        assert "quantization_config" not in kwargs
    else:
        config = kwargs["quantization_config"]
        assert config.load_in_4bit and config.llm_int8_enable_fp32_cpu_offload
        assert model.quantization == ["bitsandbytes 4-bit"]
    seen.clear()
    load_model(str(tiny_chat_model))
    assert "max_memory" not in seen[0] and seen[0]["device_map"] is None  # no GPU here


def test_a_cap_that_leaves_no_room_is_a_clear_error(tiny_chat_model):
    with pytest.raises(ModelLoadError, match="offloaded to disk, which heretic does not support"):
        load_model(str(tiny_chat_model), max_memory={"cpu": "20KiB"})


def test_where_layer_outputs_live():
    budget = 2**30
    assert layer_outputs_device("cpu", GPU, budget, 80 * 2**30) == CPU
    assert layer_outputs_device("model", GPU, budget, 2**30) is None  # with each layer
    assert layer_outputs_device("auto", GPU, budget, 80 * 2**30) is None
    assert layer_outputs_device("auto", GPU, budget, 3 * 2**30) == CPU  # short of memory
    assert layer_outputs_device("auto", GPU, budget, None) is None  # unknown: as before
    assert layer_outputs_device("auto", CPU, budget, None) is None
    with pytest.raises(ValueError, match="unknown place"):
        layer_outputs_device("disk", GPU, budget, None)
    assert batch_size_reserve(None, budget) == budget
    assert batch_size_reserve(CPU, budget) == 0


def test_stored_layer_outputs_in_cpu_memory_give_the_same_kl(tiny_chat_model):
    model = load_model(str(tiny_chat_model), dtype="bfloat16")
    settings = load_settings(["--model", "m", "--layer-outputs-device", "cpu"])
    store = layer_outputs_store(settings, model)
    assert store == CPU
    judge = MarkerJudge(("sorry",))
    logged: list[str] = []
    args = (model, GOOD, GOOD[:2], judge, 2, 3)
    kept = Evaluator(*args, layer_skip_bytes=2**30, layer_outputs_store=store, log=logged.append)
    plain = Evaluator(*args, layer_skip_bytes=2**30)
    assert kept.layer_outputs is not None and "on cpu" in logged[-1]
    assert all(t.device == CPU for batch in kept.layer_outputs.batches for t in batch.values())
    assert torch.equal(kept.base_logprobs, plain.base_logprobs)
    directions = normalize(torch.randn(model.n_layers, model.hidden_size), dim=-1)
    hooks = EditHooks(model.sites, directions)
    strengths = {c: torch.tensor([0.0, 1.0]) for c in COMPONENTS}
    hooks.set_strengths(strengths)
    try:
        assert kept.kl(1) == plain.kl(1) == kept.kl(0) > 0
    finally:
        hooks.remove()


def test_batch_size_search_reserves_nothing_on_a_cpu(tiny_chat_model):
    """The reserve is held on an accelerator only: a 1 TiB reserve on a CPU model is not
    allocated (it would fail)."""
    model = load_model(str(tiny_chat_model), dtype="bfloat16")
    assert model.find_batch_size(GOOD, 8, reserve_bytes=2**40) in (1, 8)
