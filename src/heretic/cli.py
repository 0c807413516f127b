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

from heretic.checks import overlap_warnings
from heretic.config import Settings, load_settings
from heretic.confirmation import choose_best, print_front, print_report, start_confirmation
from heretic.errors import HereticError, SettingsError
from heretic.extraction import obtain_directions
from heretic.finish import Finisher
from heretic.holdout import hold_out, sets_to_load
from heretic.loading import load_configured
from heretic.model import Model
from heretic.optimization import (
    KL_ATTR,
    REFUSALS_ATTR,
    pareto_front,
    trial_by_number,
)
from heretic.placement import batch_size_reserve
from heretic.preflight import check_local_inputs, load_prompt_sets
from heretic.refinements import extra_prompt_sets
from heretic.report import front_table
from heretic.reset import editable_matrices, make_edit
from heretic.search import (
    Search,
    layer_outputs_store,
    layer_skip_bytes,
    open_checked_study,
    score_original,
)
from heretic.workers import OutputDirLease, prepare_output_dir

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
    check_local_inputs(settings)  # before the hub is asked for anything
    prompts, after_search = _prompts(settings, console)
    # Before the model loads: an unreachable storage or a study made with other settings
    # should cost the user seconds, not the minutes of loading a large model.
    study = open_checked_study(settings, console)
    model, batch_size, store = _model(settings, prompts, console)
    directions, readouts = obtain_directions(model, prompts, settings, batch_size, console)
    hooks = make_edit(
        settings.reset_strategy,
        model.sites,
        directions,
        model_bytes=model.nbytes,
        read_matrices=lambda: editable_matrices(
            load_configured(
                settings, device_map="cpu", dtype=str(model.dtype).removeprefix("torch.")
            ).sites
        ),
        log=lambda line: console.print(f"  {line}", highlight=False),
        row_normalization=settings.row_normalization,
        readouts=readouts,
    )
    if settings.compile:
        console.print("  compiling the model (torch.compile): the first passes are slow")
        model.compile()
    evaluator = score_original(settings, model, prompts, batch_size, console, store)
    search = Search(settings, study, model, hooks, evaluator, console)
    search.run(settings.n_trials)
    if not pareto_front(study):
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
        search_more=search.run,
        prompts=prompts,
        batch_size=batch_size,
        confirmation=confirmation,
    )
    result = _finish(settings, console, finisher)
    hooks.remove()
    result.seconds = time.perf_counter() - started
    return result


def _prompts(settings: Settings, console: Console):
    """The prompt sets the search uses, and the held-out sets scored after it."""
    console.print("[bold]Loading prompts[/]")
    # The refinements' prompt sets load only when they are on and directions are computed.
    extra_sets = () if settings.directions is not None else extra_prompt_sets(settings)
    prompts = load_prompt_sets(settings, PROMPT_SETS + extra_sets + sets_to_load(settings))
    prompts, after_search = hold_out(settings, prompts, lambda line: console.print(f"  {line}"))
    for name, values in prompts.items():
        console.print(f"  {name}: {len(values)} prompts")
    for line in overlap_warnings(prompts):
        console.print(f"[yellow]Warning:[/] {escape(line)}", highlight=False)
    return prompts, after_search


def _model(
    settings: Settings, prompts: dict, console: Console
) -> tuple[Model, int, torch.device | None]:
    """The model to search on, the batch size (found automatically for batch_size 0, leaving
    room for the stored layer outputs) and where those are kept."""
    console.print(f"[bold]Loading model[/] {settings.model}")
    model = load_configured(settings, log=lambda line: console.print(f"  {line}", highlight=False))
    console.print(
        f"  {model.architecture}: {model.n_layers} layers, hidden size "
        f"{model.hidden_size}, {model.dtype} on {model.device}"
    )
    store = layer_outputs_store(settings, model)
    batch_size = settings.batch_size
    if batch_size == 0:
        reserve = batch_size_reserve(store, layer_skip_bytes(settings, model))
        batch_size = model.find_batch_size(
            prompts["bad_evaluation_prompts"], settings.max_batch_size, reserve
        )
        console.print(f"  automatic batch size: {batch_size}")
    return model, batch_size, store


def _finish(settings: Settings, console: Console, finisher: Finisher) -> RunResult:
    """The menu on a terminal, else the headless choice; the run's closing line."""
    study, evaluator = finisher.study, finisher.evaluator
    n_bad = len(evaluator.bad_prompts)
    finisher.plot_pareto(None)
    if _interactive(settings):
        from heretic.menu import run_menu

        def show_front(f) -> None:
            console.print(front_table(f, evaluator.base_refusals, n_bad))
            print_front(console, finisher.confirmation, f, n_bad)

        saved = run_menu(finisher, show_front=show_front)
        chosen = None if saved is None else trial_by_number(study, saved)
    else:
        front = pareto_front(study)
        console.print(front_table(front, evaluator.base_refusals, n_bad))
        print_front(console, finisher.confirmation, front, n_bad)
        chosen = _choose(
            settings, console, front, study, evaluator.base_refusals, finisher.confirmation
        )
        if chosen is not None:
            finisher.headless(chosen)
    result = RunResult(
        base_refusals=evaluator.base_refusals,
        n_bad_evaluation_prompts=n_bad,
        chosen_trial=None,
        kl_divergence=None,
        refusals=None,
        output_dir=settings.output_dir,
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
    return result


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


def subcommand_argv(argv: list[str]) -> list[str]:
    """`heretic evaluate PATH ...` is `heretic --evaluate-model PATH ...`."""
    if not argv or argv[0] != "evaluate":
        return argv
    rest = argv[1:]
    if rest and not rest[0].startswith("-"):
        return ["--evaluate-model", rest[0], *rest[1:]]
    if "--evaluate-model" not in rest and not any(a.startswith("--evaluate-model=") for a in rest):
        raise SettingsError("heretic evaluate: name the model to evaluate (heretic evaluate PATH).")
    return rest


def main(argv: list[str] | None = None) -> None:
    console = Console(stderr=True)
    try:
        settings = load_settings(subcommand_argv(list(sys.argv[1:] if argv is None else argv)))
        if settings.evaluate_model:
            from heretic.evaluate import evaluate

            evaluate(settings, console)
        else:
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
