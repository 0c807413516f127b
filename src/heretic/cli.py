"""Entry point: settings -> prompts -> directions -> search -> Pareto front -> export."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from heretic.abliteration import describe_params, edit_from_params, first_edited_layer
from heretic.checks import overlap_warnings
from heretic.config import Settings, load_settings
from heretic.confirmation import choose_best, print_front, print_report, start_confirmation
from heretic.directions import (
    DIRECTIONS_FILE,
    check_directions_shape,
    fit_readouts,
    load_direction_extras,
    load_directions,
    save_directions,
)
from heretic.errors import HereticError
from heretic.evaluation import Evaluator, Score
from heretic.fingerprint import (
    check_study_key,
    directions_differences,
    directions_metadata,
    study_key,
)
from heretic.finish import Finisher
from heretic.holdout import hold_out, sets_to_load
from heretic.judges import OPENING_TOKENS, AdaptiveJudge, MarkerJudge
from heretic.loading import load_model
from heretic.model import Model
from heretic.optimization import (
    KL_ATTR,
    PRUNED_ATTR,
    REFUSALS_ATTR,
    UNANSWERED_ATTR,
    SearchSpace,
    best_trial,
    did_nothing,
    enqueue_warm_starts,
    finished_trials,
    model_family,
    objectives,
    open_study,
    params_from_trial,
    pareto_front,
    run_search,
    trial_by_number,
)
from heretic.preflight import check_local_inputs, load_prompt_sets
from heretic.progress import step_progress, tracked
from heretic.refinements import (
    READOUTS_KEY,
    DirectionSet,
    build_directions,
    extra_prompt_sets,
)
from heretic.reset import editable_matrices, make_edit
from heretic.sites import COMPONENTS
from heretic.workers import (
    OutputDirLease,
    exclusive_lock,
    pause_point,
    prepare_output_dir,
    recover_stale_trials,
    wait_for_other_workers,
)

PROMPT_SETS = ("good_prompts", "bad_prompts", "good_evaluation_prompts", "bad_evaluation_prompts")


@dataclass
class RunResult:
    base_refusals: int
    n_bad_evaluation_prompts: int
    chosen_trial: int | None
    kl_divergence: float | None
    refusals: int | None
    output_dir: Path
    seconds: float
    figures: dict | None = None
    """The chosen trial's metadata, with its figures in the search and held out."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def front_table(front, base_refusals: int, n_bad: int) -> Table:
    table = Table(title="Pareto front (KL divergence vs refusals)")
    table.add_column("trial", justify="right")
    table.add_column("refusals", justify="right")
    table.add_column("KL divergence", justify="right")
    table.add_column("parameters")
    for t in front:
        text = describe_params(params_from_trial(t))
        score = objectives(t)
        refusals = f"{score.refusals}/{n_bad}{unanswered_note(t)}"
        if did_nothing(t, base_refusals):
            refusals += " (did nothing)"
        table.add_row(str(t.number), refusals, f"{score.kl_divergence:.4f}", text)
    table.caption = (
        f"base model: {base_refusals}/{n_bad} refusals, KL 0; 'did nothing': above 90% of "
        "the base refusals, never chosen by --select best while another point exists"
    )
    return table


def run(settings: Settings, console: Console | None = None) -> RunResult:
    """The whole pipeline, holding a shared lease on the output folder (see `workers`)."""
    console = console or Console(stderr=True)
    prepare_output_dir(settings.output_dir)
    with OutputDirLease(settings.output_dir) as lease:
        if lease.cleaned:
            console.print(
                f"Removed what an interrupted run left in {settings.output_dir}: "
                + ", ".join(lease.cleaned)
            )
        return _run(settings, console)


def _run(settings: Settings, console: Console) -> RunResult:
    started = time.perf_counter()
    seed_everything(settings.seed)
    output_dir = settings.output_dir

    check_local_inputs(settings)  # before the hub is asked for anything
    console.print("[bold]Loading prompts[/]")
    # The refinements' prompt sets load only when they are on and directions are computed.
    extra_sets = () if settings.directions is not None else extra_prompt_sets(settings)
    prompts = load_prompt_sets(settings, PROMPT_SETS + extra_sets + sets_to_load(settings))
    prompts, after_search = hold_out(settings, prompts, lambda line: console.print(f"  {line}"))
    for name, values in prompts.items():
        console.print(f"  {name}: {len(values)} prompts")
    for line in overlap_warnings(prompts):
        console.print(f"[yellow]Warning:[/] {escape(line)}", highlight=False)

    # Before the model loads: an unreachable storage or a study made with other settings
    # should cost the user seconds, not the minutes of loading a large model.
    study = _open_study(settings, console)

    console.print(f"[bold]Loading model[/] {settings.model}")
    model = _load(settings, log=lambda line: console.print(f"  {line}", highlight=False))
    console.print(
        f"  {type(model.model).__name__}: {model.n_layers} layers, hidden size "
        f"{model.hidden_size}, {model.model.dtype} on {model.device}"
    )

    batch_size = settings.batch_size
    if batch_size == 0:
        batch_size = model.find_batch_size(
            prompts["bad_evaluation_prompts"], settings.max_batch_size
        )
        console.print(f"  automatic batch size: {batch_size}")

    directions, readouts = _directions(model, prompts, settings, batch_size, console)
    hooks = make_edit(
        settings.reset_strategy,
        model.sites,
        directions,
        model_bytes=model.nbytes,
        read_matrices=lambda: editable_matrices(
            _load(settings, "cpu", dtype=str(model.model.dtype).removeprefix("torch.")).sites
        ),
        log=lambda line: console.print(f"  {line}", highlight=False),
        row_normalization=settings.row_normalization,
        readouts=readouts,
    )
    if settings.compile:
        console.print("  compiling the model (torch.compile): the first passes are slow")
        model.compile()

    console.print("[bold]Scoring the original model[/]")
    judge = MarkerJudge(tuple(settings.refusal_markers), settings.ignore_echoed_markers)
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
            # torch.compile would recompile for the replayed layers: no skipping with it.
            layer_skip_bytes=layer_skip_budget(model.nbytes)
            if settings.skip_unedited_layers and not settings.compile
            else 0,
            log=lambda line: console.print(f"  {line}", highlight=False),
            progress=lambda n: progress.advance(scoring, n),
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

    study = _search(settings, study, model, hooks, evaluator, console)
    front = pareto_front(study)
    if not front:
        raise HereticError("The study has no finished trials, so there is nothing to choose.")
    confirmation = start_confirmation(
        settings, console, model, hooks, evaluator, after_search, batch_size
    )
    finisher = Finisher(
        settings=settings,
        console=console,
        model=model,
        hooks=hooks,
        directions=directions,
        evaluator=evaluator,
        study=study,
        search_more=lambda total: _search(
            settings.model_copy(update={"n_trials": total}),
            study,
            model,
            hooks,
            evaluator,
            console,
        ),
        prompts=prompts,
        batch_size=batch_size,
        confirmation=confirmation,
    )
    finisher.plot_pareto(None)
    if _interactive(settings):
        from heretic.menu import run_menu

        def show_front(f) -> None:
            console.print(front_table(f, evaluator.base_refusals, n_bad))
            print_front(console, confirmation, f, n_bad)

        saved = run_menu(finisher, show_front=show_front)
        chosen = None if saved is None else trial_by_number(study, saved)
    else:
        console.print(front_table(front, evaluator.base_refusals, n_bad))
        print_front(console, confirmation, front, n_bad)
        chosen = _choose(settings, console, front, study, evaluator.base_refusals, confirmation)
        if chosen is not None:
            finisher.headless(chosen)
    result = RunResult(
        base_refusals=evaluator.base_refusals,
        n_bad_evaluation_prompts=n_bad,
        chosen_trial=None,
        kl_divergence=None,
        refusals=None,
        output_dir=output_dir,
        seconds=0.0,
    )
    if chosen is not None:
        result.chosen_trial = chosen.number
        result.kl_divergence = chosen.user_attrs[KL_ATTR]
        result.refusals = chosen.user_attrs[REFUSALS_ATTR]
        where = ", ".join(str(p) for p in finisher.saved_paths) or "not saved (--no-save)"
        console.print(
            f"[bold green]Refusals {evaluator.base_refusals}/{n_bad} -> "
            f"{result.refusals}/{n_bad}, KL divergence {result.kl_divergence:.4f}[/] "
            f"(trial {chosen.number}); {where}"
        )
        result.figures = finisher.metadata(chosen)
        print_report(console, result.figures, chosen.number)
    hooks.remove()
    result.seconds = time.perf_counter() - started
    return result


def layer_skip_budget(model_bytes: int) -> int:
    """Memory for the stored layer outputs that let KL passes skip unedited layers."""
    return min(2 * 2**30, max(256 * 2**20, model_bytes // 20))


def _load(
    settings: Settings, device_map: str | None = None, dtype: str | None = None, log=None
) -> Model:
    """The model as the settings describe it; with `dtype`, a copy to read weights from (in
    the dtype the search model runs in, with no logits check)."""
    return load_model(
        settings.model,
        gguf_file=settings.gguf_file,
        dtype=dtype or settings.dtype,
        device_map=device_map or settings.device_map,
        trust_remote_code=settings.trust_remote_code,
        system_prompt=settings.system_prompt,
        reasoning=settings.reasoning(),
        log=log,
        check_logits=dtype is None,
    )


def _directions(
    model: Model, prompts: dict, settings: Settings, batch_size: int, console: Console
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refusal directions and, with readout 'fitted', the fitted readouts (else None): from
    --directions, reused from the output folder, or computed.

    Computed directions are saved to OUTPUT_DIR/directions.safetensors (atomically) with the
    model's shape and the directions key (`fingerprint.directions_key`); a rerun or another
    worker with the same key loads them instead of extracting again. An exclusive lock on the
    output folder makes local workers that start together compute them once: the others wait,
    then load the file.
    """
    given = settings.directions is not None
    metadata = directions_metadata(settings, prompts, model.n_layers, model.hidden_size, given)
    if settings.directions is not None:
        directions, stored = load_directions(settings.directions)
        check_directions_shape(
            settings.directions, directions, stored, model.n_layers, model.hidden_size
        )
        for line in directions_differences(stored, metadata, given_file=True):
            console.print(f"[yellow]Warning:[/] --directions {escape(line)}", highlight=False)
        console.print(f"Using refusal directions from {settings.directions}")
        return directions, _stored_readouts(settings.directions, settings)

    path = settings.output_dir / DIRECTIONS_FILE
    lock = settings.output_dir / ".directions.lock"
    with exclusive_lock(lock, lambda: console.print("Waiting for another worker's directions")):
        if path.exists():
            directions, stored = load_directions(path)
            check_directions_shape(path, directions, stored, model.n_layers, model.hidden_size)
            differences = directions_differences(stored, metadata)
            if not differences:
                console.print(f"Reusing refusal directions from {path}")
                return directions, _stored_readouts(path, settings)
            console.print(
                escape(
                    f"{path} was made with other settings ({'; '.join(differences)}): recomputing"
                ),
                highlight=False,
            )
        direction_set = _compute_directions(model, prompts, settings, batch_size, console)
        save_directions(path, direction_set.refusal, metadata, direction_set.extra_tensors())
        console.print(f"Saved refusal directions to {path}")
        return direction_set.refusal, direction_set.readouts


def _stored_readouts(path: Path, settings: Settings) -> torch.Tensor | None:
    """The fitted readouts saved in a directions file, when readout 'fitted' needs them."""
    if settings.readout != "fitted":
        return None
    readouts = load_direction_extras(path).get(READOUTS_KEY)
    if readouts is None:
        raise HereticError(
            f"Directions file {path} holds no fitted readouts, which readout 'fitted' needs: "
            "let heretic compute the directions (drop --directions) or set readout to "
            "'direction'."
        )
    return readouts


def _compute_directions(
    model: Model, prompts: dict, settings: Settings, batch_size: int, console: Console
) -> DirectionSet:
    """Residuals of the direction prompts -> refusal directions, refined as configured."""

    fitted = settings.readout == "fitted"
    module_outputs: dict[str, torch.Tensor] = {}

    def residuals_of(name: str, with_module_outputs: bool = False) -> torch.Tensor:
        with step_progress(console) as progress:
            task = progress.add_task(
                f"Residuals for {name}", total=len(prompts[name]), info="", unit="prompts"
            )

            def advance(n: int) -> None:
                progress.advance(task, n)

            if with_module_outputs:
                residuals, module_outputs[name] = model.residuals_and_module_outputs(
                    prompts[name], batch_size, advance
                )
            else:
                residuals = model.residuals(prompts[name], batch_size, advance)
        pause_point("extraction")
        if not torch.isfinite(residuals).all():
            raise HereticError(
                "The model produced NaN/inf activations: try --dtype float32 (or bfloat16)."
            )
        return residuals

    def refused() -> list[bool]:
        judge = MarkerJudge(tuple(settings.refusal_markers), settings.ignore_echoed_markers)
        console.print(
            f"  generating the original model's responses to the bad prompts "
            f"({settings.probe_response_length} tokens) to label the probes"
        )
        bad = prompts["bad_prompts"]
        length = settings.probe_response_length
        chunks = model.refused_chunks(bad, length, batch_size, judge.is_refusal)
        return tracked(console, "Responses for the probes", bad, chunks)

    good = residuals_of("good_prompts", fitted)
    bad = residuals_of("bad_prompts", fitted)
    result = build_directions(
        good,
        bad,
        settings,
        residuals_of,
        refused,
        log=lambda line: console.print(f"  {escape(line)}", highlight=False),
        warn=lambda line: console.print(f"[yellow]Warning:[/] {escape(line)}", highlight=False),
    )
    if fitted:
        result.readouts = fit_readouts(
            module_outputs["good_prompts"],
            module_outputs["bad_prompts"],
            result.refusal,
            settings.readout_ridge,
        )
        console.print(
            f"  fitted {model.n_layers * len(COMPONENTS)} readouts (ridge {settings.readout_ridge})"
        )
    return result


def _open_study(settings: Settings, console: Console):
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


def _search(settings: Settings, study, model: Model, hooks, evaluator: Evaluator, console: Console):
    storage = settings.resolved_storage()
    done = len(finished_trials(study))
    remaining = max(0, settings.n_trials - done)
    if done:
        console.print(f"[bold]Resuming[/] study '{settings.study_name}': {done} trials finished")
    if remaining == 0:
        return study
    console.print(f"[bold]Searching[/]: {remaining} trials ({storage})")
    space = SearchSpace(
        settings.min_weight,
        settings.max_weight,
        settings.search_space,
        settings.direction_scope,
        model.n_layers,
    )
    if settings.use_warm_start_params:
        family = model_family(model.model.config)
        # Workers sharing this folder start together: one queues, the others then see the
        # queued trials and add none (on separate machines a profile may run twice).
        with exclusive_lock(settings.output_dir / ".warm_start.lock"):
            queued = enqueue_warm_starts(study, space, family)
        if queued:
            console.print(f"  warm start: {len(queued)} known-good trials for {family} models")

    started_here = 0
    n_eval = len(evaluator.good_prompts) + len(evaluator.bad_prompts)

    with step_progress(console) as progress:
        task = progress.add_task(
            "Trials", total=settings.n_trials, completed=done, info="", unit="trials"
        )
        trial_task = progress.add_task(
            "Trial", total=n_eval, info="", visible=False, unit="prompts scored"
        )

        def score(params, dominated) -> Score:
            nonlocal started_here
            started_here += 1
            pause_point("trial", started_here)
            progress.reset(trial_task, total=n_eval, visible=True)
            strengths, trial_directions = edit_from_params(params, hooks.directions)
            hooks.set_strengths(strengths, trial_directions)
            try:
                return evaluator.score(
                    dominated if settings.prune_dominated_trials else None,
                    settings.kl_prune_threshold or None,
                    progress=lambda n: progress.advance(trial_task, n),
                    first_edited_layer=first_edited_layer(strengths),
                )
            finally:
                hooks.clear()

        def on_trial(trial, n_finished):
            line = describe_trial(trial)
            front = pareto_front(study)
            best = best_trial(front, evaluator.base_refusals) if front else None
            best_text = (
                f"best: trial {best.number}, {objectives(best).refusals} refusals, "
                f"KL {objectives(best).kl_divergence:.3f}"
                if best
                else "best: none yet"
            )
            progress.update(task, completed=n_finished, info=best_text)
            progress.update(trial_task, visible=False)
            if not console.is_terminal or settings.verbose:
                console.print(f"  trial {trial.number}: {line}", highlight=False)

        run_search(study, settings.n_trials, space, score, on_trial, evaluator.base_refusals)
    wait_for_other_workers(
        study, lambda n: console.print(f"Waiting for {n} trials of other workers to finish")
    )
    return study


def describe_trial(trial) -> str:
    """One line for a finished trial; a pruned trial shows its refusal lower bound."""
    kl = trial.user_attrs.get(KL_ATTR, float("nan"))
    refusals = trial.user_attrs.get(REFUSALS_ATTR, 0)
    pruned = trial.user_attrs.get(PRUNED_ATTR)
    if pruned:
        return f"pruned ({pruned}): refusals >= {refusals}, KL {kl:.4f}"
    return f"refusals {refusals}{unanswered_note(trial)}, KL {kl:.4f}"


def unanswered_note(trial) -> str:
    """ " (k unanswered)" for a trial whose refusals include responses still thinking at the
    cap (reasoning models), so they are never mistaken for plain refusals; else ""."""
    unanswered = trial.user_attrs.get(UNANSWERED_ATTR, 0)
    return f" ({unanswered} unanswered: still thinking)" if unanswered else ""


def _interactive(settings: Settings) -> bool:
    """The menu runs for --select ask on a terminal; anything else is headless."""
    return settings.select == "ask" and sys.stdin.isatty() and sys.stdout.isatty()


def _choose(
    settings: Settings, console: Console, front, study, base_refusals: int, confirmation=None
):
    """The headless twin of the menu's trial choice."""
    select = settings.select
    if select == "ask":
        console.print("Not on a terminal: choosing the best trial (use --select to choose).")
        select = "best"
    if select == "none":
        return None
    if select == "best":
        return choose_best(front, base_refusals, confirmation, settings.select_best_on)
    return trial_by_number(study, int(select))


def main(argv: list[str] | None = None) -> None:
    console = Console(stderr=True)
    try:
        settings = load_settings(argv)
        run(settings, console)
    except HereticError as e:
        # Messages quote user input such as splits ("[a:b]"): print them as text, not markup.
        console.print(f"[bold red]Error:[/] {escape(str(e))}", highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("Interrupted: finished trials are kept in the study; rerun to resume.")
        sys.exit(130)


if __name__ == "__main__":
    main()
