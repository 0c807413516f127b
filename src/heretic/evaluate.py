"""`heretic evaluate`: any model scored against its base, the way a run confirms its choice.

A user comparing our output with another tool's, or checking a model from the hub, needs the
figures a run reports, measured the same way on both models. So this scores the base and the
evaluated model on the run's prompt groups (the evaluation prompts the search would use, and
the share held out of it, `holdout`) with the confirmation's method (`confirmation`): greedy
responses of `confirmation_response_length` tokens, every row decoded to the end, judged by
the configured judge and by plain markers; the KL divergence of the evaluated model from the
base at the first response token on the harmless prompts; the cross-entropy of the perplexity
texts; and the lm-eval benchmarks. The models are loaded one after the other (a big model and
its base need not fit together): the base's outputs are kept, then it is freed.

Every response is judged once both models have answered, since the adaptive judge learns its
phrases from the base's responses, as in a run.
"""

from __future__ import annotations

import gc
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from heretic.atomic import writable_parent
from heretic.confirmation import (
    decode_to_end,
    kl_position,
    left_out_record,
    response_texts,
    set_source,
)
from heretic.errors import HereticError, SettingsError
from heretic.evaluation import kl_divergence
from heretic.export import heretic_version, library_versions, write_json
from heretic.holdout import AfterSearchSets, HeldOutSet, hold_out, sets_to_load
from heretic.judges import (
    OPENING_TOKENS,
    AdaptiveJudge,
    Judge,
    MarkerJudge,
    describe_judge,
    split_by_verdicts,
)
from heretic.loading import load_configured
from heretic.model import Model
from heretic.model_judge import scoring_judge
from heretic.perplexity import CrossEntropy, TokenTexts, cross_entropy, plain_texts
from heretic.preflight import check_local_inputs, check_model_argument, load_prompt_sets
from heretic.progress import step_progress, tracked

PROMPT_SETS = ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")
"""All of a run's sets load, so that the held-out share is drawn exactly as a run draws it
(it avoids prompts the other sets hold)."""
METADATA = "heretic_metadata.json"


class EvaluationError(HereticError):
    """The evaluated model or its base cannot be compared."""


@dataclass(frozen=True)
class PromptGroup:
    """Harmful and harmless prompts scored together: the search's share or the held-out one."""

    key: str
    title: str
    bad: list[str]
    bad_source: str
    good: list[str]
    good_source: str


@dataclass
class GroupOutputs:
    """One model's raw outputs on one group, judged once both models have answered."""

    responses: list[str]
    prompts: list[str]
    unanswered: int
    logprobs: torch.Tensor | None


@dataclass
class ModelOutputs:
    groups: dict[str, GroupOutputs] = field(default_factory=dict)
    cross_entropy: CrossEntropy | None = None
    benchmarks: Any = None
    seconds: float = 0.0


# ----- which models ---------------------------------------------------------------------------


def card_base_model(text: str) -> str | None:
    """`base_model` of a model card's YAML header (the first one where it lists several)."""
    from huggingface_hub import ModelCard

    try:
        base = ModelCard(text, ignore_metadata_errors=True).data.to_dict().get("base_model")
    except ValueError:
        return None
    if isinstance(base, list):
        base = base[0] if base else None
    return base if isinstance(base, str) and base else None


def _named_base(folder: Path) -> tuple[str, str] | None:
    """The base a local output names: our metadata (beside the model or one folder up, where
    a run writes it), else the card's `base_model`."""
    for where in (folder, folder.parent):
        path = where / METADATA
        if path.is_file():
            try:
                source = json.loads(path.read_text(encoding="utf-8")).get("source_model")
            except (OSError, ValueError, AttributeError):
                source = None
            if isinstance(source, str) and source:
                return source, str(path)
    card = folder / "README.md"
    if card.is_file():
        base = card_base_model(card.read_text(encoding="utf-8", errors="replace"))
        if base:
            return base, f"base_model in {card}"
    return None


def _hub_base(repo_id: str) -> tuple[str, str] | None:
    from huggingface_hub import hf_hub_download

    for name in (METADATA, "README.md"):
        try:
            text = Path(hf_hub_download(repo_id, name)).read_text(encoding="utf-8")
        except Exception:  # absent, offline, gated: the user names the base instead
            continue
        base = json.loads(text).get("source_model") if name == METADATA else card_base_model(text)
        if isinstance(base, str) and base:
            return base, f"{name} of {repo_id}"
    return None


def resolve_base(model: str, evaluated: str) -> tuple[str, str]:
    """(the base model, where it was found): --model, else what the evaluated model names."""
    if model:
        return model, "--model"
    path = Path(evaluated)
    if path.exists():
        found = _named_base(path.parent if path.is_file() else path)
    else:
        found = _hub_base(evaluated)
    if found is None:
        raise SettingsError(
            f"Which model is {evaluated} an edit of? It names no base ({METADATA} or "
            "base_model in its model card): give the base with --model."
        )
    return found


def report_path(settings) -> Path:
    if settings.evaluation_report is not None:
        return settings.evaluation_report
    name = Path(settings.evaluate_model.rstrip("/")).name.removesuffix(".gguf")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"
    return settings.output_dir / f"evaluation-{name}.json"


# ----- which prompts --------------------------------------------------------------------------


def prompt_groups(settings, console: Console) -> tuple[list[PromptGroup], AfterSearchSets]:
    """The evaluation sets less their held-out share, and the held-out share (as a run), with
    the after-search sets (the user's perplexity texts)."""
    loaded = load_prompt_sets(settings, PROMPT_SETS + sets_to_load(settings))
    search, after = hold_out(settings, loaded, lambda line: console.print(f"  {line}"))
    sets = after or AfterSearchSets(None, None)
    groups = [
        PromptGroup(
            "evaluation",
            "evaluation prompts",
            search["bad_evaluation_prompts"],
            set_source(settings, "bad_evaluation_prompts", sets.bad),
            search["good_evaluation_prompts"],
            set_source(settings, "good_evaluation_prompts", sets.good),
        )
    ]
    if sets.bad is not None or sets.good is not None:
        bad, good = sets.bad or HeldOutSet([], ""), sets.good or HeldOutSet([], "")
        groups.append(
            PromptGroup(
                "held_out", "held-out prompts", bad.prompts, bad.source, good.prompts, good.source
            )
        )
    for group in groups:
        console.print(
            f"  {group.title}: {len(group.bad)} harmful, {len(group.good)} harmless",
            highlight=False,
        )
    return groups, sets


# ----- scoring --------------------------------------------------------------------------------


def free_memory() -> None:
    """Give a dropped model's memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_same_vocabulary(base_vocab: dict[str, int], model: Model, evaluated: str) -> None:
    """KL divergence and perplexity compare next-token probabilities token by token, and the
    base's responses are replayed in the evaluated model: both need one vocabulary."""
    vocab = model.tokenizer.get_vocab()
    if vocab != base_vocab:
        differ = len(set(vocab.items()) ^ set(base_vocab.items()))
        raise EvaluationError(
            f"{evaluated} and its base have different tokenizers ({differ} vocabulary entries "
            "differ), so their next-token probabilities cannot be compared. Evaluate it against "
            "the model it was made from (--model)."
        )


class Evaluation:
    """The base's and the evaluated model's outputs on the same prompts, then the report."""

    def __init__(self, settings, console: Console) -> None:
        self.settings = settings
        self.console = console
        self.length = settings.confirmation_response_length
        self.groups, sets = prompt_groups(settings, console)
        self.user_texts, self.texts_source = sets.texts, sets.texts_source
        held_good = [g for g in self.groups if g.key == "held_out" and g.good]
        self.default_texts = settings.perplexity and sets.texts is None and bool(held_good)
        self.texts: TokenTexts | None = None
        self.perplexity_note = "perplexity = false" if not settings.perplexity else ""
        if settings.perplexity and not self.default_texts and sets.texts is None:
            self.perplexity_note = "no perplexity_texts, and no held-out good prompts"
        self.thinking: dict[str, list[str] | None] = {}
        self.good_responses: dict[str, list[str]] = {}
        """The base's responses to each group's good prompts (with kl_skip_refused_good: those
        it refuses are left out of the KL divergence, as a run leaves them out)."""
        self.judge: Judge | None = None
        self.batch_size = 0
        self.comparison = None
        self.benchmarks = None
        if settings.benchmarks:
            from heretic.capability import CACHE_FOLDER, BenchmarkOptions, Benchmarks

            self.benchmarks = Benchmarks(
                settings.benchmarks,
                BenchmarkOptions.from_settings(settings),
                settings.benchmark_task_paths,
                settings.output_dir / CACHE_FOLDER,
                log=self._log,
            )
            self.tasks = self.benchmarks.load()

    def _log(self, line: str) -> None:
        self.console.print(f"  {escape(line)}", highlight=False)

    def _load(self, model_id: str | None, what: str) -> Model:
        self.console.print(f"[bold]Loading the {what}[/] {escape(model_id or self.settings.model)}")
        return load_configured(self.settings, model_id, log=self._log)

    def run(self) -> tuple[ModelOutputs, ModelOutputs]:
        """Both models' outputs, the base first (it is freed before the other loads)."""
        base = self._load(None, "base model")
        self.groups = [self._sorted(base, g) for g in self.groups]
        if self.user_texts is not None:
            self.texts = plain_texts(
                base.tokenizer,
                self.user_texts,
                self.length,
                f"{len(self.user_texts)} texts of {self.texts_source}, up to {self.length} "
                "tokens each",
            )
        base_outputs = self._measure(base, "Base model", first=True)
        self.judge = self._fit_judge(base, base_outputs)
        vocab = base.tokenizer.get_vocab()
        del base
        free_memory()
        evaluated = self._load(self.settings.evaluate_model, "evaluated model")
        check_same_vocabulary(vocab, evaluated, self.settings.evaluate_model)
        outputs = self._measure(evaluated, "Evaluated model", first=False)
        del evaluated
        free_memory()
        return base_outputs, outputs

    @staticmethod
    def _sorted(model: Model, group: PromptGroup) -> PromptGroup:
        """Prompts in length order (less padding); the base's order serves both models."""

        def order(prompts: list[str]) -> list[str]:
            return [prompts[i] for i in model.length_order(prompts)] if prompts else []

        return PromptGroup(
            group.key,
            group.title,
            order(group.bad),
            group.bad_source,
            order(group.good),
            group.good_source,
        )

    def _batch_size(self, model: Model) -> int:
        if self.settings.batch_size:
            return self.settings.batch_size
        prompts = [p for g in self.groups for p in g.bad + g.good]
        batch_size = model.find_batch_size(prompts, self.settings.max_batch_size)
        self._log(f"automatic batch size: {batch_size}")
        return batch_size

    def _measure(self, model: Model, which: str, first: bool) -> ModelOutputs:
        started = time.perf_counter()
        self.batch_size = batch_size = self._batch_size(model)
        outputs = ModelOutputs()
        base_good = [g for g in self.groups if first and self._generates_good(model, g)]
        rows = sum(len(g.bad) for g in self.groups) + sum(len(g.good) for g in base_good)
        with step_progress(self.console) as progress:
            task = progress.add_task(
                which, total=rows * self.length, info="", unit="response tokens"
            )

            def advance(n: int) -> None:
                progress.advance(task, n)

            for group in self.groups:
                progress.update(task, info=group.title)
                if group in base_good:
                    self._base_good(model, group, batch_size, advance)
                outputs.groups[group.key] = self._group(model, group, batch_size, advance)
        if self.texts is not None:
            outputs.cross_entropy = cross_entropy(model, self.texts, batch_size)
        if self.benchmarks is not None:
            if first:
                outputs.benchmarks = self.benchmarks.original(model, self.tasks)
            else:
                outputs.benchmarks = self.benchmarks.edited(model, self.tasks)
        outputs.seconds = time.perf_counter() - started
        return outputs

    def _generates_good(self, model: Model, group: PromptGroup) -> bool:
        """The base answers a group's harmless prompts when its chain of thought is the KL
        passes' context (thinking models), or its answers are the default perplexity texts."""
        wanted = model.reader.may_think or (self.default_texts and group.key == "held_out")
        wanted = wanted or self.settings.kl_skip_refused_good
        return bool(group.good) and wanted

    def _base_good(self, model: Model, group: PromptGroup, batch_size: int, advance) -> None:
        decodings = decode_to_end(model, group.good, self.length, batch_size, advance)
        rows = [(d, r) for d in decodings for r in range(d.n_rows)]
        self.good_responses[group.key] = [d.response(r) for d, r in rows]
        if model.reader.may_think:
            thinking = [d.thinking(r) for d, r in rows]
            self.thinking[group.key] = thinking if any(thinking) else None
        if self.default_texts and group.key == "held_out":
            self.texts = response_texts(
                model,
                rows,
                f"the base model's greedy responses ({self.length} tokens at most) to the "
                f"{len(group.good)} held-out good prompts",
            )
            if self.texts is None:
                self.perplexity_note = "the base model gave only empty responses to score"

    def _group(
        self, model: Model, group: PromptGroup, batch_size: int, advance: Callable[[int], None]
    ) -> GroupOutputs:
        decodings = decode_to_end(model, group.bad, self.length, batch_size, advance)
        rows = [(d, r) for d in decodings for r in range(d.n_rows)]
        logprobs = None
        if group.good:
            logprobs = model.first_token_logprobs(
                group.good, batch_size, continuations=self.thinking.get(group.key)
            )
        return GroupOutputs(
            [d.response(r) for d, r in rows],
            [d.prompt(r) for d, r in rows],
            sum(d.unanswered(r) for d, r in rows),
            logprobs,
        )

    def _fit_judge(self, base: Model, outputs: ModelOutputs) -> Judge:
        """The configured judge; the adaptive one learns from the base's responses to the
        evaluation prompts and its openings on the harmless ones, as a run's does."""
        settings = self.settings
        judge = scoring_judge(settings, log=self._log)
        evaluation = self.groups[0]
        if settings.refusal_judge != "adaptive" or not evaluation.bad:
            return judge
        chunks = base.generate_chunks(evaluation.good, OPENING_TOKENS, self.batch_size)
        openings = tracked(
            self.console, "Learning the judge: good openings", evaluation.good, chunks
        )
        bad = outputs.groups[evaluation.key]
        return AdaptiveJudge.fit(
            settings.refusal_markers,
            bad.prompts,
            bad.responses,
            evaluation.good,
            openings,
            ignore_echoed=settings.ignore_echoed_markers,
        )


# ----- the report -----------------------------------------------------------------------------


def _refusal_record(judge: Judge, markers: MarkerJudge, outputs: GroupOutputs) -> dict:
    return {
        "refusals": judge.count(outputs.responses, outputs.prompts),
        "marker_refusals": markers.count(outputs.responses, outputs.prompts),
        "unanswered": outputs.unanswered,
    }


def group_record(
    group: PromptGroup,
    base: GroupOutputs,
    evaluated: GroupOutputs,
    judge: Judge,
    markers,
    good_responses: list[str] | None = None,
) -> dict:
    """One prompt group's figures for both models, and where its prompts came from;
    with `good_responses` (the base's, under kl_skip_refused_good) the KL divergence leaves
    out the good prompts the base refuses."""
    refused = None if good_responses is None else judge.verdicts(good_responses, group.good)
    n_good = len(group.good) - (0 if refused is None else sum(refused))
    record: dict[str, Any] = {
        "n_bad_prompts": len(group.bad),
        "bad_prompts": group.bad_source,
        "n_good_prompts": n_good,
        "good_prompts": group.good_source,
    }
    if refused is not None:
        record |= left_out_record(split_by_verdicts(group.good, refused)[1], skipping=True)
    if group.bad:
        record["base"] = _refusal_record(judge, markers, base)
        record["evaluated"] = _refusal_record(judge, markers, evaluated)
    if base.logprobs is not None and evaluated.logprobs is not None:
        if base.logprobs.shape != evaluated.logprobs.shape:
            raise EvaluationError(
                f"The models' vocabularies differ in size ({base.logprobs.shape[-1]} vs "
                f"{evaluated.logprobs.shape[-1]} logits): their next-token probabilities "
                "cannot be compared. Evaluate against the model it was made from (--model)."
            )
        if refused is None:
            record["kl_divergence"] = kl_divergence(base.logprobs, evaluated.logprobs)
        elif n_good:
            keep = ~torch.tensor(refused, dtype=torch.bool)
            record["kl_divergence"] = kl_divergence(base.logprobs[keep], evaluated.logprobs[keep])
    return record


def perplexity_record(evaluation: Evaluation, base: ModelOutputs, evaluated: ModelOutputs) -> dict:
    """Cross-entropy of both models on the perplexity texts (as the run's metadata has it)."""
    texts = evaluation.texts
    if texts is None or base.cross_entropy is None or evaluated.cross_entropy is None:
        return {"measured": False, "reason": evaluation.perplexity_note or "no texts"}

    def entropy(ce: CrossEntropy) -> dict:
        return {"cross_entropy": ce.nats, "perplexity": ce.perplexity}

    return {
        "measured": True,
        "texts": texts.description,
        "n_texts": len(texts.targets),
        "n_tokens": texts.n_tokens,
        "original": entropy(base.cross_entropy),
        "edited": entropy(evaluated.cross_entropy),
    }


def build_report(
    evaluation: Evaluation, base_model: str, base_from: str, base: ModelOutputs, evaluated
) -> dict:
    settings, judge = evaluation.settings, evaluation.judge
    assert judge is not None
    markers = MarkerJudge(tuple(settings.refusal_markers), settings.ignore_echoed_markers)
    length = evaluation.length
    report: dict[str, Any] = {
        "evaluated_model": settings.evaluate_model,
        "base_model": base_model,
        "base_model_from": base_from,
        "groups": {
            g.key: group_record(
                g,
                base.groups[g.key],
                evaluated.groups[g.key],
                judge,
                markers,
                evaluation.good_responses.get(g.key) if settings.kl_skip_refused_good else None,
            )
            for g in evaluation.groups
        },
        "response_tokens": length,
        "decoding": f"greedy, {length} tokens, every response decoded to the end",
        "judge": describe_judge(judge),
        "also_judged_by": "plain markers (marker_refusals)",
        "kl_position": kl_position(any(evaluation.thinking.values())),
        "perplexity": perplexity_record(evaluation, base, evaluated),
        "seconds": {"base": round(base.seconds, 1), "evaluated": round(evaluated.seconds, 1)},
    }
    if evaluation.benchmarks is not None:
        from heretic.capability_report import benchmark_record

        original, cached = base.benchmarks
        comparison = evaluation.benchmarks.comparison(original, evaluated.benchmarks, cached)
        report["benchmarks"] = benchmark_record(comparison)
        evaluation.comparison = comparison
    report |= {
        "heretic_version": heretic_version(),
        "library_versions": library_versions(),
        "settings": settings.model_dump(mode="json"),
    }
    return report


def _count(record: dict, key: str) -> tuple[str, str]:
    n = record["n_bad_prompts"]
    return f"{record['base'][key]}/{n}", f"{record['evaluated'][key]}/{n}"


def report_table(report: dict) -> Table:
    """Both models side by side, group by group."""
    table = Table(title="Evaluated model against its base", show_lines=True)
    for name in ("", "base", "evaluated"):
        table.add_column(name)
    judge = report["judge"]["judge"]
    for record, title in ((r, k.replace("_", "-")) for k, r in report["groups"].items()):
        if "base" in record:
            table.add_row(f"refusals, {title} prompts ({judge})", *_count(record, "refusals"))
            table.add_row("  by plain markers", *_count(record, "marker_refusals"))
            if record["base"]["unanswered"] or record["evaluated"]["unanswered"]:
                table.add_row("  unanswered (still thinking)", *_count(record, "unanswered"))
        if "kl_divergence" in record:
            table.add_row(
                f"KL divergence, {title} prompts ({record['n_good_prompts']} harmless)",
                "-",
                f"{record['kl_divergence']:.4f}",
            )
    return table


def print_report(console: Console, report: dict, comparison, path: Path) -> None:
    from heretic.figures import perplexity_line

    console.print(report_table(report))
    groups = report["groups"].values()
    sources = "; ".join(f"{r['n_bad_prompts']}: {r['bad_prompts']}" for r in groups)
    console.print(
        escape(
            f"Responses: {report['decoding']}. Harmful prompts: {sources}. KL divergence at "
            f"the {report['kl_position']}."
        ),
        highlight=False,
    )
    console.print(escape(perplexity_line(report)), highlight=False)
    if comparison is not None:
        from heretic.capability_report import comparison_table

        console.print(comparison_table(comparison, "Benchmarks: base vs evaluated model"))
    console.print(f"Report: {escape(str(path))}", highlight=False)


def evaluate(settings, console: Console | None = None) -> dict:
    """Score `settings.evaluate_model` against its base; print and write the report."""
    console = console or Console(stderr=True)
    evaluated = settings.evaluate_model
    check_model_argument(evaluated, None, "--evaluate-model")
    base_model, base_from = resolve_base(settings.model, evaluated)
    if base_from != "--model":
        console.print(f"Base model: {escape(base_model)} (named by {escape(base_from)})")
    settings = settings.model_copy(update={"model": base_model})
    try:
        check_local_inputs(settings)
    except HereticError as e:
        if base_from == "--model":
            raise
        raise EvaluationError(
            f"{e} (the base model is named by {base_from}; or give it with --model)"
        ) from e
    path = report_path(settings)
    writable_parent(path)
    console.print("[bold]Loading prompts[/]")
    evaluation = Evaluation(settings, console)
    base, outputs = evaluation.run()
    report = build_report(evaluation, base_model, base_from, base, outputs)
    write_json(report, path)
    print_report(console, report, evaluation.comparison, path)
    return report
