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
from heretic.gguf_export import output_name, plan_edits, write_edited_gguf
from heretic.judges import MarkerJudge
from heretic.loading import load_model
from heretic.model import Model
from heretic.sites import ATTN, MLP

RESPONSE_TOKENS = 24  # enough for the organism's refusals, which come first
FIRST_TOKENS = 3
NEAR_TIE = 1.0  # logits; see the llama.cpp test's docstring
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
    # One thread: on a busy machine, llama.cpp's threads wait for each other at every
    # operation, which made 24 tokens of this 135M model take 10-30 s instead of 1 s.
    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False)
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


@torch.inference_mode()
def _greedy_gaps(model: Model, ids: list[int], tokens: list[int]) -> list[float]:
    """For each of `tokens` continuing `ids`, how far (in logits) the transformers model's
    own greedy choice at that position lies above it: 0 where it would pick the same token."""
    inputs = torch.tensor([ids + tokens], device=model.device)
    logits = model.model(input_ids=inputs).logits[0, len(ids) - 1 : -1].float()
    chosen = logits.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    return (logits.max(dim=1).values - chosen).tolist()


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
    """heretic loads the organism GGUF, computes mean-difference directions (128 harmful and
    128 harmless demo prompts) and writes the edited GGUF with the export's own functions
    (`plan_edits`, `write_edited_gguf`; edited matrices in Q8_0) for a fixed strong edit:
    strength 1 on both components over 20-90% of depth. 16 harmful prompts (harmful[200:216],
    held out from the demo organism's training) are formatted with heretic's chat template
    and system prompt and tokenized by the transformers tokenizer; llama.cpp answers them
    greedily (24 tokens), and heretic's marker judge reads the answers:

    - the unedited organism GGUF refuses at least 10 of them in llama.cpp, the edited one at
      most 2 (measured: 14 and 1 with the demo's organism, 12 and 0 with ../shared's);
    - each of the first 3 tokens llama.cpp generates from the edited file is the transformers
      model's greedy choice, up to a near-tie: that model is the one heretic loaded and
      scored, with the same edit applied by the search's hooks, run on the prompt plus
      llama.cpp's tokens (teacher forcing, so one near-tie cannot derail the rest), and its
      top logit may exceed the logit of llama.cpp's token by at most NEAR_TIE. Exact equality
      would be wrong to demand: the two differ by more than the edited matrices (Q8_0 in the
      file, float32 in transformers; llama.cpp also quantizes activations for its quantized
      products; up to about 1.5 logits over the vocabulary, where the edit moves up to 13), and
      the strongly edited organism has near-ties (measured: llama.cpp picks another token than
      transformers' top one for about 1 token in 10, within 0.4 logits in our runs, while the
      unedited model ranks the same tokens 1 to 7 logits below its own choice on most prompts).

    llama.cpp's own tokenization of the chat text gives the same tokens, so a llama.cpp user
    who formats prompts like heretic gets these answers.
    """
    settings = load_settings([])
    judge = MarkerJudge(tuple(settings.refusal_markers), settings.ignore_echoed_markers)
    model = load_model(str(organism_gguf), system_prompt=settings.system_prompt)
    bad = demo_data_path("harmful.txt").read_text().splitlines()
    good = demo_data_path("harmless.txt").read_text().splitlines()
    directions = mean_difference(model.residuals(good[:128], 32), model.residuals(bad[:128], 32))
    profile = ComponentParams(0.2, 0.9, 1.0)
    strengths = strengths_from_params({ATTN: profile, MLP: profile}, model.n_layers)
    edited = tmp_path / output_name(organism_gguf)
    _write_edited(organism_gguf, edited, model, TrialEdit(strengths, directions))

    prompts = bad[200:216]
    texts = [model.format_chat(p) for p in prompts]
    ids = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    before = _llama_cpp_greedy(organism_gguf, ids)
    after = _llama_cpp_greedy(edited, ids)

    def refusals(responses: list[list[int]]) -> int:
        decoded = [model.tokenizer.decode(r, skip_special_tokens=True) for r in responses]
        return sum(judge.is_refusal(r, p) for r, p in zip(decoded, prompts, strict=True))

    assert refusals(before) >= 10, "the unedited organism should refuse in llama.cpp"
    assert refusals(after) <= 2, "the edited GGUF still refuses in llama.cpp"

    hooks = EditHooks(model.sites, directions)
    hooks.set_strengths(strengths)
    try:
        gaps = [_greedy_gaps(model, x, r[:FIRST_TOKENS]) for x, r in zip(ids, after, strict=True)]
    finally:
        hooks.remove()
    assert all(len(g) == FIRST_TOKENS for g in gaps)
    assert max(max(g) for g in gaps) <= NEAR_TIE, gaps

    llm = _llama_cpp().Llama(str(edited), n_ctx=N_CTX, verbose=False, vocab_only=True)
    try:
        assert [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts] == ids
    finally:
        llm.close()


def _write_edited(source: Path, destination: Path, model: Model, edit: TrialEdit) -> None:
    """What `Finisher._write_gguf` does for a trial."""
    import gguf

    names = {t.name for t in gguf.GGUFReader(source).tensors}
    edits = plan_edits(names, model.sites, edit)
    report = write_edited_gguf(source, destination, edits, model.hidden_size)
    assert set(report.edited.values()) == {"Q8_0"}
