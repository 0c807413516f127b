"""Held-out confirmation: the front scored once more, on prompts the search never saw.

The search's figures are optimistic: the chosen trial is the best of many noisy measurements
on the same prompts, at a short response length, with responses stopped as soon as the judge
decides. After the search, the chosen trial and the other Pareto-front points (and the
original model, for reference) are scored once on the held-out prompts of `holdout`: responses
of `confirmation_response_length` tokens, every row decoded to the end (no early stop, no
screening, no pruning), judged by the run's judge and by plain markers; the KL divergence on
the held-out harmless prompts at the first answer token; and the cross-entropy of the
perplexity texts (`perplexity`). The figures are cached per trial, so the menu's later
choices cost only the trials not yet confirmed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from optuna.trial import FrozenTrial
from rich.console import Console
from rich.markup import escape

from heretic.abliteration import edit_from_params
from heretic.evaluation import kl_divergence
from heretic.figures import (
    figure_rows,
    held_out_front_table,
    held_out_note,
    perplexity_line,
    rich_table,
)
from heretic.holdout import AfterSearchSets, HeldOutSet
from heretic.judges import Judge, MarkerJudge, describe_judge, split_by_verdicts
from heretic.optimization import Objectives, best_trial, objectives, params_from_trial
from heretic.perplexity import CrossEntropy, TokenTexts, cross_entropy, plain_texts
from heretic.progress import step_progress

CHECK_EVERY = 16
"""Tokens per decoding step: rows are never stopped by the judge here, so a step only needs
to be short enough to drop rows that ended (EOS) and to move the progress bar."""


@dataclass(frozen=True)
class HeldOutScore:
    """One model's held-out figures; None where the confirmation does not measure it."""

    refusals: int | None = None
    marker_refusals: int | None = None
    unanswered: int | None = None
    kl_divergence: float | None = None
    cross_entropy: CrossEntropy | None = None


class Confirmation:
    """The original model's held-out figures (on the first `confirm`) and the trials' (each
    once). `hooks` switches a trial's edit on (any reset strategy's `set_strengths`/`clear`)."""

    def __init__(
        self,
        *,
        model,
        hooks,
        sets: AfterSearchSets,
        judge: Judge,
        markers: MarkerJudge,
        response_length: int,
        batch_size: int,
        perplexity: bool,
        console: Console,
        skip_refused_good: bool = False,
    ) -> None:
        self.model = model
        self.hooks = hooks
        self.sets = sets
        self.judge = judge
        self.markers = markers
        self.response_length = response_length
        self.batch_size = batch_size
        self.console = console
        self.base: HeldOutScore | None = None
        self.trials: dict[int, HeldOutScore] = {}
        self.seconds = 0.0
        self.texts: TokenTexts | None = None
        self.perplexity_note = ""
        self._bad = self._length_sorted(sets.bad.prompts if sets.bad else [])
        self._good = self._length_sorted(sets.good.prompts if sets.good else [])
        self._thinking: list[str] | None = None
        self.skip_refused_good = skip_refused_good
        self.good_refused: list[str] = []
        """Held-out good prompts the original model refuses, left out of the KL divergence
        (with `skip_refused_good`, as the search leaves out its own)."""
        self._kl_good = self._good
        self._base_logprobs: torch.Tensor | None = None
        self._default_texts = perplexity and sets.texts is None and bool(self._good)
        if perplexity and sets.texts is not None:
            self.texts = plain_texts(
                model.tokenizer,
                sets.texts,
                response_length,
                f"{len(sets.texts)} texts of {sets.texts_source}, up to {response_length} "
                "tokens each",
            )
            if self.texts.n_tokens == 0:
                self.perplexity_note = "the perplexity texts hold no token to score"
                self.texts = None
        elif not perplexity:
            self.perplexity_note = "perplexity = false"
        elif not self._good:
            self.perplexity_note = (
                "no perplexity_texts, and no held-out good prompts (confirm = false)"
            )

    def _length_sorted(self, prompts: list[str]) -> list[str]:
        return [prompts[i] for i in self.model.length_order(prompts)]

    # ----- scoring -----------------------------------------------------------------------

    def confirm(self, trials: Sequence[FrozenTrial]) -> None:
        """Score the original model (the first time) and every trial not yet scored."""
        missing = list({t.number: t for t in trials if t.number not in self.trials}.values())
        if self.base is not None and not missing:
            return
        started = time.perf_counter()
        generated_good = (
            self._default_texts or self.model.reader.may_think or self.skip_refused_good
        )
        work = len(missing) * len(self._bad) * self.response_length
        if self.base is None:
            work += (len(self._bad) + generated_good * len(self._good)) * self.response_length
        with step_progress(self.console) as progress:
            task = progress.add_task(
                "Held-out confirmation", total=work, info="", unit="response tokens"
            )

            def advance(n: int) -> None:
                progress.advance(task, n)

            if self.base is None:
                progress.update(task, info="original model")
                self.base = self._original(advance, generated_good)
            for k, trial in enumerate(missing):
                progress.update(task, info=f"trial {trial.number} ({k + 1} of {len(missing)})")
                self.trials[trial.number] = self._trial(trial, advance)
        self.seconds += time.perf_counter() - started

    def score(self, trial: FrozenTrial) -> HeldOutScore:
        """The trial's held-out figures, confirming it first when it has none yet."""
        self.confirm([trial])
        return self.trials[trial.number]

    def _original(self, advance: Callable[[int], None], generate_good: bool) -> HeldOutScore:
        """The original model's figures; its responses to the held-out good prompts give the
        chain of thought the KL passes start after (thinking models) and the default
        perplexity texts."""
        self.hooks.clear()
        if generate_good:
            decodings = self._decode(self._good, advance)
            rows = [(d, r) for d in decodings for r in range(d.n_rows)]
            if self.model.reader.may_think:
                thinking = [d.thinking(r) for d, r in rows]
                self._thinking = thinking if any(thinking) else None
            if self._default_texts:
                self.texts = self._response_texts(rows)
            if self.skip_refused_good:
                self._leave_out_refused(rows)
        if self._kl_good:
            self._base_logprobs = self._logprobs()
        return self._measure(advance)

    def _leave_out_refused(self, rows: list) -> None:
        """Keep for the KL divergence only the good prompts the original model answers."""
        verdicts = self.judge.verdicts([d.response(r) for d, r in rows], self._good)
        self._kl_good, self.good_refused = split_by_verdicts(self._good, verdicts)
        if self._thinking is not None:
            self._thinking = split_by_verdicts(self._thinking, verdicts)[0]

    def _response_texts(self, rows: list) -> TokenTexts | None:
        texts = response_texts(
            self.model,
            rows,
            f"the original model's greedy responses ({self.response_length} tokens at most) to "
            f"the {len(self._good)} held-out good prompts",
        )
        if texts is None:
            self.perplexity_note = "the original model gave only empty responses to score"
        return texts

    def _trial(self, trial: FrozenTrial, advance: Callable[[int], None]) -> HeldOutScore:
        strengths, directions = edit_from_params(params_from_trial(trial), self.hooks.directions)
        self.hooks.set_strengths(strengths, directions)
        try:
            return self._measure(advance)
        finally:
            self.hooks.clear()

    def _logprobs(self) -> torch.Tensor:
        return self.model.first_token_logprobs(
            self._kl_good, self.batch_size, continuations=self._thinking
        )

    def _measure(self, advance: Callable[[int], None]) -> HeldOutScore:
        """The held-out figures of the model as it is now."""
        kl = None
        if self._base_logprobs is not None and self._kl_good:
            kl = kl_divergence(self._base_logprobs, self._logprobs())
        refusals = markers = unanswered = None
        if self._bad:
            decodings = self._decode(self._bad, advance)
            rows = [(d, r) for d in decodings for r in range(d.n_rows)]
            responses = [d.response(r) for d, r in rows]
            prompts = [d.prompt(r) for d, r in rows]
            refusals = self.judge.count(responses, prompts)
            markers = self.markers.count(responses, prompts)
            unanswered = sum(d.unanswered(r) for d, r in rows)
        ce = None
        if self.texts is not None:
            ce = cross_entropy(self.model, self.texts, self.batch_size)
        return HeldOutScore(refusals, markers, unanswered, kl, ce)

    def _decode(self, prompts: list[str], advance: Callable[[int], None]) -> list:
        return decode_to_end(self.model, prompts, self.response_length, self.batch_size, advance)


def decode_to_end(
    model, prompts: Sequence[str], length: int, batch_size: int, advance: Callable[[int], None]
) -> list:
    """Greedy responses of `length` answer tokens, every row run to its end (EOS or the
    length): no judge is asked, so nothing stops early. `advance` gets response tokens (a row
    that ends early counts its unused budget when it ends)."""
    decodings = []
    for start in range(0, len(prompts), batch_size):
        decoding = model.decoding(
            list(prompts[start : start + batch_size]), length, None, CHECK_EVERY
        )
        reported = 0
        while not decoding.done:
            decoding.step()
            done = sum(
                length if decoding.final[r] else min(len(decoding.tokens[r]), length)
                for r in range(decoding.n_rows)
            )
            advance(done - reported)
            reported = done
        advance(decoding.n_rows * length - reported)
        decodings.append(decoding)
    return decodings


def response_texts(model, rows: list, description: str) -> TokenTexts | None:
    """The (prompt, response) rows of decodings as perplexity texts (None: all empty)."""
    contexts, targets = [], []
    for d, r in rows:
        if d.tokens[r]:
            contexts.append(model.encode([d.prompt(r)])["input_ids"][0].tolist())
            targets.append(list(d.tokens[r]))
    return TokenTexts(contexts, targets, description) if targets else None


def held_out_objectives(confirmation: Confirmation, trial: FrozenTrial) -> Objectives:
    """The trial's (KL divergence, refusals) on the held-out prompts, for `best_trial`."""
    score = confirmation.score(trial)
    if score.kl_divergence is None or score.refusals is None:
        raise ValueError("the confirmation measures no refusals or KL divergence")
    return Objectives(score.kl_divergence, score.refusals)


def choose_best(
    front: list[FrozenTrial],
    base_refusals: int,
    confirmation: Confirmation | None,
    on: str,
) -> FrozenTrial:
    """`best_trial` on the search's figures, or with `on` 'held_out' on the confirmation's
    (refusals scaled by the original model's held-out count)."""
    if on != "held_out" or confirmation is None:
        return best_trial(front, base_refusals)
    confirmation.confirm(front)
    assert confirmation.base is not None and confirmation.base.refusals is not None
    return best_trial(
        front, confirmation.base.refusals, lambda t: held_out_objectives(confirmation, t)
    )


# ----- what was measured, for the metadata (and from it, the report and the card) -----------


def kl_position(thinks: bool) -> str:
    return (
        "first answer token (after the original model's chain of thought)"
        if thinks
        else ("first response token")
    )


def set_source(settings, name: str, held: HeldOutSet | None) -> str:
    """Where the search's evaluation set `name` came from, less its held-out share."""
    spec = getattr(settings, name)
    text = f"{name} (`{spec.dataset}` split `{spec.split}`)"
    if held is not None and held.split_from == name:
        text += f" without the {len(held.prompts)} held out"
    return text


def in_search_record(settings, evaluator, trial: FrozenTrial, sets: AfterSearchSets | None) -> dict:
    """The search's figures of `trial`, and how the search measured them."""
    kl, refusals, openings = objectives(trial)
    n_bad, n_good = len(evaluator.bad_prompts), len(evaluator.good_prompts)

    decoding = (
        f"greedy, up to {settings.max_response_length} tokens; a response stops once the judge "
        "calls it a refusal"
    )
    if settings.prune_dominated_trials:
        decoding += "; trials that cannot reach the Pareto front stop early (pruned)"
    margin = {}
    if settings.refusal_openings:
        margin = {
            "refusal_openings": openings,
            "refusal_objective": "refusals + refusal_openings: over the bad prompts the original "
            "model refused and this edit answers, the probability it gives the original's "
            "first refusal token",
        }
    return margin | {
        "refusals": refusals,
        "base_refusals": evaluator.base_refusals,
        "n_bad_prompts": n_bad,
        "bad_prompts": set_source(settings, "bad_evaluation_prompts", sets and sets.bad),
        "kl_divergence": kl,
        "n_good_prompts": n_good,
        "good_prompts": set_source(settings, "good_evaluation_prompts", sets and sets.good),
        **left_out_record(getattr(evaluator, "good_refused", []), settings.kl_skip_refused_good),
        "kl_position": kl_position(getattr(evaluator, "thinks", False)),
        "response_tokens": settings.max_response_length,
        "decoding": decoding,
        "judge": describe_judge(evaluator.judge)["judge"],
    }


def left_out_record(refused: list[str], skipping: bool) -> dict:
    """How many good prompts the KL divergence left out (with kl_skip_refused_good)."""
    if not skipping:
        return {}
    return {
        "n_good_refused_left_out": len(refused),
        "kl_prompts": "the good prompts the original model answers: those it refuses (greedy "
        "response judged once) are left out (kl_skip_refused_good)",
    }


def held_out_record(confirmation: Confirmation | None, trial: FrozenTrial, reason: str) -> dict:
    """The held-out figures of `trial` and how they were measured; `reason` says why there are
    none when `confirmation` measures no refusals and no KL (confirm = false)."""
    sets = confirmation.sets if confirmation is not None else None
    if confirmation is None or sets is None or (sets.bad is None and sets.good is None):
        return {"measured": False, "reason": reason}
    score, base = confirmation.score(trial), confirmation.base
    assert base is not None
    record: dict = {"measured": True}
    if sets.bad is not None:
        record |= {
            "refusals": score.refusals,
            "base_refusals": base.refusals,
            "marker_refusals": score.marker_refusals,
            "base_marker_refusals": base.marker_refusals,
            "unanswered": score.unanswered,
            "n_bad_prompts": len(sets.bad.prompts),
            "bad_prompts": sets.bad.source,
            "response_tokens": confirmation.response_length,
            "decoding": f"greedy, {confirmation.response_length} tokens, every response decoded "
            "to the end (no early stop, no screening, no pruning)",
            "judge": describe_judge(confirmation.judge)["judge"],
            "also_judged_by": "plain markers (marker_refusals)",
        }
    if sets.good is not None:
        record |= {
            "kl_divergence": score.kl_divergence,
            "n_good_prompts": len(sets.good.prompts) - len(confirmation.good_refused),
            "good_prompts": sets.good.source,
            **left_out_record(confirmation.good_refused, confirmation.skip_refused_good),
            "kl_position": kl_position(confirmation._thinking is not None),
        }
    record["seconds"] = round(confirmation.seconds, 1)
    return record


def perplexity_record(confirmation: Confirmation | None, trial: FrozenTrial, reason: str) -> dict:
    """Cross-entropy of the original model and of `trial` on the perplexity texts."""
    if confirmation is None:
        return {"measured": False, "reason": reason}
    score, base = confirmation.score(trial), confirmation.base
    texts = confirmation.texts
    if texts is None or score.cross_entropy is None or base is None or not base.cross_entropy:
        return {"measured": False, "reason": confirmation.perplexity_note or reason}
    return {
        "measured": True,
        "texts": texts.description,
        "n_texts": len(texts.targets),
        "n_tokens": texts.n_tokens,
        "original": _entropy(base.cross_entropy),
        "edited": _entropy(score.cross_entropy),
    }


def _entropy(ce: CrossEntropy) -> dict:
    return {"cross_entropy": ce.nats, "perplexity": ce.perplexity}


def figures_metadata(
    settings, evaluator, confirmation: Confirmation | None, trial: FrozenTrial
) -> dict:
    """The metadata's `in_search`, `held_out` and `perplexity` entries for `trial`."""
    sets = confirmation.sets if confirmation is not None else None
    off = "confirm = false" if not settings.confirm else "nothing to confirm on"
    no_text = (
        "perplexity = false"
        if not settings.perplexity
        else ("confirm = false and no perplexity_texts")
    )
    return {
        "in_search": in_search_record(settings, evaluator, trial, sets),
        "held_out": held_out_record(confirmation, trial, off),
        "perplexity": perplexity_record(confirmation, trial, no_text),
    }


# ----- the run's steps (kept here so that cli.py only wires them) -----------------------------


def start_confirmation(
    settings, console: Console, model, hooks, evaluator, sets: AfterSearchSets | None, batch_size
) -> Confirmation | None:
    """The confirmation of this run (None when there is nothing to score after the search).

    With --select none nothing is chosen, so nothing is confirmed: workers that share a study
    run that way, and the run that chooses confirms once for all of them."""
    if sets is None:
        return None
    if settings.select == "none":
        console.print("Held-out confirmation: none with --select none (no trial is chosen)")
        return None
    return Confirmation(
        model=model,
        hooks=hooks,
        sets=sets,
        judge=evaluator.judge,
        markers=MarkerJudge(tuple(settings.refusal_markers), settings.ignore_echoed_markers),
        response_length=settings.confirmation_response_length,
        batch_size=batch_size,
        perplexity=settings.perplexity,
        console=console,
        skip_refused_good=settings.kl_skip_refused_good,
    )


def print_front(
    console: Console, confirmation: Confirmation | None, front: list[FrozenTrial], n_bad: int
) -> None:
    """Confirm the front points not yet confirmed, then print them beside the search's."""
    if confirmation is None:
        return
    if confirmation.base is None:
        console.print(
            f"[bold]Held-out confirmation[/]: the original model and {len(front)} front points"
        )
    confirmation.confirm(front)
    console.print(held_out_front_table(front, confirmation, n_bad))


def print_report(console: Console, metadata: dict, trial_number: int) -> None:
    """The chosen trial's figures: in the search beside held out, then the perplexity."""
    console.print(rich_table(figure_rows(metadata), f"Trial {trial_number}"))
    note = held_out_note(metadata)
    if note:
        console.print(note, highlight=False)
    console.print(escape(perplexity_line(metadata)), highlight=False)
