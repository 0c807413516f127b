"""Shard-by-shard export: equal to the in-memory merge, loadable with the hooked model's logits,
and broken sources or a full disk give a clear error without touching the previous output."""

from __future__ import annotations

import errno
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import FAMILIES, chat_llama_config, sample_edit, tiny_model

from heretic.edit import EditHooks, TrialEdit, merge_edit
from heretic.errors import ExportError
from heretic.loading import load_model
from heretic.shard_edits import _checkpoint_names, edited_in_place, plan_shard_export
from heretic.shard_export import (
    INDEX_FILE,
    ShardExportUnsupported,
    local_checkpoint_folder,
    read_checkpoint,
    save_edited_checkpoint,
    verify_shard,
)
from heretic.sites import COMPONENTS, WriterTensor


def _save_sharded(model, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out, max_shard_size="40KB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


def _llama(tokenizer_dir: Path, dtype: torch.dtype, base: bool = False, bias: bool = False):
    from transformers import AutoTokenizer, LlamaForCausalLM, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = chat_llama_config(tokenizer, attention_bias=bias, mlp_bias=bias)
    model = (LlamaModel if base else LlamaForCausalLM)(config).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, chat_tokenizer_dir) -> Path:
    """A tiny bf16 Llama in 6+ shards, with files a real repository has besides the weights."""
    out = _save_sharded(
        _llama(chat_tokenizer_dir, torch.bfloat16), chat_tokenizer_dir, tmp_path_factory.mktemp("s")
    )
    (out / "notes").mkdir()
    (out / "notes" / "recipe.txt").write_text("extra file\n")
    save_file({"mtp.proj.weight": torch.ones(4, 4)}, str(out / "mtp.safetensors"))
    torch.save({"model.layers.0.mlp.down_proj.weight": torch.zeros(1)}, out / "pytorch_model.bin")
    return out


def _raw(path: Path, name: str) -> bytes:
    shard = next(s for s in read_checkpoint(path.parent).shards if s.path == path)
    entry = next(t for t in shard.tensors if t.name == name)
    with open(path, "rb") as f:
        f.seek(len(shard.header) + entry.start)
        return f.read(entry.nbytes)


def _written(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in read_checkpoint(folder).shards:
        with safe_open(shard.path, framework="pt") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return tensors


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# ----- equal to the in-memory merge ------------------------------------------------------------


@pytest.mark.parametrize(
    ("row_normalization", "with_readouts"), [("none", False), ("full", False), ("none", True)]
)
def test_shards_equal_in_memory_merge(sharded, tmp_path, row_normalization, with_readouts):
    model = load_model(str(sharded), dtype="bfloat16")
    directions, strengths = sample_edit()
    readouts = None
    if with_readouts:
        gen = torch.Generator().manual_seed(3)
        readouts = 0.3 * torch.randn(2, len(COMPONENTS), 64, generator=gen)
    edit = TrialEdit(strengths, directions, readouts, row_normalization)
    checkpoint, edits = plan_shard_export(str(sharded), model.sites, edit)
    assert sorted(edits) == [
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ]
    out = tmp_path / "out"
    report = save_edited_checkpoint(sharded, edits, out)
    assert sorted(report.edited) == sorted(edits)
    assert len(checkpoint.shards) >= 4 and report.shards == len(checkpoint.shards)

    merge_edit(model.sites, edit)
    merged = model.model.state_dict()
    written = _written(out)
    assert set(written) == set(checkpoint.entries())
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(_bits(tensor), _bits(merged[name])), name
        if name not in edits:
            path = out / json.loads((out / INDEX_FILE).read_text())["weight_map"][name]
            assert _raw(path, name) == _raw(sharded / path.name, name), name
    for name in edits:
        assert not torch.equal(written[name], _written(sharded)[name]), "the edit changed it"


def test_biases_of_row_normalized_sites(tmp_path, chat_tokenizer_dir):
    """A bias's row-normalized edit depends on its weight, read from the checkpoint."""
    source = _save_sharded(
        _llama(chat_tokenizer_dir, torch.bfloat16, bias=True), chat_tokenizer_dir, tmp_path / "s"
    )
    model = load_model(str(source), dtype="bfloat16")
    directions, strengths = sample_edit()
    edit = TrialEdit(strengths, directions, None, "full")
    _, edits = plan_shard_export(str(source), model.sites, edit)
    assert "model.layers.0.self_attn.o_proj.bias" in edits
    save_edited_checkpoint(source, edits, tmp_path / "out")
    merge_edit(model.sites, edit)
    merged = model.model.state_dict()
    written = _written(tmp_path / "out")
    for name in edits:
        assert torch.equal(_bits(written[name]), _bits(merged[name])), name


def test_side_files_copied_and_other_weights_left_out(sharded, tmp_path):
    edits = {"model.layers.0.mlp.down_proj.weight": lambda t: t.float() * 0.5}
    report = save_edited_checkpoint(sharded, edits, tmp_path / "out")
    out = tmp_path / "out"
    for name in ("config.json", "generation_config.json", "tokenizer_config.json",
                 "notes/recipe.txt", "mtp.safetensors"):  # fmt: skip
        assert (out / name).read_bytes() == (sharded / name).read_bytes(), name
    assert not (out / "pytorch_model.bin").exists()
    assert report.files_left_out == ["pytorch_model.bin (weights in another format, unedited)"]
    index, source_index = (json.loads((d / INDEX_FILE).read_text()) for d in (out, sharded))
    assert index["weight_map"] == source_index["weight_map"]
    assert index["metadata"]["total_size"] == source_index["metadata"]["total_size"]


def test_hub_id_resolves_to_its_cached_snapshot(sharded, tmp_path, monkeypatch):
    """A hub id is exported from the snapshot loading it filled; never downloaded."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--someone--tiny"
    shutil.copytree(sharded, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = local_checkpoint_folder("someone/tiny")
    assert folder.resolve() == (repo / "snapshots" / "0123abcd").resolve()
    assert len(read_checkpoint(folder).shards) >= 4
    with pytest.raises(ShardExportUnsupported, match="someone/absent is not in the local hub"):
        local_checkpoint_folder("someone/absent")


# ----- the seam: parameter names -> checkpoint names ---------------------------------------------


def _tensor(name: str, shape: tuple[int, ...], out_axis: int = 0, expert_axis=None):
    param = torch.nn.Parameter(torch.empty(shape, device="meta"))
    return WriterTensor(name, param, out_axis, expert_axis)


def test_checkpoint_names_identical_prefixed_or_per_expert():
    shapes = {"model.layers.0.o.weight": (4, 4), "layers.1.o.weight": (4, 4)}
    assert _checkpoint_names(_tensor("model.layers.0.o.weight", (4, 4)), shapes) == [
        "model.layers.0.o.weight"
    ]
    assert _checkpoint_names(_tensor("model.layers.1.o.weight", (4, 4)), shapes) == [
        "layers.1.o.weight"
    ]
    wrapped = {"lm.layers.0.o.weight": (4, 4)}
    assert _checkpoint_names(_tensor("layers.0.o.weight", (4, 4)), wrapped) == list(wrapped)

    experts = {f"model.layers.0.mlp.experts.{e}.down_proj.weight": (4, 3) for e in range(3)}
    fused = _tensor("model.layers.0.mlp.experts.down_proj", (3, 4, 3), 1, 0)
    assert _checkpoint_names(fused, experts) == list(experts)
    transposed = _tensor("model.layers.0.mlp.experts.down_proj", (3, 3, 4), 2, 0)
    assert _checkpoint_names(transposed, experts) == list(experts)

    del experts["model.layers.0.mlp.experts.1.down_proj.weight"]
    with pytest.raises(ShardExportUnsupported, match="experts.down_proj has no counterpart"):
        _checkpoint_names(fused, experts)
    ambiguous = {"a.layers.0.o.weight": (4, 4), "b.layers.0.o.weight": (4, 4)}
    with pytest.raises(ShardExportUnsupported, match="layers.0.o.weight has no counterpart"):
        _checkpoint_names(_tensor("layers.0.o.weight", (4, 4)), ambiguous)


@pytest.mark.parametrize("mode", ["none", "pre", "full", "readout"])
def test_blockwise_edit_is_bit_for_bit_the_merge(mode):
    """Merging block by block in place (one float32 copy) gives exactly `edited_weight`."""
    from heretic.abliteration import edited_weight, row_edit

    gen = torch.Generator().manual_seed(5)
    w = torch.randn(37, 50, generator=gen).to(torch.bfloat16)
    r = torch.nn.functional.normalize(torch.randn(37, generator=gen), dim=0)
    readout = torch.randn(37, generator=gen) if mode == "readout" else None
    norm = "none" if mode == "readout" else mode
    expected = edited_weight(w, r, 0.8, norm, readout)
    w32 = w.to(torch.float32, copy=True)
    edited = edited_in_place(w32, row_edit(w32, r, 0.8, norm, readout), block_bytes=4 * 50 * 5)
    assert torch.equal(edited.view(torch.int32), expected.view(torch.int32))
    assert not torch.equal(edited, w.float())


def test_checkpoint_without_the_model_prefix(tmp_path, chat_tokenizer_dir):
    """A base-model checkpoint (`layers.N...`) declared and loaded as a causal LM
    (`model.layers.N...`)."""
    source = _save_sharded(
        _llama(chat_tokenizer_dir, torch.bfloat16, base=True), chat_tokenizer_dir, tmp_path / "s"
    )
    config = json.loads((source / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (source / "config.json").write_text(json.dumps(config))
    model = load_model(str(source), dtype="bfloat16")
    directions, strengths = sample_edit()
    edit = TrialEdit(strengths, directions)
    _, edits = plan_shard_export(str(source), model.sites, edit)
    assert "layers.0.self_attn.o_proj.weight" in edits
    save_edited_checkpoint(source, edits, tmp_path / "out")
    merge_edit(model.sites, edit)
    written = _written(tmp_path / "out")
    for name, param in model.model.named_parameters():
        if name.removeprefix("model.") in written:
            assert torch.equal(_bits(written[name.removeprefix("model.")]), _bits(param)), name


def test_per_expert_checkpoint_of_a_fused_moe(tmp_path, chat_tokenizer_dir):
    """Qwen3-MoE stores experts.N.down_proj.weight; transformers fuses them on load."""
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        num_experts=4, num_experts_per_tok=2, tie_word_embeddings=True,
    )  # fmt: skip
    source = _save_sharded(
        Qwen3MoeForCausalLM(config).to(torch.bfloat16), chat_tokenizer_dir, tmp_path / "s"
    )
    model = load_model(str(source), dtype="bfloat16")
    directions, strengths = sample_edit(hidden=32)
    edit = TrialEdit(strengths, directions)
    _, edits = plan_shard_export(str(source), model.sites, edit)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in edits
    save_edited_checkpoint(source, edits, tmp_path / "out")
    merge_edit(model.sites, edit)
    written = _written(tmp_path / "out")
    fused = model.model.model.layers[1].mlp.experts.down_proj
    for e in range(4):
        assert torch.equal(
            _bits(written[f"model.layers.1.mlp.experts.{e}.down_proj.weight"]), _bits(fused[e])
        )


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_exports_what_the_merge_writes(family, tmp_path, chat_tokenizer_dir):
    """Across the architecture matrix (row normalization on, so the weight-dependent edits are
    taken from the stored weights): every edited tensor as the in-memory merge writes it, bit
    for bit, or a fallback naming the tensor it cannot map."""
    from transformers import AutoTokenizer

    from heretic.errors import ModelLoadError
    from heretic.sites import ATTN, MLP

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    source = tmp_path / "source"
    tiny_model(family, vocab_size=len(tokenizer)).save_pretrained(source, max_shard_size="200KB")
    tokenizer.save_pretrained(source)
    try:
        model = load_model(str(source), dtype="float32")
    except ModelLoadError as e:  # the architecture matrix's own tests report this
        pytest.skip(f"{family} does not load here: {e}")
    n = model.n_layers
    directions = torch.nn.functional.normalize(
        torch.randn(n, model.hidden_size, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    strengths = {ATTN: torch.linspace(0.4, 1.2, n), MLP: torch.linspace(1.1, 0.5, n)}
    edit = TrialEdit(strengths, directions, None, "full")
    try:
        checkpoint, edits = plan_shard_export(str(source), model.sites, edit)
    except ShardExportUnsupported as e:
        assert "has no counterpart in the checkpoint" in str(e)
        return
    save_edited_checkpoint(source, edits, tmp_path / "out")
    merge_edit(model.sites, edit)
    written = _written(tmp_path / "out")
    shapes = {name: entry.shape for name, entry in checkpoint.entries().items()}
    checked = set()
    for site in model.sites:
        for tensor in site.tensors():
            names = _checkpoint_names(tensor, shapes)
            value = tensor.param.detach()
            parts = [value] if len(names) == 1 else list(value.unbind(tensor.expert_axis))
            for name, part in zip(names, parts, strict=True):
                expected = part if tensor.out_axis <= 1 or len(names) == 1 else part.T
                assert torch.equal(written[name], expected), name
                checked.add(name)
    assert checked == set(edits)


# ----- through the Finisher -----------------------------------------------------------------------


def _finisher(source: Path, out: Path, *argv: str):
    import optuna
    from test_finish import FakeEvaluator, _add_trial

    from heretic.config import load_settings
    from heretic.finish import Finisher

    settings = load_settings(["--model", str(source), "--output-dir", str(out), *argv])
    model = load_model(str(source), dtype="float32")
    directions = torch.nn.functional.normalize(
        torch.randn(model.n_layers, model.hidden_size, generator=torch.Generator().manual_seed(1)),
        dim=-1,
    )
    study = optuna.create_study(directions=["minimize", "minimize"])
    _add_trial(study, 0.30, 1, 0.8)
    console = Console(file=io.StringIO(), width=200)
    finisher = Finisher(
        settings=settings, console=console, model=model,
        hooks=EditHooks(model.sites, directions), directions=directions,
        evaluator=FakeEvaluator(), study=study, search_more=lambda total: None,
    )  # fmt: skip
    return finisher, console


def _hooked_and_reloaded(finisher, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from heretic.abliteration import edit_from_params
    from heretic.optimization import params_from_trial

    model = finisher.model
    batch = model.tokenizer(["Hello there! How do magnets work?"], return_tensors="pt")
    strengths, directions = edit_from_params(
        params_from_trial(finisher.study.trials[0]), finisher.directions
    )
    finisher.hooks.set_strengths(strengths, directions)
    with torch.no_grad():
        hooked = model.model(**batch).logits
        finisher.hooks.clear()
        original = model.model(**batch).logits
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(**batch).logits
    assert not torch.allclose(original, hooked, atol=1e-3), "the edit must change the logits"
    return hooked, reloaded


def test_finisher_saves_shards_with_the_hooked_logits(tmp_path, chat_tokenizer_dir):
    source = _save_sharded(
        _llama(chat_tokenizer_dir, torch.float32), chat_tokenizer_dir, tmp_path / "s"
    )
    finisher, console = _finisher(source, tmp_path / "out")
    finisher.save(finisher.study.trials[0])
    folder = tmp_path / "out" / "model"
    assert (folder / INDEX_FILE).is_file() and (folder / "README.md").is_file()
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(
        p.name for p in source.glob("*.safetensors")
    )
    assert "4 edited tensors" in console.file.getvalue()
    hooked, reloaded = _hooked_and_reloaded(finisher, folder)
    torch.testing.assert_close(reloaded, hooked, atol=1e-4, rtol=1e-4)


def test_finisher_in_memory_setting_and_fallback(tmp_path, chat_tokenizer_dir):
    """export_method = "in_memory" saves with save_pretrained; so does a checkpoint the shard
    export cannot map (Mixtral's block_sparse_moe.experts.N.w2, fused and renamed on load),
    with a notice naming the tensor."""
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    source = _save_sharded(
        _llama(chat_tokenizer_dir, torch.float32), chat_tokenizer_dir, tmp_path / "s"
    )
    finisher, _ = _finisher(source, tmp_path / "out", "--export-method", "in_memory")
    finisher.save(finisher.study.trials[0])
    assert not (tmp_path / "out" / "model" / INDEX_FILE).exists()
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()

    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=2, tie_word_embeddings=True,
    )  # fmt: skip
    moe = _save_sharded(MixtralForCausalLM(config), chat_tokenizer_dir, tmp_path / "moe")
    finisher, console = _finisher(moe, tmp_path / "out-moe")
    finisher.save(finisher.study.trials[0])
    text = " ".join(console.file.getvalue().split())
    assert "Shard-by-shard export is not possible: Parameter model.layers.0.mlp.experts" in text
    assert "save_pretrained instead" in text
    hooked, reloaded = _hooked_and_reloaded(finisher, tmp_path / "out-moe" / "model")
    torch.testing.assert_close(reloaded, hooked, atol=1e-4, rtol=1e-4)


# ----- broken sources and a full disk -------------------------------------------------------------


def _shard_path(source: Path, number: int) -> Path:
    return sorted(source.glob("model-*.safetensors"))[number]


def _add_unexpected_tensor(source: Path) -> None:
    path = _shard_path(source, 1)
    with safe_open(path, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    save_file({**tensors, "model.surprise.weight": torch.zeros(2)}, str(path))


def _truncate(source: Path) -> None:
    path = _shard_path(source, 2)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)


def _full_disk(monkeypatch) -> None:
    import heretic.shard_export as shard_export

    calls = []
    real = shard_export._copy_range

    def copy_range(*args):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    monkeypatch.setattr(shard_export, "_copy_range", copy_range)


BREAKAGES = {
    "unexpected tensor": (_add_unexpected_tensor, "index does not list there: model.surprise"),
    "missing shard": (lambda s: _shard_path(s, 3).unlink(), "is missing"),
    "truncated shard": (_truncate, "is truncated"),
    "full disk": (None, r"No space left on device\); nothing was overwritten"),
    "NaN edit": (None, "has NaN or inf values: not written"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_broken_source_or_disk_leaves_previous_output(sharded, tmp_path, monkeypatch, breakage):
    source = tmp_path / "source"
    shutil.copytree(sharded, source)
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("the last export")
    edits = {"model.layers.1.mlp.down_proj.weight": lambda t: t.float() * 0.5}
    if breakage == "NaN edit":
        edits = {"model.layers.1.mlp.down_proj.weight": lambda t: t.float() / 0.0}
    breaker, message = BREAKAGES[breakage]
    if breaker is not None:
        breaker(source)
    if breakage == "full disk":
        _full_disk(monkeypatch)
    with pytest.raises(ExportError, match=message):
        save_edited_checkpoint(source, edits, out)
    assert [p.name for p in out.iterdir()] == ["previous.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"], "no temporary left"


def test_verification_catches_a_corrupt_written_tensor(sharded, tmp_path):
    """verify_shard reads back what was written: NaN bytes where the source has numbers fail."""
    shard = read_checkpoint(sharded).shards[1]
    copy = tmp_path / shard.path.name
    shutil.copyfile(shard.path, copy)
    verify_shard(shard, copy, [])
    entry = next(t for t in shard.tensors if t.dtype == "BF16")
    with open(copy, "r+b") as f:
        f.seek(len(shard.header) + entry.start)
        f.write(_bits(torch.full((1,), float("nan"), dtype=torch.bfloat16)).numpy().tobytes())
    with pytest.raises(ExportError, match=f"{entry.name} has NaN or inf values its source lacks"):
        verify_shard(shard, copy, [])


def test_finisher_broken_shard_is_an_error_not_a_fallback(tmp_path, chat_tokenizer_dir):
    source = _save_sharded(
        _llama(chat_tokenizer_dir, torch.float32), chat_tokenizer_dir, tmp_path / "s"
    )
    finisher, _ = _finisher(source, tmp_path / "out")
    previous = tmp_path / "out" / "model"
    previous.mkdir(parents=True)
    (previous / "previous.txt").write_text("the last export")
    _truncate(source)
    with pytest.raises(ExportError, match="is truncated"):
        finisher.save(finisher.study.trials[0])
    assert [p.name for p in previous.iterdir()] == ["previous.txt"]
