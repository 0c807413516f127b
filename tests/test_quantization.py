"""Quantized search (bitsandbytes 4/8-bit, on its CPU backend): the hooks run unchanged, the
weights they need are read dequantized, in-place edits are refused, and every export lands in
the checkpoint's full-precision weights exactly as if the search had run in bf16."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import optuna
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from test_finish import FakeEvaluator, _add_trial
from test_pipeline import _argv, _quiet, prompt_files  # noqa: F401 (a fixture)
from tiny_models import sample_edit

from heretic import quantization
from heretic.cli import run
from heretic.config import load_settings
from heretic.edit import EditHooks, TrialEdit, merge_edit
from heretic.errors import ExportError, ModelLoadError, SettingsError
from heretic.finish import Finisher
from heretic.loading import load_model
from heretic.quantization import QuantizedWeightError, dequantize_fp8, float_weight
from heretic.reset import make_edit
from heretic.shard_edits import plan_shard_export
from heretic.shard_export import ShardExportUnsupported

QUANTIZED = ("bnb_4bit", "bnb_8bit")


@pytest.fixture(scope="module", params=QUANTIZED)
def quantized(request, tiny_chat_model):
    return load_model(str(tiny_chat_model), dtype="bfloat16", quantization=request.param)


@pytest.fixture(scope="module")
def plain(tiny_chat_model):
    return load_model(str(tiny_chat_model), dtype="bfloat16")


def test_sites_are_quantized_and_read_dequantized(quantized, plain):
    """Every site is a bitsandbytes layer; its weight, read back, is what the layer computes
    with (its output is x W^T) and close to the bf16 original."""
    assert quantized.quantization and not plain.quantization
    gen = torch.Generator().manual_seed(0)
    for site, original in zip(quantized.sites, plain.sites, strict=True):
        assert type(site.module).__module__.startswith("bitsandbytes")
        w = site.weights[0].value()
        assert w.shape == original.weights[0].param.shape and w.dtype == torch.float32
        x = torch.randn(3, w.shape[1], generator=gen)
        with torch.no_grad():
            out = site.module(x.to(torch.bfloat16)).float()
        # 8-bit matmuls quantize their input too: a looser bound than 4-bit's bf16 matmul.
        tolerance = 0.02 if "4-bit" in site.quantization[0] else 0.05
        error = (out - x @ w.T).norm() / out.norm()
        assert error < tolerance, (site.name, float(error))
        relative = (w - original.weights[0].param.float()).norm() / w.norm()
        assert relative < 0.15, (site.name, float(relative))


@pytest.mark.parametrize("row_normalization", ["none", "full"])
def test_hooks_edit_a_quantized_model(quantized, row_normalization):
    """The hook applies the site's RowEdit (row normalization: built from the dequantized
    weight) to the quantized module's output; clearing it gives the original log-probs back."""
    directions, strengths = sample_edit()
    prompt = ["Say hello."]
    before = quantized.first_token_logprobs(prompt, 1)
    site = quantized.sites[0]
    x = torch.randn(2, 5, quantized.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unhooked = site.module(x.to(torch.bfloat16))
    hooks = EditHooks(quantized.sites, directions, row_normalization)
    try:
        hooks.set_strengths(strengths)
        row = hooks.edit.row_edit(site)
        with torch.no_grad():
            hooked = site.module(x.to(torch.bfloat16))
        edited = quantized.first_token_logprobs(prompt, 1)
        hooks.clear()
        after = quantized.first_token_logprobs(prompt, 1)
    finally:
        hooks.remove()
    torch.testing.assert_close(hooked.float(), row.apply(unhooked).float(), atol=2e-2, rtol=2e-2)
    assert not torch.equal(hooked, unhooked)
    assert not torch.equal(edited, before)
    assert torch.equal(after, before)


def test_in_place_edits_are_refused(quantized):
    directions, strengths = sample_edit()
    for strategy in ("cache", "reload"):
        with pytest.raises(QuantizedWeightError, match="reset-strategy adapter"):
            make_edit(strategy, quantized.sites, directions, read_matrices=lambda: [])
    with pytest.raises(QuantizedWeightError, match="bitsandbytes"):
        merge_edit(quantized.sites, TrialEdit(strengths, directions))
    with pytest.raises(ModelLoadError, match="--compile"):
        quantized.compile()


def test_settings_refuse_what_cannot_work_quantized(tmp_path):
    base = ["--model", "m", "--quantization", "bnb_4bit"]
    with pytest.raises(SettingsError, match="reset_strategy 'adapter'"):
        load_settings([*base, "--reset-strategy", "cache"])
    with pytest.raises(SettingsError, match="--compile is not supported"):
        load_settings([*base, "--reset-strategy", "cache", "--compile"])
    with pytest.raises(SettingsError, match="quantization"):
        load_settings(["--model", "m", "--quantization", "bnb_2bit"])
    assert load_settings(base).quantization == "bnb_4bit"


def test_missing_backend_is_a_clear_error(tiny_chat_model, monkeypatch):
    def no_backend(*_args):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(quantization, "_smoke_test", no_backend)
    with pytest.raises(ModelLoadError, match="no working bitsandbytes 4-bit .* backend on cpu"):
        load_model(str(tiny_chat_model), quantization="bnb_4bit")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails
    with pytest.raises(ModelLoadError, match="pip install bitsandbytes"):
        load_model(str(tiny_chat_model), quantization="bnb_8bit")


def test_gguf_and_quantized_checkpoints_cannot_be_quantized_again(tmp_path, tiny_chat_model):
    from conftest import smollm2_gguf

    with pytest.raises(ModelLoadError, match="does not apply to a GGUF file"):
        load_model(str(smollm2_gguf()), quantization="bnb_4bit")
    saved = tmp_path / "prequantized"
    model = load_model(str(tiny_chat_model), quantization="bnb_4bit")
    model.model.save_pretrained(saved)
    model.tokenizer.save_pretrained(saved)
    with pytest.raises(ModelLoadError, match=r"already quantized \(bitsandbytes\)"):
        load_model(str(saved), quantization="bnb_4bit")


def test_prequantized_checkpoint_is_searched_as_loaded(tmp_path, tiny_chat_model):
    """A checkpoint stored in bitsandbytes 4-bit loads as it is; its stored codes cannot be
    edited shard by shard, nor merged in memory: both say so, naming the format, and the
    adapter is computed from the dequantized weights."""
    saved = tmp_path / "prequantized"
    model = load_model(str(tiny_chat_model), quantization="bnb_4bit")
    model.model.save_pretrained(saved)
    model.tokenizer.save_pretrained(saved)
    logged = []
    loaded = load_model(str(saved), log=logged.append)
    assert loaded.quantization == ["bitsandbytes 4-bit"]
    assert any("stored quantized (bitsandbytes)" in line for line in logged)
    directions, strengths = sample_edit()
    edit = TrialEdit(strengths, directions)
    with pytest.raises(ShardExportUnsupported, match="U8 in a bitsandbytes checkpoint"):
        plan_shard_export(str(saved), loaded.sites, edit)
    finisher = _finisher(saved, tmp_path / "out", "none", "--export", "model,adapter")
    with pytest.raises(ExportError, match=r"stored quantized \(bitsandbytes 4-bit\)"):
        finisher.save(finisher.study.trials[0])
    assert not (tmp_path / "out" / "model").exists()
    finisher = _finisher(saved, tmp_path / "out", "none", "--export", "adapter")
    finisher.save(finisher.study.trials[0])
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_float_weight_of_plain_and_unknown_tensors():
    w = torch.randn(4, 4)
    assert float_weight(w) is not None and torch.equal(float_weight(w), w)
    with pytest.raises(QuantizedWeightError, match="quantized"):
        float_weight(torch.zeros(4, 4, dtype=torch.int8))


def test_dequantize_fp8_blocks_rows_and_partial_tiles():
    torch.manual_seed(0)
    w = torch.randn(20, 36).to(torch.float8_e4m3fn)
    scales = torch.rand(2, 3) + 0.5  # blocks of 16 x 16: the last row and column tiles are partial
    expected = w.float().clone()
    for i in range(20):
        for j in range(36):
            expected[i, j] *= scales[i // 16, j // 16]
    assert torch.equal(dequantize_fp8(w, scales, (16, 16)), expected)
    per_row = torch.rand(20, 1)
    assert torch.equal(dequantize_fp8(w, per_row), w.float() * per_row)
    assert torch.equal(dequantize_fp8(w, torch.tensor(0.5)), w.float() * 0.5)
    with pytest.raises(QuantizedWeightError, match="inconsistent"):
        dequantize_fp8(w, torch.rand(3, 3), (16, 16))


def test_fp8_linear_module_reads_with_its_block_scales():
    """transformers' FP8Linear (what an FP8 checkpoint loads as on a recent GPU) cannot run
    on a CPU, but its weight is read with its own scales and block size."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    layer = FP8Linear(32, 48, block_size=(16, 16))
    torch.manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 32).to(torch.float8_e4m3fn))
        layer.weight_scale_inv.copy_(torch.rand(3, 2) + 0.5)
    got = float_weight(layer.weight, layer)
    assert torch.equal(got, dequantize_fp8(layer.weight, layer.weight_scale_inv, (16, 16)))
    assert quantization.tensor_format(layer.weight, layer).startswith("FP8 (float8_e4m3fn")


# ----- exports after a quantized search --------------------------------------------------------


def _finisher(model_path: Path, out: Path, quant: str, *argv: str) -> Finisher:
    settings = load_settings(
        ["--model", str(model_path), "--output-dir", str(out), "--batch-size", "4",
         "--quantization", quant, *argv]
    )  # fmt: skip
    model = load_model(str(model_path), dtype="bfloat16", quantization=quant)
    directions = torch.nn.functional.normalize(
        torch.randn(model.n_layers, model.hidden_size, generator=torch.Generator().manual_seed(5)),
        dim=-1,
    )
    study = optuna.create_study(directions=["minimize", "minimize"])
    _add_trial(study, 0.30, 1, 1.0)
    return Finisher(
        settings=settings,
        console=Console(file=io.StringIO(), width=120),
        model=model,
        hooks=EditHooks(model.sites, directions, settings.row_normalization),
        directions=directions,
        evaluator=FakeEvaluator(),
        study=study,
        search_more=lambda total: None,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ("--export", "model,adapter", "--readout", "direction", "--row-normalization", "full"),
        ("--export", "model", "--export-method", "in_memory"),
    ],
)
def test_quantized_search_exports_full_precision(tiny_chat_model, tmp_path, argv):
    """The saved model (shard by shard, or reloaded in full precision for in_memory) and the
    adapter are those of the same trial on the bf16 model, tensor for tensor."""
    saved = {}
    for quant in ("none", "bnb_4bit"):
        finisher = _finisher(tiny_chat_model, tmp_path / quant, quant, *argv)
        finisher.save(finisher.study.trials[0])
        saved[quant] = tmp_path / quant
    reference, quantized_run = saved["none"], saved["bnb_4bit"]
    expected = load_file(reference / "model" / "model.safetensors")
    got = load_file(quantized_run / "model" / "model.safetensors")
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.bfloat16, name
        assert torch.equal(got[name], tensor), name
    if "adapter" in argv[1]:
        adapter = "adapter/adapter_model.safetensors"
        expected = load_file(reference / adapter)
        got = load_file(quantized_run / adapter)
        assert set(got) == set(expected) and expected
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name


def test_search_runs_quantized_end_to_end(tiny_chat_model, prompt_files, tmp_path, monkeypatch):  # noqa: F811
    """The whole pipeline with quantization = bnb_4bit: directions, scoring, trials, the shard
    export of the chosen trial (a bf16 checkpoint that loads)."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = _argv(tiny_chat_model, prompt_files, out, "--n-trials", "2", "--select", "best")
    result = run(load_settings([*argv, "--quantization", "bnb_4bit"]), _quiet())
    assert result.chosen_trial is not None
    merged = load_model(str(out / "model"), dtype="bfloat16")
    assert not merged.quantization
