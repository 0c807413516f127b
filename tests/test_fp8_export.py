"""Already-quantized checkpoints: an FP8 checkpoint (float8_e4m3fn weights plus a
weight_scale_inv per 16 x 16 block, as DeepSeek / Qwen FP8 checkpoints store them, in three
shards) loads on a CPU (transformers dequantizes it to bf16) and is searched as loaded; the
shard export dequantizes only the edited weights, writes them in bf16, drops their scales and
lists their modules as not quantized. Other stored quantizations are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_pipeline import _argv, _quiet, prompt_files  # noqa: F401 (a fixture)
from tiny_models import sample_edit

from heretic.cli import run
from heretic.config import load_settings
from heretic.edit import EditHooks, TrialEdit, edited_tensor
from heretic.loading import load_model
from heretic.quantization import dequantize_fp8
from heretic.shard_edits import plan_shard_export
from heretic.shard_export import INDEX_FILE, ShardExportUnsupported, save_edited_checkpoint

BLOCK = 16
SCALE = "weight_scale_inv"


def quantize_fp8(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale per block): w ~ fp8 * scale, block by block."""
    rows, cols = w.shape
    tiles = w.float().reshape(rows // block, block, cols // block, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
    fp8 = (tiles / scale[:, None, :, None]).reshape(rows, cols).to(torch.float8_e4m3fn)
    return fp8, scale


def write_fp8_checkpoint(source: Path, out: Path, scale_name: str = SCALE, method: str = "fp8"):
    """`source`'s decoder projections in FP8 with block scales, the rest as it is, in three
    shards with an index; config.json declares the quantization."""
    shutil.copytree(source, out)
    (out / "model.safetensors").unlink()
    tensors = load_file(source / "model.safetensors")
    converted: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            converted[name], scale = quantize_fp8(value)
            converted[name.removesuffix("weight") + scale_name] = scale
        else:
            converted[name] = value
    names = sorted(converted)
    weight_map = {}
    for k in range(3):
        file = f"model-0000{k + 1}-of-00003.safetensors"
        part = {n: converted[n].contiguous() for n in names[k::3]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index))
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": method,
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": [BLOCK, BLOCK],
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def fp8_checkpoint(tiny_chat_model, tmp_path_factory) -> Path:
    return write_fp8_checkpoint(tiny_chat_model, tmp_path_factory.mktemp("fp8") / "model")


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            found |= {name: f.get_tensor(name) for name in f.keys()}
    return found


def test_fp8_checkpoint_loads_on_cpu_and_is_searched_as_loaded(fp8_checkpoint, tiny_chat_model):
    logged = []
    model = load_model(str(fp8_checkpoint), log=logged.append)
    assert any("stored quantized (fp8)" in line for line in logged)
    assert not model.quantization  # transformers dequantized it (no FP8 kernels on a CPU)
    plain = load_model(str(tiny_chat_model))
    ids = ["Say hello."]
    drift = (model.first_token_logprobs(ids, 1) - plain.first_token_logprobs(ids, 1)).abs().max()
    assert 0 < drift < 0.5  # the FP8 rounding, and nothing worse


@pytest.mark.parametrize("row_normalization", ["none", "full"])
def test_fp8_export_dequantizes_only_the_edited_weights(
    fp8_checkpoint, tmp_path, row_normalization
):
    model = load_model(str(fp8_checkpoint))
    directions, strengths = sample_edit()
    edit = TrialEdit(strengths, directions, None, row_normalization)
    _, edits = plan_shard_export(str(fp8_checkpoint), model.sites, edit)
    out = tmp_path / "out"
    report = save_edited_checkpoint(fp8_checkpoint, edits, out)

    source, written = _all_tensors(fp8_checkpoint), _all_tensors(out)
    edited_modules = sorted(n.removesuffix(".weight") for n in report.edited)
    assert edited_modules == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]
    dropped = {f"{m}.{SCALE}" for m in edited_modules}
    assert set(written) == set(source) - dropped
    by_name = {f"{s.name}.weight": s for s in model.sites}
    for name, tensor in source.items():
        if name in dropped:
            continue
        if name not in report.edited:
            assert torch.equal(written[name].view(torch.uint8), tensor.view(torch.uint8)), name
            continue
        module = name.removesuffix("weight")
        values = dequantize_fp8(tensor, source[module + SCALE], (BLOCK, BLOCK))
        site = by_name[name]
        if row_normalization == "none":
            row = edit.row_edit(site)
        else:  # rows' norms from the dequantized checkpoint weight, not the loaded bf16 copy
            from dataclasses import replace

            first = replace(site.weights[0], param=values)
            row = edit.row_edit(replace(site, weights=[first]))
        expected = edited_tensor(row, site.weights[0], values).to(torch.bfloat16)
        assert written[name].dtype == torch.bfloat16
        assert torch.equal(written[name], expected), name

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == edited_modules
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(written)
    sizes = sum((out / f).stat().st_size for f in set(index["weight_map"].values()))
    assert 0 < index["metadata"]["total_size"] < sizes


def test_fp8_export_loads_with_the_hooked_models_logits(fp8_checkpoint, tmp_path):
    model = load_model(str(fp8_checkpoint))
    directions, strengths = sample_edit()
    _, edits = plan_shard_export(str(fp8_checkpoint), model.sites, TrialEdit(strengths, directions))
    save_edited_checkpoint(fp8_checkpoint, edits, tmp_path / "out")
    prompts = ["Say hello.", "Name a colour."]
    hooks = EditHooks(model.sites, directions)
    hooks.set_strengths(strengths)
    hooked = model.first_token_logprobs(prompts, 2)
    hooks.remove()
    merged = load_model(str(tmp_path / "out")).first_token_logprobs(prompts, 2)
    assert (merged - hooked).abs().max() < 0.05


def test_other_stored_quantizations_are_refused_by_name(tiny_chat_model, tmp_path):
    model = load_model(str(tiny_chat_model))
    directions, strengths = sample_edit()
    edit = TrialEdit(strengths, directions)
    other = write_fp8_checkpoint(
        tiny_chat_model, tmp_path / "ct", scale_name="weight_scale", method="compressed-tensors"
    )
    with pytest.raises(ShardExportUnsupported, match="F8_E4M3 in a compressed-tensors checkpoint"):
        plan_shard_export(str(other), model.sites, edit)
    fp8 = write_fp8_checkpoint(tiny_chat_model, tmp_path / "fp8")
    shard = next(f for f, names in _shards(fp8).items() if any(SCALE in n for n in names))
    tensors = load_file(fp8 / shard)
    dropped = next(n for n in tensors if n.endswith("down_proj." + SCALE))
    del tensors[dropped]
    save_file(tensors, str(fp8 / shard), metadata={"format": "pt"})
    index = json.loads((fp8 / INDEX_FILE).read_text())
    del index["weight_map"][dropped]
    (fp8 / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ShardExportUnsupported, match=f"has no .*{SCALE} block scales"):
        plan_shard_export(str(fp8), model.sites, edit)


def _shards(folder: Path) -> dict[str, list[str]]:
    index = json.loads((folder / INDEX_FILE).read_text())
    files: dict[str, list[str]] = {}
    for name, file in index["weight_map"].items():
        files.setdefault(file, []).append(name)
    return files


def test_search_on_an_fp8_checkpoint_end_to_end(
    fp8_checkpoint,
    prompt_files,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = _argv(fp8_checkpoint, prompt_files, out, "--n-trials", "2", "--select", "best")
    result = run(load_settings(argv), _quiet())
    assert result.chosen_trial is not None
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"]
    assert load_model(str(out / "model")).n_layers == 2
