"""Crash and resume with real SIGKILLs: during extraction, mid-trial and while saving.

Each test starts `python -m heretic.cli` on the tiny chat model with HERETIC_TEST_PAUSE_AT set,
waits until the process reports that it stopped at that point, kills it with SIGKILL (no
cleanup code runs), reruns the same command and checks that no finished trial was lost or
repeated, that the interrupted trial was failed and retried, that the directions file was
reused, and that the output folder never held a half-written model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from heretic.workers import FAIL_REASON_ATTR, RETRY_OF_ATTR, WORKER_ATTR

GOOD = [f"Tell me a fact about the number {i}." for i in range(24)]
BAD = [f"Explain how to steal item number {i} from a shop." for i in range(24)]

# Stops a run after the weights are in the temporary folder: before the tokenizer is (the
# middle of `export.save_model_folder`), or before the source's other files are copied (the
# shard-by-shard export), without a hook in heretic's own code.
SAVING_DRIVER = """
import sys
import transformers
import heretic.shard_export
from heretic.workers import pause_point
original = transformers.PreTrainedTokenizerBase.save_pretrained
def paused(self, *args, **kwargs):
    pause_point("saving")
    return original(self, *args, **kwargs)
transformers.PreTrainedTokenizerBase.save_pretrained = paused
copy_side_files = heretic.shard_export.copy_side_files
def paused_copy(*args, **kwargs):
    pause_point("saving")
    return copy_side_files(*args, **kwargs)
heretic.shard_export.copy_side_files = paused_copy
from heretic.cli import main
main(sys.argv[1:])
"""


@pytest.fixture
def prompt_files(tmp_path) -> dict[str, Path]:
    files = {}
    for name, lines in (("good", GOOD), ("bad", BAD)):
        path = tmp_path / f"{name}.txt"
        path.write_text("\n".join(lines) + "\n")
        files[name] = path
    return files


def heretic_argv(model: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model),
        "--good-prompts.dataset", str(files["good"]), "--good-prompts.split", "[:16]",
        "--bad-prompts.dataset", str(files["bad"]), "--bad-prompts.split", "[:16]",
        "--good-evaluation-prompts.dataset", str(files["good"]),
        "--good-evaluation-prompts.split", "[16:24]",
        "--bad-evaluation-prompts.dataset", str(files["bad"]),
        "--bad-evaluation-prompts.split", "[16:24]",
        "--max-response-length", "4",
        "--batch-size", "8",
        "--output-dir", str(out),
        *extra,
    ]  # fmt: skip


def _env(pause: str | None, resume: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("HERETIC_TEST_PAUSE_AT", None)
    for key in list(env):
        if key.startswith("HERETIC_") and key not in ("HERETIC_CACHE_DIR",):
            env.pop(key)
    if pause:
        env["HERETIC_TEST_PAUSE_AT"] = pause
    if resume:
        env["HERETIC_TEST_RESUME_FILE"] = str(resume)
    return env


class Worker:
    """A `heretic` subprocess whose stderr goes to a file (a pipe could fill and block it)."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        pause: str | None = None,
        driver: str | None = None,
        resume: Path | None = None,
    ) -> None:
        self.log = log
        command = [sys.executable, "-m", "heretic.cli"]
        if driver:
            command = [sys.executable, "-c", driver]
        self._log_file = open(log, "w")  # noqa: SIM115 - closed in wait/kill
        self.proc = subprocess.Popen(
            [*command, *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=_env(pause, resume),
            cwd=log.parent,
        )

    @property
    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise AssertionError(f"exited {code} before {text!r}:\n{self.output}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting for {text!r}:\n{self.output}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no finally blocks, no atexit, no flushing: what a crash or OOM kill does."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log_file.close()

    def wait(self, timeout: float = 300) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.kill()
            self._log_file.close()
        return code


def run_heretic(argv: list[str], log: Path) -> str:
    worker = Worker(argv, log)
    code = worker.wait()
    assert code == 0, worker.output
    return worker.output


def trials(out: Path, study_name: str = "heretic") -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    return optuna.load_study(study_name=study_name, storage=storage).trials


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def finished(out: Path) -> list[optuna.trial.FrozenTrial]:
    """Trials that count towards n_trials (scored, or pruned by the search)."""
    return [t for t in trials(out) if t.state in FINISHED]


def test_kill_during_extraction_then_rerun(tiny_chat_model, prompt_files, tmp_path):
    out = tmp_path / "out"
    argv = heretic_argv(tiny_chat_model, prompt_files, out, "--n-trials", "2", "--select", "none")
    worker = Worker(argv, tmp_path / "first.log", pause="extraction")
    worker.wait_for("paused at extraction")
    worker.kill()
    assert not (out / "directions.safetensors").exists(), "no directions from a killed run"
    assert not list(out.glob(".directions.safetensors.*"))

    output = run_heretic(argv, tmp_path / "second.log")
    assert "Saved refusal directions" in output
    assert (out / "directions.safetensors").is_file()
    assert len(finished(out)) == 2


def test_kill_mid_trial_retries_it_and_keeps_finished_ones(tiny_chat_model, prompt_files, tmp_path):
    out = tmp_path / "out"
    argv = heretic_argv(tiny_chat_model, prompt_files, out, "--n-trials", "4", "--select", "none")
    worker = Worker(argv, tmp_path / "first.log", pause="trial:3")
    worker.wait_for("paused at trial:3")
    worker.kill()

    before = trials(out)
    assert [t.state in FINISHED for t in before] == [True, True, False]
    assert before[2].state == TrialState.RUNNING
    assert before[2].user_attrs[WORKER_ATTR].split(":")[1] == str(worker.proc.pid)
    directions = out / "directions.safetensors"
    stamp = directions.stat().st_mtime_ns

    output = run_heretic(argv, tmp_path / "second.log")
    assert "Reusing refusal directions" in output
    assert "Trial 2 was interrupted" in output
    assert directions.stat().st_mtime_ns == stamp, "directions are reused, not recomputed"

    after = trials(out)
    for old, new in zip(before[:2], after[:2], strict=True):
        assert new.state == old.state
        assert (new.params, new.values, new.datetime_complete) == (
            old.params,
            old.values,
            old.datetime_complete,
        ), "finished trials are kept, not repeated"
    assert after[2].state == TrialState.FAIL
    assert "stopped while it was running" in after[2].user_attrs[FAIL_REASON_ATTR]
    done = [t for t in after if t.state in FINISHED]
    assert len(done) == 4
    retries = [t for t in done if t.user_attrs.get(RETRY_OF_ATTR) == 2]
    assert len(retries) == 1 and retries[0].params == before[2].params
    assert not [t for t in after if t.state == TrialState.RUNNING]


def test_kill_while_saving_keeps_the_previous_model(tiny_chat_model, prompt_files, tmp_path):
    out = tmp_path / "out"
    first = heretic_argv(tiny_chat_model, prompt_files, out, "--n-trials", "2", "--select", "0")
    run_heretic(first, tmp_path / "first.log")
    assert json.loads((out / "heretic_metadata.json").read_text())["trial_number"] == 0
    saved = sorted(p.name for p in (out / "model").iterdir())

    second = heretic_argv(tiny_chat_model, prompt_files, out, "--n-trials", "2", "--select", "1")
    worker = Worker(second, tmp_path / "second.log", pause="saving", driver=SAVING_DRIVER)
    worker.wait_for("paused at saving")
    worker.kill()
    # The half-written model is a hidden temporary; the saved one is untouched.
    assert list(out.glob(".model.*")), "the kill happened mid-save"
    assert sorted(p.name for p in (out / "model").iterdir()) == saved
    assert json.loads((out / "heretic_metadata.json").read_text())["trial_number"] == 0

    output = run_heretic(second, tmp_path / "third.log")
    assert "Removed what an interrupted run left" in output
    assert not list(out.glob(".model.*"))
    assert json.loads((out / "heretic_metadata.json").read_text())["trial_number"] == 1
    assert sorted(p.name for p in (out / "model").iterdir()) == saved
    assert len(trials(out)) == 2, "no trial is rerun for saving"
