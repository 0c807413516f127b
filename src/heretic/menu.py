"""The interactive menu after the search: pick a trial, then save / upload / chat / go back.

It only asks questions and calls `Finisher` methods, the same ones the headless flags use. The
questions go through an `Asker` (questionary on a terminal), so tests drive the menu with a
script of answers. A failed action (no token, disk full, ...) prints its message and returns to
the menu: the search results are never lost to a typo.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from heretic.errors import HereticError
from heretic.finish import Finisher, trial_choices
from heretic.optimization import objectives

MORE = "more"
QUIT = "quit"
SAVE, UPLOAD, CHAT, BENCHMARK, BACK = "save", "upload", "chat", "benchmark", "back"


class Asker(Protocol):
    """How the menu asks; every method returns None when the user cancels (Ctrl-C)."""

    def select(self, message: str, choices: Sequence[tuple[str, Any]]) -> Any: ...

    def text(self, message: str, default: str = "") -> str | None: ...

    def confirm(self, message: str, default: bool = False) -> bool | None: ...


class QuestionaryAsker:
    """Arrow-key menus on a terminal (questionary, built on prompt_toolkit)."""

    def select(self, message: str, choices: Sequence[tuple[str, Any]]) -> Any:
        import questionary

        options = [questionary.Choice(title=label, value=value) for label, value in choices]
        return questionary.select(message, choices=options).ask()

    def text(self, message: str, default: str = "") -> str | None:
        import questionary

        return questionary.text(message, default=default).ask()

    def confirm(self, message: str, default: bool = False) -> bool | None:
        import questionary

        return questionary.confirm(message, default=default).ask()


class ScriptedAsker:
    """Answers from a list, in order (tests, and `--select`-style automation of the menu)."""

    def __init__(self, answers: Sequence[Any]) -> None:
        self._answers: Iterator[Any] = iter(answers)
        self.questions: list[str] = []

    def _next(self, message: str) -> Any:
        self.questions.append(message)
        try:
            return next(self._answers)
        except StopIteration:
            return None

    def select(self, message: str, choices: Sequence[tuple[str, Any]]) -> Any:
        answer = self._next(message)
        values = [value for _, value in choices]
        if answer is not None and answer not in values:
            raise AssertionError(f"{answer!r} is not a choice of {message!r}: {values}")
        return answer

    def text(self, message: str, default: str = "") -> str | None:
        return self._next(message)

    def confirm(self, message: str, default: bool = False) -> bool | None:
        return self._next(message)


def run_menu(finisher: Finisher, asker: Asker | None = None, show_front=None) -> int | None:
    """Loop until the user quits; returns the number of the last saved trial (or None).

    `show_front()` prints the Pareto table (the CLI passes its rich table printer).
    """
    asker = asker or QuestionaryAsker()
    console = finisher.console
    while True:
        front = finisher.front()
        if show_front is not None:
            show_front(front)
        choices = [
            *trial_choices(front, finisher.n_bad),
            (f"Run more trials (the study has {finisher.n_finished()})", MORE),
            ("Quit", QUIT),
        ]
        picked = asker.select("Choose a trial (refusals, KL divergence, parameters)", choices)
        if picked is None or picked == QUIT:
            return finisher.saved_trial
        if picked == MORE:
            answer = asker.text("How many more trials?", "10")
            if answer is None:
                continue
            try:
                n = int(answer.strip())
            except ValueError:
                console.print(f"[red]Not a number:[/] {answer!r}", highlight=False)
                continue
            _guarded(console, lambda n=n: finisher.run_more(n))
            continue
        trial = next(t for t in front if t.number == picked)
        _trial_menu(finisher, asker, trial)


def _trial_menu(finisher: Finisher, asker: Asker, trial) -> None:
    console = finisher.console
    settings = finisher.settings
    while True:
        saved = " (saved)" if finisher.saved_trial == trial.number else ""
        action = asker.select(
            f"Trial {trial.number}{saved}: "
            f"{objectives(trial).refusals}/{finisher.n_bad} refusals, "
            f"KL {objectives(trial).kl_divergence:.4f}",
            [
                (f"Save to {settings.output_dir} ({', '.join(finisher.formats())})", SAVE),
                ("Upload to Hugging Face", UPLOAD),
                ("Chat with it", CHAT),
                ("Benchmark it against the original (lm-eval)", BENCHMARK),
                ("Back to the trials", BACK),
            ],
        )
        if action is None or action == BACK:
            return
        if action == SAVE:
            _guarded(console, lambda: finisher.save(trial))
        elif action == UPLOAD:
            repo_id = asker.text("Repository id (user/name)", settings.upload_repo_id or "")
            if not repo_id or not repo_id.strip():
                continue
            private = asker.confirm("Private repository?", settings.private)
            if private is None:
                continue
            repo_id = repo_id.strip()
            _guarded(
                console,
                lambda repo_id=repo_id, private=private: finisher.upload(trial, repo_id, private),
            )
        elif action == CHAT:
            _guarded(console, lambda: finisher.chat(trial))
        elif action == BENCHMARK:
            default = ",".join(settings.benchmarks) or "heretic_facts"
            answer = asker.text("lm-eval tasks, comma-separated (mmlu, gsm8k, ...)", default)
            names = [n.strip() for n in (answer or "").split(",") if n.strip()]
            if names:
                _guarded(console, lambda names=names: finisher.benchmark(trial, names))


def _guarded(console, action) -> bool:
    try:
        action()
        return True
    except HereticError as e:
        console.print(f"[bold red]Error:[/] {e}", highlight=False)
        return False
