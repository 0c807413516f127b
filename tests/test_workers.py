"""Several workers on one study: SQLite on one machine, PostgreSQL for several; stale trials.

The PostgreSQL test needs a server: `.ci/run` starts one on loopback (scripts/with-postgres.sh)
and exports HERETIC_TEST_POSTGRES_URL; locally run `bash scripts/with-postgres.sh
python -m pytest tests/test_workers.py`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from test_robustness import FINISHED, Worker, heretic_argv, prompt_files  # noqa: F401

from heretic.evaluation import Score
from heretic.optimization import SearchSpace, open_study, run_search
from heretic.workers import (
    FAIL_REASON_ATTR,
    RETRY_OF_ATTR,
    WORKER_ATTR,
    claimed_count,
    make_storage,
    recover_stale_trials,
    worker_id,
)

POSTGRES_ENV = "HERETIC_TEST_POSTGRES_URL"


def _check_shared_study(study: optuna.Study, first: Worker, second: Worker) -> None:
    trials = study.trials
    done = [t for t in trials if t.state in FINISHED]
    # Each worker may start one trial past n_trials when both ask at the same instant.
    assert 6 <= len(done) <= 7, [t.state for t in trials]
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    params = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(params)) == len(params), "no parameters were evaluated twice"
    pids = {t.user_attrs[WORKER_ATTR].split(":")[1] for t in done}
    assert pids <= {str(first.proc.pid), str(second.proc.pid)}
    logs = first.output + second.output
    assert logs.count("Saved refusal directions") == 1, "directions are computed once"


def test_two_workers_share_a_sqlite_study(tiny_chat_model, prompt_files, tmp_path):  # noqa: F811
    """One machine: the same command twice, same output folder. The first worker is held in the
    middle of extracting directions (holding the lock) until the second waits for it."""
    out = tmp_path / "out"
    argv = heretic_argv(tiny_chat_model, prompt_files, out, "--n-trials", "6", "--select", "none")
    go = tmp_path / "go"
    first = Worker(argv, tmp_path / "worker1.log", pause="extraction", resume=go)
    first.wait_for("paused at extraction")
    second = Worker(argv, tmp_path / "worker2.log")
    second.wait_for("Waiting for another worker's directions")
    go.touch()
    for worker in (first, second):
        assert worker.wait() == 0, worker.output
    assert "Reusing refusal directions" in second.output
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    _check_shared_study(optuna.load_study(study_name="heretic", storage=storage), first, second)


def test_two_workers_share_a_postgresql_study(tiny_chat_model, prompt_files, tmp_path):  # noqa: F811
    """Several machines: a shared PostgreSQL storage, each worker its own output folder; the
    second worker takes the first one's directions file with --directions (the README recipe).
    The first worker is held in its second trial until the second worker has run one, so both
    really work on the study at the same time."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(
            f"{POSTGRES_ENV} is not set: run under scripts/with-postgres.sh (as .ci/run does)"
        )
    name = f"test-{uuid.uuid4().hex[:8]}"
    common = ("--n-trials", "6", "--select", "none", "--storage", url, "--study-name", name)
    out1, out2 = tmp_path / "machine1", tmp_path / "machine2"
    go = tmp_path / "go"
    argv1 = heretic_argv(tiny_chat_model, prompt_files, out1, *common)
    first = Worker(argv1, tmp_path / "machine1.log", pause="trial:2", resume=go)
    first.wait_for("paused at trial:2")
    directions = out1 / "directions.safetensors"
    argv2 = heretic_argv(
        tiny_chat_model, prompt_files, out2, *common, "--directions", str(directions)
    )
    second = Worker(argv2, tmp_path / "machine2.log")
    study = optuna.load_study(study_name=name, storage=make_storage(url, None))
    deadline = time.monotonic() + 240
    while not any(
        t.state in FINISHED and f":{second.proc.pid}:" in t.user_attrs.get(WORKER_ATTR, "")
        for t in study.get_trials()
    ):
        assert second.proc.poll() is None and time.monotonic() < deadline, second.output
        time.sleep(0.5)
    go.touch()
    for worker in (first, second):
        assert worker.wait() == 0, worker.output
    assert "Usingrefusaldirectionsfrom" + str(directions) in "".join(second.output.split())
    study = optuna.load_study(study_name=name, storage=make_storage(url, None))
    _check_shared_study(study, first, second)
    pids = {t.user_attrs[WORKER_ATTR].split(":")[1] for t in study.trials if t.state in FINISHED}
    assert pids == {str(first.proc.pid), str(second.proc.pid)}, "both workers ran trials"


# ----- stale trials ---------------------------------------------------------------------------


def _study(tmp_path: Path, heartbeat: int | None = None, grace: int | None = None):
    storage = make_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat, grace)
    return open_study(storage, "s", 0, 1)


def _running_trial(study: optuna.Study, owner: str) -> optuna.Trial:
    trial = study.ask()
    trial.set_user_attr(WORKER_ATTR, owner)
    SearchSpace(n_layers=4).suggest(trial)
    return trial


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_trial_of_a_dead_local_process_is_failed_and_retried(tmp_path):
    study = _study(tmp_path)
    dead = _running_trial(study, f"{socket.gethostname()}:{_dead_pid()}:1")
    live = _running_trial(study, f"{socket.gethostname()}:{os.getppid()}:")
    mine = _running_trial(study, worker_id())
    remote = _running_trial(study, "some-other-machine:1:1")

    recovered = recover_stale_trials(study)
    assert [t.number for t in recovered] == [dead.number]
    states = {t.number: t.state for t in study.trials}
    assert states[dead.number] == TrialState.FAIL
    for trial in (live, mine, remote):
        assert states[trial.number] == TrialState.RUNNING, "a live or unknown worker is kept"
    failed = study.trials[dead.number]
    assert "stopped while it was running" in failed.user_attrs[FAIL_REASON_ATTR]
    retry = study.ask()
    assert retry.user_attrs[RETRY_OF_ATTR] == dead.number
    assert SearchSpace(n_layers=4).suggest(retry) and retry.params == failed.params
    assert recover_stale_trials(study) == [], "each trial is recovered once"


def test_trial_without_heartbeat_of_another_machine_is_failed_after_grace(tmp_path):
    study = _study(tmp_path, heartbeat=1, grace=1)
    storage = study._storage
    remote = _running_trial(study, "some-other-machine:1:1")
    storage.record_heartbeat(remote._trial_id)
    fresh = _running_trial(study, "another-machine:2:2")
    assert recover_stale_trials(study) == []
    time.sleep(2.5)
    storage.record_heartbeat(fresh._trial_id)
    recovered = recover_stale_trials(study)
    assert [t.number for t in recovered] == [remote.number]
    assert "no heartbeat" in study.trials[remote.number].user_attrs[FAIL_REASON_ATTR]
    assert study.trials[fresh.number].state == TrialState.RUNNING


def test_running_trials_of_other_workers_count_towards_n_trials(tmp_path):
    study = _study(tmp_path)
    _running_trial(study, "some-other-machine:1:1")
    scores = iter(range(10))

    def score(params, *rest) -> Score:
        return Score(kl_divergence=0.1, refusals=next(scores))

    run_search(study, 3, SearchSpace(n_layers=4), score)
    assert claimed_count(study) == 3
    assert sum(t.state == TrialState.RUNNING for t in study.trials) == 1


def test_same_seed_workers_sample_different_parameters(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    a = open_study(url, "s", 42, 10)
    b = open_study(url, "s", 42, 10)
    ta, tb = a.ask(), b.ask()
    assert SearchSpace(n_layers=4).suggest(ta) != SearchSpace(n_layers=4).suggest(tb)
