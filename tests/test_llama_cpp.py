"""llama.cpp itself runs heretic's edited GGUF the way heretic scored it.

The other GGUF tests read the output with `gguf` and transformers, which share none of
llama.cpp's code: a file only they accept would pass them. Here `llama-cpp-python` (llama.cpp
built from source by `scripts/setup.sh`) runs the edited organism.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _hash_files, cache_dir, organism_adapter, smollm2_gguf
from organism_gguf import to_gguf_rows, write_organism_gguf

from heretic.abliteration import ComponentParams, strengths_from_params
from heretic.config import load_settings
from heretic.demo_organism import demo_data_path
from heretic.directions import mean_difference
from heretic.edit import EditHooks, TrialEdit
from heretic.evaluation import MarkerJudge
from heretic.gguf_export import output_name, plan_edits, write_edited_gguf
from heretic.model import Model, load_model
from heretic.sites import ATTN, MLP

RESPONSE_TOKENS = 24  # enough for the organism's refusals, which come first
FIRST_TOKENS = 3
N_CTX = 256


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: run scripts/setup.sh")
    return llama_cpp


@pytest.fixture(scope="module")
def organism_gguf() -> Path:
    """The organism as a GGUF file (see organism_gguf.py), built once per adapter."""
    adapter = organism_adapter()
    path = cache_dir() / f"organism-gguf-{_hash_files(adapter)}" / "organism.gguf"
    if not path.is_file():
        write_organism_gguf(smollm2_gguf(), adapter, path)
    return path


def _llama_cpp_greedy(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    """llama.cpp's greedy continuation (temperature 0, no repeat penalty) of each token list,
    up to RESPONSE_TOKENS or its end-of-generation token."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=2, verbose=False)
    try:
        responses = []
        for ids in prompts:
            assert len(ids) + RESPONSE_TOKENS <= N_CTX
            response: list[int] = []
            for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
                if llm.token_eos() == token or len(response) == RESPONSE_TOKENS:
                    break
                response.append(token)
            responses.append(response)
        return responses
    finally:
        llm.close()


def _transformers_greedy(model: Model, ids: list[int], n: int) -> list[int]:
    inputs = torch.tensor([ids], device=model.device)
    output = model.model.generate(
        input_ids=inputs,
        attention_mask=torch.ones_like(inputs),
        max_new_tokens=n,
        min_new_tokens=n,
        do_sample=False,
        pad_token_id=model.tokenizer.pad_token_id,
    )
    return output[0, len(ids) :].tolist()


def test_organism_gguf_q_k_rows_are_what_transformers_reads_back():
    """The organism's q/k LoRA deltas go into the GGUF in llama.cpp's row order; transformers'
    GGUF reader must turn them back into its own (9 query heads, 3 key/value heads as in
    SmolLM2)."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    reader = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    rng = np.random.default_rng(0)
    for name, n_head in (("blk.0.attn_q.weight", 9), ("blk.0.attn_k.weight", 3)):
        weight = rng.standard_normal((n_head * 8, 5)).astype(np.float32)
        rows = to_gguf_rows(weight, n_head)
        assert not np.array_equal(rows, weight)
        assert np.array_equal(reader.process(rows, name).weights, weight)


@pytest.mark.slow
def test_llama_cpp_runs_the_edited_organism_gguf(organism_gguf, tmp_path):
    """heretic loads the organism GGUF, computes mean-difference directions (64 harmful and
    64 harmless demo prompts), and writes the edited GGUF with the export's own functions
    (`plan_edits`, `write_edited_gguf`; edited matrices as Q8_0) for a fixed strong edit
    (strength 1 on both components over 20-90% of depth). For 8 held-out harmful prompts,
    formatted by heretic's chat template (settings' system prompt) and tokenized by the
    transformers tokenizer, llama.cpp's greedy answers (24 tokens) are judged by heretic's
    marker judge:

    - the unedited organism GGUF refuses at least 6 of them and the edited one at most 1;
    - the first 3 tokens llama.cpp generates from the edited file equal the greedy tokens of
      the transformers model heretic loaded, with the same edit applied by the search's hooks.
      Only 3: the two differ by more than the edited matrices (Q8_0 in the file, float32 in
      transformers; llama.cpp also quantizes activations for its quantized matrix products),
      so a near-tie further on may break differently without anything being wrong.

    llama.cpp's own tokenization of the chat text must give the same tokens, so a llama.cpp
    user who formats prompts like heretic gets these answers.
    """
    settings = load_settings([])
    judge = MarkerJudge(tuple(settings.refusal_markers), settings.ignore_echoed_markers)
    model = load_model(str(organism_gguf), system_prompt=settings.system_prompt)
    bad = demo_data_path("harmful.txt").read_text().splitlines()
    good = demo_data_path("harmless.txt").read_text().splitlines()
    directions = mean_difference(model.residuals(good[:64], 32), model.residuals(bad[:64], 32))
    profile = ComponentParams(0.2, 0.9, 1.0)
    strengths = strengths_from_params({ATTN: profile, MLP: profile}, model.n_layers)
    edit = TrialEdit(strengths, directions)

    import gguf

    names = {t.name for t in gguf.GGUFReader(organism_gguf).tensors}
    edited = tmp_path / output_name(organism_gguf)
    report = write_edited_gguf(
        organism_gguf, edited, plan_edits(names, model.sites, edit), model.hidden_size
    )
    assert set(report.edited.values()) == {"Q8_0"}

    prompts = bad[200:208]  # the demo organism was trained on harmful[:200]
    texts = [model.format_chat(p) for p in prompts]
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    before = _llama_cpp_greedy(organism_gguf, ids)
    after = _llama_cpp_greedy(edited, ids)

    def refusals(responses: list[list[int]]) -> int:
        decoded = [model.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        return sum(judge.is_refusal(r, p) for r, p in zip(decoded, prompts, strict=True))

    assert refusals(before) >= 6, "the unedited organism should refuse in llama.cpp"
    assert refusals(after) <= 1, "the edited GGUF still refuses in llama.cpp"

    hooks = EditHooks(model.sites, directions)
    hooks.set_strengths(strengths)
    try:
        expected = [_transformers_greedy(model, x, FIRST_TOKENS) for x in ids]
    finally:
        hooks.remove()
    assert [r[:FIRST_TOKENS] for r in after] == expected

    llm = _llama_cpp().Llama(str(edited), n_ctx=N_CTX, n_threads=2, verbose=False, vocab_only=True)
    try:
        assert [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts] == ids
    finally:
        llm.close()
