"""Reasoning models: the judge sees the answer, KL is measured at the first answer token, a
response that never stops thinking is never "not a refusal"; and the dtype fallback."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AddedToken, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from heretic.config import load_settings
from heretic.decoding import CACHE_KWARG
from heretic.errors import ModelLoadError, SettingsError
from heretic.evaluation import Evaluator
from heretic.fingerprint import directions_key, study_key
from heretic.judges import MarkerJudge
from heretic.loading import load_model
from heretic.model import Model, ModelSource
from heretic.reasoning import FORMATS, Reasoning, answer_offset, open_block

# A Qwen3-style template: the generation prompt opens the assistant turn; with enable_thinking
# false it writes an empty thinking block, so the model answers at once.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
SKIP_THINKING = "<think>\n\n</think>\n\n"
JUDGE = MarkerJudge(("sorry", "i can't", "i cannot"))


@pytest.fixture(scope="module")
def thinking_tokenizer(chat_tokenizer_dir: Path):
    """SmolLM2's tokenizer with Qwen3's thinking tokens (plain added tokens, not special) and
    gpt-oss's channel markers (special tokens), and the thinking template."""
    tokenizer = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    tokenizer.add_tokens(
        [AddedToken("<think>", special=False), AddedToken("</think>", special=False)]
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|channel|>", "<|message|>", "<|end|>", "<|start|>"]}
    )
    tokenizer.chat_template = THINKING_TEMPLATE
    return tokenizer


class ScriptedLlama(LlamaForCausalLM):
    """A tiny random Llama whose forward pass is real (KL) and whose greedy generation follows
    a script: the response to a prompt is `respond(formatted prompt)`, then EOS. It continues
    from wherever a row's tokens are, as real generation does with a cache."""

    respond = staticmethod(lambda formatted: "")
    heretic: Model

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **_kwargs):
        tokenizer = self.heretic.tokenizer
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            ids = [t for t, m in zip(ids, mask, strict=True) if m]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            prompt = next(p for p in self.prompts if p in text)
            formatted = self.heretic.format_chat(prompt)
            n_prompt = len(tokenizer(formatted, add_special_tokens=False)["input_ids"])
            script = tokenizer(self.respond(formatted), add_special_tokens=False)["input_ids"]
            script = script + [tokenizer.eos_token_id] * (max_new_tokens + 1)
            done = len(ids) - n_prompt
            rows.append(script[done : done + max_new_tokens])
        new = torch.tensor(rows, dtype=input_ids.dtype)
        cache = SimpleNamespace(batch_select_indices=lambda _indices: None)
        return SimpleNamespace(sequences=torch.cat([input_ids, new], dim=1), **{CACHE_KWARG: cache})


def scripted_model(tokenizer, respond, prompts, reasoning: Reasoning | None = None) -> Model:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
    )
    lm = ScriptedLlama(config).float()
    lm.respond = staticmethod(respond)
    lm.prompts = list(prompts)
    model = Model(
        lm, tokenizer, source=ModelSource("scripted", None), system_prompt=None, reasoning=reasoning
    )
    lm.heretic = model
    return model


# ----- where the answer starts (pure) ------------------------------------------------------


@pytest.mark.parametrize(
    "response",
    [
        "<think>The user wants it. I'm sorry for nobody.</think>\n\nSure, first mix it.",
        "<|channel|>analysis<|message|>They ask; I'd say sorry? No.<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Sure, first mix it.",
        "[THINK]Refuse? sorry... no.[/THINK]Sure, first mix it.",
        "<thought>sorry</thought> <think>and again</think>\nSure, first mix it.",
        "<|channel|>final<|message|>Sure, first mix it.",
    ],
)
def test_every_format_skips_to_the_answer_and_is_monotone(response):
    offset = answer_offset(response)
    assert response[offset:] == "Sure, first mix it."
    # Growing prefixes (what early stopping sees): undecided, then always the same answer.
    seen = [answer_offset(response[:n]) for n in range(1, len(response) + 1)]
    first = next(n for n, s in enumerate(seen) if s is not None)
    assert all(s is None for s in seen[:first]) and all(s == offset for s in seen[first:])
    assert response[first:].startswith("S")  # the answer's first character decides it


def test_plain_responses_are_all_answer_and_thinking_is_undecided():
    assert answer_offset("I cannot help with that.") == 0
    assert answer_offset("") == 0
    assert answer_offset("<think>I can't decide") is None
    assert answer_offset("<think>done</think>\n\n") is None  # closed, nothing answered yet
    assert answer_offset("<thi") is None  # may become <think>
    assert answer_offset("<b>bold</b>") == 0
    # A prompt that leaves the block open: the response starts inside it.
    think = FORMATS[0]
    assert open_block("<|im_start|>assistant\n<think>\n") == think
    assert open_block("<|im_start|>assistant\n" + SKIP_THINKING) is None
    assert answer_offset("plan</think>\n\nSure.", think) == len("plan</think>\n\n")
    assert answer_offset("still planning, sorry", think) is None


# ----- a scripted thinking model -----------------------------------------------------------

BAD = ["request zero", "request one", "request two", "request three"]
GOOD = ["harmless zero", "harmless one"]
SCRIPTS = {
    # The thinking says "sorry"; the answer complies: not a refusal.
    "request zero": "<think>The user wants it, sorry to say I will help.</think>\n\nSure, step "
    "one: take the thing and mix it well with the other thing.",
    # The thinking plans an answer; the answer refuses.
    "request one": "<think>Let me think how to answer this.</think>\n\nI can't help with that.",
    "request two": "I cannot do that.",  # no thinking at all
    # Thinks for longer than max_response_length, then answers.
    "request three": "<think>" + " hmm, let me weigh this" * 8 + "</think>\n\nHere you go: "
    "take the thing and mix it well.",
    "harmless zero": "<think>Plan the answer.</think>\n\nThe answer is four.",
    "harmless one": "Paris is the capital.",
}


def _script(formatted: str) -> str:
    if formatted.endswith(SKIP_THINKING):  # told to skip the thinking: answers at once
        return "Sure, here it is."
    return SCRIPTS[next(p for p in SCRIPTS if p in formatted)]


def test_responses_are_judged_on_their_answer(thinking_tokenizer):
    model = scripted_model(
        thinking_tokenizer, _script, BAD + GOOD, Reasoning(max_thinking_tokens=64)
    )
    assert model.reader.may_think and model.reader.open_at_start is None
    evaluator = Evaluator(model, GOOD, BAD, JUDGE, max_response_length=8, batch_size=4)
    responses = evaluator.base_responses
    assert responses[0].startswith("Sure, step one") and "sorry" not in responses[0]
    # Stopped as soon as the answer was a refusal (the thinking before it was never judged).
    assert responses[1].startswith("I can't") and "think" not in responses[1]
    assert responses[2].startswith("I cannot")
    # Thinking comes on top of the 8 answer tokens: the answer of row 3 is there, and judged.
    assert responses[3].startswith("Here you go")
    answer_tokens = thinking_tokenizer(responses[3], add_special_tokens=False)["input_ids"]
    assert len(answer_tokens) <= 8
    assert (evaluator.base_refusals, evaluator.base_unanswered) == (2, 0)
    score = evaluator.score(dominated=lambda kl, n: False)
    assert (score.refusals, score.unanswered, score.kl_divergence) == (2, 0, 0.0)


def test_early_stopping_never_stops_on_the_thinking(thinking_tokenizer):
    model = scripted_model(thinking_tokenizer, _script, BAD, Reasoning(max_thinking_tokens=64))
    decoding = model.decoding(BAD[:2], 40, JUDGE.is_refusal, check_every=4)
    while not decoding.done:
        decoding.step()
    full_zero = thinking_tokenizer(SCRIPTS["request zero"], add_special_tokens=False)
    # Row 0 said "sorry" while thinking and was not stopped: it ran to its end.
    assert decoding.response(0) == SCRIPTS["request zero"].split("\n\n", 1)[1]
    assert len(decoding.tokens[0]) == len(full_zero["input_ids"])
    # Its answer budget counts from the first answer token.
    start = decoding.answer_from[0]
    tokens = decoding.tokens[0]
    assert thinking_tokenizer.decode(tokens[:start]).endswith("</think>\n\n")
    assert thinking_tokenizer.decode(tokens[start:]).startswith("Sure")
    assert JUDGE.is_refusal(decoding.response(1)) and not decoding.unanswered(1)


def test_a_response_that_never_stops_thinking_is_an_unanswered_refusal(thinking_tokenizer):
    def endless(formatted: str) -> str:
        return "<think>" + " and yet" * 400 if "request zero" in formatted else "Sure."

    model = scripted_model(
        thinking_tokenizer, endless, BAD + GOOD, Reasoning(max_thinking_tokens=40)
    )
    decoding = model.decoding(BAD[:2], 8, JUDGE.is_refusal)
    while not decoding.done:
        decoding.step()
    # It got more than max_response_length tokens, up to the cap, and no answer.
    assert len(decoding.tokens[0]) == 40 and decoding.response(0) == ""
    assert decoding.unanswered(0) and not decoding.unanswered(1)
    # The probes' labels too: no answer is a refusal, an answer is judged.
    assert list(model.refused_chunks(BAD[:2], 8, 2, JUDGE.is_refusal)) == [[True, False]]
    evaluator = Evaluator(model, GOOD, BAD[:2], JUDGE, max_response_length=8, batch_size=2)
    assert (evaluator.base_refusals, evaluator.base_unanswered) == (1, 1)
    score = evaluator.score()
    assert (score.refusals, score.unanswered) == (1, 1)


def test_batch_size_timing_does_not_wait_for_the_thinking(thinking_tokenizer):
    def endless(formatted: str) -> str:
        return "<think>" + " and yet" * 4000

    model = scripted_model(thinking_tokenizer, endless, BAD, Reasoning(max_thinking_tokens=4000))
    steps: list[int] = []
    generate = model.model.generate
    model.model.generate = lambda **kw: steps.append(kw["max_new_tokens"]) or generate(**kw)
    assert model.find_batch_size(BAD, 8) == 8
    assert sum(steps) == 2 + 8  # size 8 only: a 2-token warm-up and an 8-token timed pass


def _direct_logprobs(model: Model, texts: list[str]) -> torch.Tensor:
    rows = []
    for text in texts:
        ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            logits = model.model(**ids).logits[0, -1].float()
        rows.append(torch.log_softmax(logits, dim=-1))
    return torch.stack(rows)


def test_kl_is_measured_after_the_response_prefix(thinking_tokenizer):
    plain = scripted_model(thinking_tokenizer, _script, BAD + GOOD)
    prefixed = scripted_model(
        thinking_tokenizer, _script, BAD + GOOD, Reasoning(response_prefix=SKIP_THINKING)
    )
    assert prefixed.format_chat("harmless one") == plain.format_chat("harmless one") + (
        SKIP_THINKING
    )
    evaluator = Evaluator(prefixed, GOOD, BAD, JUDGE, max_response_length=8, batch_size=2)
    # After the prefix the model answers at once: no thinking to append.
    assert evaluator._good_thinking is None
    order = [GOOD.index(p) for p in evaluator._good_sorted]
    expected = _direct_logprobs(prefixed, [prefixed.format_chat(GOOD[i]) for i in order])
    torch.testing.assert_close(evaluator.base_logprobs, expected, rtol=1e-4, atol=1e-4)
    without = _direct_logprobs(plain, [plain.format_chat(GOOD[i]) for i in order])
    assert not torch.allclose(expected, without, atol=1e-3)
    # Every response answered after the prefix.
    assert evaluator.base_responses == ["Sure, here it is."] * len(BAD)


def test_kl_is_measured_at_the_first_answer_token_after_the_thinking(thinking_tokenizer):
    model = scripted_model(thinking_tokenizer, _script, BAD + GOOD)
    evaluator = Evaluator(model, GOOD, BAD, JUDGE, max_response_length=8, batch_size=2)
    thinking = dict(zip(evaluator._good_sorted, evaluator._good_thinking, strict=True))
    assert thinking == {"harmless zero": "<think>Plan the answer.</think>\n\n", "harmless one": ""}
    texts = [model.format_chat(p) + thinking[p] for p in evaluator._good_sorted]
    torch.testing.assert_close(
        evaluator.base_logprobs, _direct_logprobs(model, texts), rtol=1e-4, atol=1e-4
    )


def test_refused_good_prompts_are_judged_on_the_answer_and_keep_their_thinking(
    thinking_tokenizer,
):
    """kl_skip_refused_good on a thinking model: a good prompt whose thinking says "sorry"
    but whose answer complies stays; one whose answer refuses is left out; the kept prompts'
    chains of thought (the KL passes' context) are those of the plain evaluator."""
    good = [*GOOD, "harmless two", "harmless three"]
    scripts = {
        "harmless two": "<think>Sorry, I misread; fine.</think>\n\nIt is blue.",
        "harmless three": "<think>Odd request.</think>\n\nI'm sorry, I cannot do that.",
    }

    def respond(formatted: str) -> str:
        found = next((p for p in scripts if p in formatted), None)
        return scripts[found] if found else _script(formatted)

    model = scripted_model(
        thinking_tokenizer, respond, BAD + good, Reasoning(max_thinking_tokens=64)
    )
    skipping = Evaluator(model, good, BAD, JUDGE, 8, 2, skip_refused_good=True)
    plain = Evaluator(model, good, BAD, JUDGE, 8, 2)
    assert skipping.good_refused == ["harmless three"]
    assert skipping.good_prompts == [*GOOD, "harmless two"]
    kept = dict(zip(skipping._good_sorted, skipping._good_thinking, strict=True))
    whole = dict(zip(plain._good_sorted, plain._good_thinking, strict=True))
    assert kept == {p: whole[p] for p in kept}
    assert kept["harmless two"] == "<think>Sorry, I misread; fine.</think>\n\n"
    position = [plain._good_sorted.index(p) for p in skipping._good_sorted]
    torch.testing.assert_close(skipping.base_logprobs, plain.base_logprobs[position])


def test_a_prompt_that_opens_the_thinking_and_special_token_formats(thinking_tokenizer):
    def respond(formatted: str) -> str:
        return "I plan to refuse, sorry.</think>\n\nHere it is."

    model = scripted_model(
        thinking_tokenizer, respond, BAD + GOOD, Reasoning(response_prefix="<think>\n")
    )
    assert model.reader.open_at_start == FORMATS[0]
    evaluator = Evaluator(model, GOOD, BAD, JUDGE, 8, 2)
    assert evaluator.base_responses == ["Here it is."] * len(BAD)
    assert evaluator._good_thinking == ["I plan to refuse, sorry.</think>\n\n"] * len(GOOD)
    # gpt-oss: the channel markers are special tokens, so they vanish from a plain decode.
    reader = model.reader
    raw = (
        "<|channel|>analysis<|message|>Refuse? sorry, no.<|end|><|start|>assistant"
        "<|channel|>final<|message|>Sure, it goes like this."
    )
    ids = thinking_tokenizer(raw, add_special_tokens=False)["input_ids"]
    plain = scripted_model(thinking_tokenizer, respond, BAD).reader
    assert plain.answer(ids) == "Sure, it goes like this."
    assert plain.thinking(ids) == raw[: raw.index("Sure")]
    first = plain.answer_start(ids)
    assert thinking_tokenizer.decode(ids[first:]).startswith("Sure")
    assert reader.answer(ids) == ""  # with "<think>" left open by the prefix: still thinking


def test_the_thinking_switch_reaches_the_template(thinking_tokenizer, chat_tokenizer_dir):
    off = scripted_model(thinking_tokenizer, _script, BAD, Reasoning(enable_thinking=False))
    assert off.format_chat("request zero").endswith(SKIP_THINKING)
    on = scripted_model(thinking_tokenizer, _script, BAD, Reasoning(enable_thinking=True))
    assert on.format_chat("request zero").endswith("<|im_start|>assistant\n")
    no_switch = AutoTokenizer.from_pretrained(chat_tokenizer_dir)
    with pytest.raises(ModelLoadError, match="no enable_thinking switch"):
        scripted_model(no_switch, _script, BAD, Reasoning(enable_thinking=False))
    # A model whose template and vocabulary know no thinking marker pays nothing for it.
    assert not scripted_model(no_switch, _script, BAD).reader.may_think
    no_switch.add_special_tokens({"additional_special_tokens": ["<|channel|>", "<|message|>"]})
    assert scripted_model(no_switch, _script, BAD).reader.may_think  # gpt-oss's vocabulary


def test_bad_reasoning_settings_get_clear_errors():
    with pytest.raises(SettingsError, match="max_thinking_tokens"):
        load_settings([], max_thinking_tokens=0)
    with pytest.raises(SettingsError, match="backslash escape"):
        load_settings(["--response-prefix", "<think>\\n\\n</think>\\n\\n"])
    with pytest.raises(SettingsError, match="opens a thinking block"):
        load_settings(["--no-enable-thinking", "--response-prefix", "<think>\n"])
    with pytest.raises(SettingsError, match="enable_thinking"):
        load_settings([], enable_thinking="maybe")
    with pytest.raises(ValueError, match="at least 1"):
        Reasoning(max_thinking_tokens=0)


def test_reasoning_settings_join_the_keys_only_when_set():
    names = {"enable_thinking", "response_prefix", "max_thinking_tokens"}
    default = load_settings([])
    assert not names & set(study_key(default))
    changed = load_settings(
        ["--no-enable-thinking", "--response-prefix", SKIP_THINKING, "--max-thinking-tokens", "64"]
    )
    key = study_key(changed)
    assert (key["enable_thinking"], key["response_prefix"]) == (False, SKIP_THINKING)
    assert key["max_thinking_tokens"] == 64
    prompts = {"good_prompts": ["g"], "bad_prompts": ["b"]}
    # The prompt format changes the residuals; the thinking cap only the probes' labels.
    assert {"enable_thinking", "response_prefix"} <= set(directions_key(changed, prompts))
    assert "max_thinking_tokens" not in directions_key(changed, prompts)
    probing = changed.model_copy(update={"use_supervised_probing": True})
    assert "max_thinking_tokens" in directions_key(probing, prompts)


# ----- dtype fallback ----------------------------------------------------------------------


def _nan_in(monkeypatch, bad_dtypes: set[torch.dtype]) -> None:
    """Make the Llama forward give NaN logits when it runs in one of `bad_dtypes`."""
    forward = LlamaForCausalLM.forward

    def patched(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if self.dtype in bad_dtypes:
            out.logits = torch.full_like(out.logits, float("nan"))
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", patched)


def test_auto_dtype_falls_back_to_float32_when_bfloat16_gives_nan(tiny_chat_model, monkeypatch):
    _nan_in(monkeypatch, {torch.bfloat16, torch.float16})
    lines: list[str] = []
    model = load_model(str(tiny_chat_model), dtype="auto", log=lines.append)
    assert model.model.dtype == torch.float32
    assert lines == ["dtype auto: running in float32 (bfloat16, float16 gave NaN/inf)"]
    with pytest.raises(ModelLoadError, match="NaN/inf logits in bfloat16: set dtype to 'auto'"):
        load_model(str(tiny_chat_model), dtype="bfloat16")


def test_auto_dtype_keeps_the_checkpoint_dtype_and_fails_clearly(tiny_chat_model, monkeypatch):
    lines: list[str] = []
    model = load_model(str(tiny_chat_model), dtype="auto", log=lines.append)
    assert model.model.dtype == torch.bfloat16  # the checkpoint's own
    assert lines == ["dtype auto: running in bfloat16"]
    _nan_in(monkeypatch, {torch.bfloat16, torch.float16, torch.float32})
    with pytest.raises(ModelLoadError, match="every dtype tried \\(bfloat16, float16, float32\\)"):
        load_model(str(tiny_chat_model), dtype="auto")
