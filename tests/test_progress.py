"""Progress inside long steps: bars on a terminal, plain lines without one."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from test_robustness import heretic_argv

from heretic import cli, progress
from heretic.progress import PlainProgress, step_progress, tracked


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain(interval: float = 30.0) -> tuple[PlainProgress, io.StringIO, Clock]:
    out = io.StringIO()
    clock = Clock()
    console = Console(file=out, width=200, force_terminal=False)
    return PlainProgress(console, interval, clock), out, clock


def test_a_line_every_interval_and_a_closing_line_for_a_long_task():
    bar, out, clock = plain()
    task = bar.add_task("Residuals for bad_prompts", total=400, info="", unit="prompts")
    clock.now = 10
    bar.advance(task, 100)
    assert out.getvalue() == ""  # nothing before the interval
    clock.now = 35
    bar.advance(task, 100)
    assert out.getvalue().splitlines() == [
        "  Residuals for bad_prompts: 200/400 prompts, 35 s, about 35 s left"
    ]
    clock.now = 50
    bar.advance(task, 200)  # finished 15 s after the last line: closes, the task ran 50 s
    assert out.getvalue().splitlines()[-1] == "  Residuals for bad_prompts: 400/400 prompts, 50 s"


def test_a_short_task_finishes_silently():
    bar, out, clock = plain()
    task = bar.add_task("Learning the judge", total=8, info="", unit="prompts")
    clock.now = 3
    bar.advance(task, 8)
    assert out.getvalue() == ""


def test_hidden_tasks_and_resets_like_a_trial():
    bar, out, clock = plain(interval=5)
    trial = bar.add_task("Trial", total=200, info="", visible=False, unit="prompts scored")
    clock.now = 10
    bar.advance(trial, 100)
    assert out.getvalue() == ""  # hidden between trials
    bar.reset(trial, total=200, visible=True)
    clock.now = 16
    bar.advance(trial, 50)
    bar.update(trial, completed=60, info="best: trial 3")
    assert out.getvalue().splitlines() == ["  Trial: 50/200 prompts scored, 6 s, about 18 s left"]
    clock.now = 30
    bar.update(trial, completed=70)
    assert out.getvalue().splitlines()[-1].endswith("best: trial 3")


def test_bars_on_a_terminal_lines_elsewhere():
    assert isinstance(step_progress(Console(file=io.StringIO(), force_terminal=True)), Progress)
    assert isinstance(
        step_progress(Console(file=io.StringIO(), force_terminal=False)), PlainProgress
    )


def test_tracked_keeps_the_order_of_the_chunks():
    console = Console(file=io.StringIO(), force_terminal=False)
    assert tracked(console, "x", ["a", "b", "c"], iter([["A", "B"], ["C"]])) == ["A", "B", "C"]


def test_a_headless_run_shows_progress_inside_every_long_step(
    tmp_path, monkeypatch, capsys, tiny_chat_model
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    files = {}
    for name in ("good", "bad"):
        files[name] = Path(tmp_path / f"{name}.txt")
        files[name].write_text("\n".join(f"{name} prompt number {i}." for i in range(24)) + "\n")
    args = heretic_argv(tiny_chat_model, files, tmp_path / "out", "--n-trials", "2")
    cli.main(
        [*args, "--select", "none", "--use-supervised-probing", "--probe-response-length", "8"]
    )
    err = " ".join(capsys.readouterr().err.split())
    for line in (
        "Residuals for good_prompts: 16/16 prompts",
        "Residuals for bad_prompts: 16/16 prompts",
        "Responses for the probes: 16/16 prompts",
        # Two good and two bad evaluation prompts (of 8) are held out for the confirmation.
        "held out for the confirmation: 2 bad prompts",
        "Original model: 12/12 prompts",
        "Learning the judge: good openings: 6/6 prompts",
        "Trial: 12/12 prompts scored",
        "Trials: 2/2 trials",
    ):
        assert line in err, line
