"""The architecture matrix: a tiny random model of every supported family, saved as a checkpoint
with a real chat tokenizer and loaded through heretic's own path (no downloads).

For each family: the layers found are the text decoder's; the load-time coverage self-check
passes (every residual writer is an edit site); hooks, merged weights and the reloaded export
give the same logits for the plain edit, fitted readouts and row normalization; restoring the
weights is bit-exact; row-dropping generation matches plain greedy decoding; a KL pass that
replays the layers below the edit matches a full one. `FAMILIES` is also the README's table
(`python tests/test_architectures.py` prints it).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from tiny_models import BIASED, FAMILIES, is_multimodal, plain_greedy, tiny_model

from heretic.directions import normalize
from heretic.discovery import discover_sites, find_decoder_layers
from heretic.edit import EditHooks, TrialEdit, merge_edit, restore_weights
from heretic.export import write_model_files
from heretic.loading import load_model
from heretic.model import LayerOutputs
from heretic.sites import ATTN, COMPONENTS, MLP

PROMPTS = ["Name a colour.", "Count to three, please.", "What is a cat?", "Say hi."]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory, chat_tokenizer_dir):
    """(family name, heretic Model loaded from a saved tiny checkpoint in float32)."""
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    name = request.param
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    net = tiny_model(name, vocab_size=len(tokenizer))
    folder = tmp_path_factory.mktemp(name)
    net.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return name, load_model(str(folder), dtype="float32")


def _ids(model, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (2, 7), generator=generator)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.runner(input_ids=ids, use_cache=False).logits.float()


def _edit(model, mode: str) -> TrialEdit:
    n, hidden = model.n_layers, model.hidden_size
    generator = torch.Generator().manual_seed(1)
    directions = normalize(torch.randn(n, hidden, generator=generator))
    strengths = {
        ATTN: torch.linspace(0.4, 1.2, n),
        MLP: torch.linspace(1.1, 0.5, n),
    }
    readouts = None
    if mode == "readouts":
        readouts = 0.3 * torch.randn(n, len(COMPONENTS), hidden, generator=generator)
    return TrialEdit(strengths, directions, readouts, "full" if mode == "full" else "none")


def test_layers_are_the_text_decoders_and_every_writer_is_a_site(family):
    name, model = family
    text_config = model.model.config.get_text_config()
    assert model.n_layers == text_config.num_hidden_layers
    names = {id(m): n for n, m in model.model.named_modules()}
    layer_path = names[id(model.layers)]
    assert not any(t in layer_path for t in ("vision", "visual", "audio")), layer_path
    assert model.layers is find_decoder_layers(model.model)
    # The coverage self-check ran at load; every layer has at least one site.
    assert {site.layer for site in model.sites} == set(range(model.n_layers))
    # Hyper-connections keep hc_mult residual streams; every other family one.
    assert model.residual_streams == getattr(text_config, "hc_mult", 1)
    if name in BIASED:
        biases = [t for s in model.sites for t in s.biases]
        assert biases and all(bool(t.param.abs().sum() > 0) for t in biases)


@pytest.mark.parametrize("mode", ["plain", "readouts", "full"])
def test_hooks_equal_merged_weights_and_restore_is_exact(family, mode):
    name, model = family
    edit = _edit(model, mode)
    ids = _ids(model)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    base = _logits(model, ids)
    hooks = EditHooks(model.sites, edit.directions, edit.row_normalization, edit.readouts)
    hooks.set_strengths(edit.strengths)
    hooked = _logits(model, ids)
    hooks.remove()
    originals = merge_edit(model.sites, edit)
    merged = _logits(model, ids)
    restore_weights(model.sites, originals)
    assert not torch.allclose(base, hooked, atol=1e-4), "the edit does something"
    scale = float(hooked.abs().max())
    torch.testing.assert_close(merged, hooked, atol=2e-4 * max(scale, 1.0), rtol=2e-4)
    for key, value in model.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_reloaded_export_gives_the_hooked_logits(family, tmp_path):
    name, model = family
    edit = _edit(model, "plain")
    ids = _ids(model)
    hooks = EditHooks(model.sites, edit.directions)
    hooks.set_strengths(edit.strengths)
    hooked = _logits(model, ids)
    hooks.remove()
    originals = merge_edit(model.sites, edit)
    try:
        write_model_files(model.model, model.tokenizer, tmp_path / "out", model.processor)
    finally:
        restore_weights(model.sites, originals)
    reloaded = load_model(str(tmp_path / "out"), dtype="float32")
    assert type(reloaded.model) is type(model.model)
    scale = float(hooked.abs().max())
    torch.testing.assert_close(
        _logits(reloaded, ids), hooked, atol=2e-4 * max(scale, 1.0), rtol=2e-4
    )


def test_row_dropping_generation_and_layer_replay(family):
    """Generation that drops decided rows matches plain greedy decoding on this family's cache
    (hybrid caches included), and a KL pass that replays the layers below the edit matches a
    full pass bit for bit."""
    name, model = family
    reference = plain_greedy(model, PROMPTS, 6)
    decided = lambda text, _prompt="": len(text) > 2  # noqa: E731
    dropped = model.generate(PROMPTS, 6, batch_size=4, is_decided=decided)
    for ref, text in zip(reference, dropped, strict=True):
        assert ref.startswith(text), (name, ref, text)

    record = LayerOutputs.evenly_spaced(model.n_layers, 2)
    base = model.first_token_logprobs(PROMPTS, 2, record=record)
    edit = _edit(model, "plain")
    first = record.layers[-1] + 1
    strengths = {
        c: torch.where(torch.arange(model.n_layers) >= first, s, 0.0)
        for c, s in edit.strengths.items()
    }
    hooks = EditHooks(model.sites, edit.directions)
    hooks.set_strengths(strengths)
    try:
        full = model.first_token_logprobs(PROMPTS, 2)
        replayed = model.first_token_logprobs(PROMPTS, 2, resume=record, start_layer=first)
    finally:
        hooks.remove()
    assert not torch.equal(full, base)
    assert torch.equal(full, replayed), name


def _block_class(model: torch.nn.Module, site) -> str:
    """The class of the layer's child that holds a site (its attention, Mamba mixer, MLP...)."""
    layer = find_decoder_layers(model)[site.layer]
    for child in layer.children():
        if any(m is site.module for m in child.modules()):
            return type(child).__name__
    return type(site.module).__name__


def _rows() -> list[tuple[str, list[str], list[str], bool]]:
    rows = []
    for name in sorted(FAMILIES):
        model = tiny_model(name)
        sites = discover_sites(model)
        token, channel = (
            sorted({_block_class(model, s) for s in sites if s.component == c}) for c in COMPONENTS
        )
        rows.append((name, token, channel, all(s.is_linear for s in sites)))
    return rows


def _group(name: str, token: list[str], linear: bool) -> str:
    """A family's group in the README's summary, from the classes that write its residual."""
    if is_multimodal(name):
        return "vision-language (text decoder edited, processor kept)"
    mixers = " ".join(token).lower()
    if any(k in mixers for k in ("mamba", "mixer", "conv", "deltanet", "linear", "ssm")):
        return "hybrid: linear attention, Mamba / SSM, short convolution"
    return "attention + MLP" if linear else "attention + mixture of experts"


def supported_table(summary: bool = False) -> str:
    """The table of supported families: what writes into the residual stream in each (the
    layer's child that holds each site), and whether a LoRA adapter can express the edit
    (merged safetensors always can). `summary`: one row per group of families, for the README."""
    rows = _rows()
    if summary:
        groups: dict[str, list[str]] = {}
        for name, token, _channel, linear in rows:
            groups.setdefault(_group(name, token, linear), []).append(name)
        lines = ["| kind | families |", "| --- | --- |"]
        lines += [f"| {kind} | {', '.join(names)} |" for kind, names in sorted(groups.items())]
        return "\n".join(lines)
    lines = [
        "| family | token mixers | channel mixers | LoRA adapter |",
        "| --- | --- | --- | --- |",
    ]
    for name, token, channel, linear in rows:
        label = f"{name} (vision-language)" if is_multimodal(name) else name
        adapter = "yes" if linear else "no (experts: merged only)"
        lines.append(
            f"| {label} | {', '.join(token) or '-'} | {', '.join(channel) or '-'} | {adapter} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    print(supported_table(summary="--summary" in sys.argv))


def test_a_vision_language_output_keeps_its_processor_and_takes_images(
    chat_tokenizer_dir, tmp_path
):
    """A Llava checkpoint with a real processor: heretic loads the whole model and the
    processor, edits the text decoder only, and the merged output loads with the same class and
    still answers a prompt with an image."""
    import numpy as np
    from transformers import (
        AutoProcessor,
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    net = tiny_model("llava", vocab_size=len(tokenizer))
    net.config.image_token_id = image_token
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
        tokenizer=tokenizer,
        patch_size=8,
        num_additional_image_tokens=1,  # CLIP's class token
        vision_feature_select_strategy=net.config.vision_feature_select_strategy,
        chat_template=tokenizer.chat_template,
    )
    source = tmp_path / "source"
    net.save_pretrained(source)
    processor.save_pretrained(source)

    model = load_model(str(source), dtype="float32")
    assert model.processor is not None
    vision = {n for n, _ in model.model.named_parameters() if "vision" in n}
    assert vision and not any("vision" in site.name for site in model.sites)
    edit = _edit(model, "plain")
    merge_edit(model.sites, edit)
    write_model_files(model.model, model.tokenizer, tmp_path / "out", model.processor)

    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    reprocessor = AutoProcessor.from_pretrained(tmp_path / "out")
    image = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")
    inputs = reprocessor(images=image, text="<image> What is this?", return_tensors="pt")
    with torch.no_grad():
        logits = reloaded(**inputs).logits
    assert torch.isfinite(logits).all()
    assert inputs["pixel_values"].shape[-1] == 32


def _mended_llama4_forward(patch: pytest.MonkeyPatch) -> None:
    """Mend transformers 5.24's Llama4ForConditionalGeneration.forward for a reference: it
    builds its output from `outputs.image_outputs`, a field the language model's output lacks.
    With the field read as None, the class computes what it would if its forward worked."""
    from transformers.modeling_outputs import MoeCausalLMOutputWithPast

    patch.setattr(MoeCausalLMOutputWithPast, "image_outputs", None, raising=False)


def test_llama4_vision_language_decodes_as_its_class_and_its_text_model(
    chat_tokenizer_dir, tmp_path, monkeypatch
):
    """Llama 4's vision-language class runs text prompts through its language model: its
    first-token log-probs and greedy tokens are the class's own (its forward mended), bit for
    bit, and the text model's (the same weights saved as `llama4_text`): the same tokens, and
    log-probs up to the rounding of a matrix product whose weights sit at another alignment
    in memory (each checkpoint's own safetensors offsets)."""
    from transformers import AutoTokenizer

    from heretic.perplexity import cross_entropy, plain_texts

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    # Weights wide enough that the prompts decode to different tokens (at the default 0.02
    # every prompt repeats one token).
    net = tiny_model("llama4", vocab_size=len(tokenizer), initializer_range=0.1)
    for folder, part in ((tmp_path / "vlm", net), (tmp_path / "text", net.language_model)):
        part.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    model = load_model(str(tmp_path / "vlm"), dtype="float32")
    text = load_model(str(tmp_path / "text"), dtype="float32")
    assert type(model.model).__name__ == "Llama4ForConditionalGeneration"
    assert model.runner is model.model.language_model
    assert text.model.config.model_type == "llama4_text"
    assert all(s.name.startswith("language_model.model.layers.") for s in model.sites)

    logprobs = model.first_token_logprobs(PROMPTS, 4)
    responses = model.generate(PROMPTS, 8, batch_size=4)
    batch = model.encode(PROMPTS)
    greedy = model.greedy(8, **batch)
    torch.testing.assert_close(text.first_token_logprobs(PROMPTS, 4), logprobs)
    assert torch.equal(text.greedy(8, **batch), greedy)
    assert text.generate(PROMPTS, 8, batch_size=4) == responses
    texts = plain_texts(tokenizer, PROMPTS, 16, "the prompts")
    assert cross_entropy(model, texts, 2).nats == pytest.approx(cross_entropy(text, texts, 2).nats)

    with monkeypatch.context() as patch, torch.inference_mode():
        _mended_llama4_forward(patch)
        logits = model.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1]
        own = model.model.generate(
            **batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    assert torch.equal(torch.log_softmax(logits.float(), dim=-1), logprobs)
    assert torch.equal(own, greedy)
    assert len(set(responses)) == len(PROMPTS), responses


def test_llama4_vision_language_output_keeps_its_vision_part_and_takes_images(
    chat_tokenizer_dir, tmp_path, monkeypatch
):
    """The merged Llama 4 output loads with Llama4ForConditionalGeneration, its vision tower and
    projector bit for bit the source's, only the edited tensors changed, and (its forward
    mended) it reads an image placed at its image tokens."""
    from transformers import AutoTokenizer, Llama4ForConditionalGeneration

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    net = tiny_model("llama4", vocab_size=len(tokenizer))
    net.config.image_token_id = tokenizer.convert_tokens_to_ids("<|image|>")
    net.save_pretrained(tmp_path / "source")
    tokenizer.save_pretrained(tmp_path / "source")

    model = load_model(str(tmp_path / "source"), dtype="float32")
    merge_edit(model.sites, _edit(model, "plain"))
    write_model_files(model.model, model.tokenizer, tmp_path / "out", model.processor)
    reloaded = Llama4ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    source = dict(net.named_parameters())
    edited = {t.name for site in model.sites for t in site.tensors()}
    for name, param in reloaded.named_parameters():
        assert torch.equal(param, source[name]) != (name in edited), name
    assert any(name.startswith("vision_model.") for name in source)

    patches = reloaded.get_image_features(
        pixel_values=torch.zeros(1, 3, 32, 32), return_dict=True
    ).last_hidden_state.shape[1]
    image = torch.tensor([[5] + [net.config.image_token_id] * patches + [6, 7]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with monkeypatch.context() as patch, torch.no_grad():
        _mended_llama4_forward(patch)
        seen = reloaded(input_ids=image, pixel_values=pixels, use_cache=False).logits
        unseen = reloaded(input_ids=image, use_cache=False).logits
    assert torch.isfinite(seen).all()
    assert not torch.allclose(seen, unseen), "the image changes the logits"
