"""The search phase: the study, the original model's scores, and the trials.

`Search` holds what every trial needs (model, edit hooks, evaluator, study) so that the menu's
"run more trials" continues the same search instead of calling back into the entry point.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.markup import escape

from heretic.abliteration import edit_from_params, first_edited_layer
from heretic.config import Settings
from heretic.evaluation import Evaluator, Score
from heretic.fingerprint import check_study_key, study_key
from heretic.judges import OPENING_TOKENS, AdaptiveJudge
from heretic.model import Model
from heretic.model_judge import scoring_judge
from heretic.optimization import (
    SearchSpace,
    best_trial,
    enqueue_warm_starts,
    finished_trials,
    model_family,
    objectives,
    open_study,
    pareto_front,
    run_search,
)
from heretic.placement import free_accelerator_bytes, layer_outputs_device
from heretic.progress import step_progress, tracked
from heretic.report import describe_trial
from heretic.workers import (
    exclusive_lock,
    pause_point,
    recover_stale_trials,
    wait_for_other_workers,
)


def open_checked_study(settings: Settings, console: Console):
    """Open (or create) the study, check it matches this run, and recover crashed trials."""
    storage = settings.resolved_storage()
    study = open_study(
        storage,
        settings.study_name,
        settings.seed,
        settings.resolved_startup_trials(),
        settings.heartbeat_interval,
    )
    forced = check_study_key(study, study_key(settings), settings.force)
    if forced:
        console.print(
            "[yellow]Warning:[/] --force: continuing a study created with other settings:\n  "
            + escape("\n  ".join(forced)),
            highlight=False,
        )
    for trial in recover_stale_trials(study):
        console.print(
            f"Trial {trial.number} was interrupted ({trial.user_attrs.get('heretic_fail_reason')})"
            ": marked failed, its parameters will be tried again",
            highlight=False,
        )
    return study


def layer_skip_budget(model_bytes: int) -> int:
    """Memory for the stored layer outputs that let KL passes skip unedited layers."""
    return min(2 * 2**30, max(256 * 2**20, model_bytes // 20))


def layer_skip_bytes(settings: Settings, model: Model) -> int:
    """The stored layer outputs' budget for this run (0: no layer skipping)."""
    # torch.compile would recompile for the replayed layers: no skipping with it.
    if not settings.skip_unedited_layers or settings.compile:
        return 0
    return layer_skip_budget(model.nbytes)


def layer_outputs_store(settings: Settings, model: Model) -> torch.device | None:
    """Where the stored layer outputs will live (see `placement.layer_outputs_device`; None:
    with each layer); decided once, before the batch size, which must leave room for them on
    an accelerator."""
    return layer_outputs_device(
        settings.layer_outputs_device,
        model.device,
        layer_skip_bytes(settings, model),
        free_accelerator_bytes(model.device),
    )


def score_original(
    settings: Settings,
    model: Model,
    prompts: dict,
    batch_size: int,
    console: Console,
    store: torch.device | None = None,
) -> Evaluator:
    """The original model's responses, refusals and first-token log-probs, which every trial
    is compared with; with the adaptive judge, the judge learned from them."""
    console.print("[bold]Scoring the original model[/]")
    judge = scoring_judge(settings, log=lambda line: console.print(f"  {line}", highlight=False))
    n_scored = len(prompts["good_evaluation_prompts"]) + len(prompts["bad_evaluation_prompts"])
    with step_progress(console) as progress:
        scoring = progress.add_task("Original model", total=n_scored, info="", unit="prompts")
        evaluator = Evaluator(
            model,
            prompts["good_evaluation_prompts"],
            prompts["bad_evaluation_prompts"],
            judge,
            settings.max_response_length,
            batch_size,
            screening_tokens=settings.screening_tokens if settings.prune_dominated_trials else 0,
            layer_skip_bytes=layer_skip_bytes(settings, model),
            log=lambda line: console.print(f"  {line}", highlight=False),
            progress=lambda n: progress.advance(scoring, n),
            layer_outputs_store=store,
            refusal_openings=settings.refusal_openings,
            skip_refused_good=settings.kl_skip_refused_good,
        )
    n_bad = len(evaluator.bad_prompts)
    if settings.refusal_judge == "adaptive":
        console.print(f"  refusals by markers: {evaluator.base_refusals}/{n_bad}")
        learning = time.perf_counter()
        evaluator.use_judge(
            _adaptive_judge(settings, model, prompts, evaluator, batch_size, console)
        )
        phrases = evaluator.judge.phrases
        shown = ", ".join(repr(p) for p in phrases[:6]) + (" ..." if len(phrases) > 6 else "")
        console.print(
            f"  adaptive judge: {len(phrases)} refusal phrases learned in "
            f"{time.perf_counter() - learning:.0f} s {shown}".rstrip()
        )
    console.print(f"  refusals: {evaluator.base_refusals}/{n_bad}")
    if evaluator.base_unanswered:
        console.print(
            f"  [yellow]{evaluator.base_unanswered} of them never finished thinking within "
            f"max_thinking_tokens ({settings.max_thinking_tokens})[/]: counted as refusals; "
            "raise max_thinking_tokens, or skip the thinking (enable_thinking = false, or a "
            "response_prefix that closes it)"
        )
    return evaluator


def _adaptive_judge(
    settings: Settings,
    model: Model,
    prompts: dict,
    evaluator: Evaluator,
    batch_size: int,
    console: Console,
) -> AdaptiveJudge:
    """Learn the original model's refusal phrases from its responses to the bad evaluation
    prompts (already generated) and to the good evaluation prompts (their openings only)."""
    good = prompts["good_evaluation_prompts"]
    chunks = model.generate_chunks(good, OPENING_TOKENS, batch_size)
    good_responses = tracked(console, "Learning the judge: good openings", good, chunks)
    return AdaptiveJudge.fit(
        settings.refusal_markers,
        evaluator.bad_prompts,
        evaluator.base_responses,
        good,
        good_responses,
        ignore_echoed=settings.ignore_echoed_markers,
    )


class Search:
    """The trials of one study on one model; `run` is called again for "run more trials"."""

    def __init__(
        self, settings: Settings, study, model: Model, hooks, evaluator: Evaluator, console
    ) -> None:
        self.settings = settings
        self.study = study
        self.model = model
        self.hooks = hooks
        self.evaluator = evaluator
        self.console = console
        self.started_here = 0

    def run(self, n_trials: int) -> None:
        """Run trials until the study holds `n_trials` finished ones (resuming where it is),
        then wait for other workers' trials in flight."""
        done = len(finished_trials(self.study))
        remaining = max(0, n_trials - done)
        if done:
            self.console.print(
                f"[bold]Resuming[/] study '{self.settings.study_name}': {done} trials finished"
            )
        if remaining == 0:
            return
        storage = self.settings.resolved_storage()
        self.console.print(f"[bold]Searching[/]: {remaining} trials ({storage})")
        space = SearchSpace(
            self.settings.min_weight,
            self.settings.max_weight,
            self.settings.search_space,
            self.settings.direction_scope,
            self.model.n_layers,
        )
        if self.settings.use_warm_start_params:
            self._warm_start(space)
        with step_progress(self.console) as progress:
            self._trials(progress, n_trials, done, space)
        wait_for_other_workers(
            self.study,
            lambda n: self.console.print(f"Waiting for {n} trials of other workers to finish"),
        )

    def _warm_start(self, space: SearchSpace) -> None:
        family = model_family(self.model.config)
        # Workers sharing this folder start together: one queues, the others then see the
        # queued trials and add none (on separate machines a profile may run twice).
        with exclusive_lock(self.settings.output_dir / ".warm_start.lock"):
            queued = enqueue_warm_starts(self.study, space, family)
        if queued:
            self.console.print(f"  warm start: {len(queued)} known-good trials for {family} models")

    def _trials(self, progress, n_trials: int, done: int, space: SearchSpace) -> None:
        settings, evaluator = self.settings, self.evaluator
        n_eval = len(evaluator.good_prompts) + len(evaluator.bad_prompts)
        task = progress.add_task("Trials", total=n_trials, completed=done, info="", unit="trials")
        trial_task = progress.add_task(
            "Trial", total=n_eval, info="", visible=False, unit="prompts scored"
        )

        def score(params, dominated) -> Score:
            self.started_here += 1
            pause_point("trial", self.started_here)
            progress.reset(trial_task, total=n_eval, visible=True)
            strengths, trial_directions = edit_from_params(params, self.hooks.directions)
            self.hooks.set_strengths(strengths, trial_directions)
            try:
                return evaluator.score(
                    dominated if settings.prune_dominated_trials else None,
                    settings.kl_prune_threshold or None,
                    progress=lambda n: progress.advance(trial_task, n),
                    first_edited_layer=first_edited_layer(strengths),
                )
            finally:
                self.hooks.clear()

        def on_trial(trial, n_finished):
            front = pareto_front(self.study)
            best = best_trial(front, evaluator.base_refusals) if front else None
            best_text = (
                f"best: trial {best.number}, {objectives(best).refusals} refusals, "
                f"KL {objectives(best).kl_divergence:.3f}"
                if best
                else "best: none yet"
            )
            progress.update(task, completed=n_finished, info=best_text)
            progress.update(trial_task, visible=False)
            if not self.console.is_terminal or settings.verbose:
                self.console.print(
                    f"  trial {trial.number}: {describe_trial(trial)}", highlight=False
                )

        run_search(self.study, n_trials, space, score, on_trial, evaluator.base_refusals)
