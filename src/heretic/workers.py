"""Never lose work: crash recovery, file locks and several workers sharing one study.

A run takes hours on rented GPUs, so heretic must survive `kill -9` at any moment and let
several processes (one per GPU, or one per machine) work on the same Optuna study:

- Every trial records which process runs it (`heretic_worker`: host, pid and process start
  time) and, on storages that support it, a heartbeat every `heartbeat_interval` seconds.
- At startup (and while waiting for other workers) a RUNNING trial is failed only when that is
  safe: its process is on this host and gone, or its heartbeat is older than the grace period
  (a worker on another machine that died). A live worker's trial is never failed. The failed
  trial's parameters are enqueued again, so the trial that was running is retried.
- The search stops when finished + running trials reach `n_trials`, so several workers
  overshoot by at most one trial each (the ones asked for in the same instant).
- The output folder is shared by local workers through `fcntl` locks: a shared lock for each
  worker's lifetime (the worker that starts alone may clean up what a killed run left behind),
  and an exclusive lock around computing the refusal directions (the first worker computes and
  saves them, the others wait and load the file).

`HERETIC_TEST_PAUSE_AT` makes the process stop at a named point so that tests can kill it
there; it is read with one dictionary lookup, so it costs nothing in normal runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import re
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from heretic.atomic import clean_leftovers, temp_sibling
from heretic.errors import ExportError, StudyError

WORKER_ATTR = "heretic_worker"
"""User attribute of a trial: `host:pid:start` of the process that ran it."""
FAIL_REASON_ATTR = "heretic_fail_reason"
"""User attribute of a trial failed by recovery: why it was failed."""
RETRY_OF_ATTR = "heretic_retry_of"
"""User attribute of a retried trial: the number of the trial whose process died."""
PAUSE_ENV = "HERETIC_TEST_PAUSE_AT"
RESUME_ENV = "HERETIC_TEST_RESUME_FILE"

DEFAULT_HEARTBEAT_INTERVAL = 30
GRACE_FACTOR = 4
"""A trial whose heartbeat is older than GRACE_FACTOR intervals belongs to a dead worker."""

_RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "oracle", "mssql")

# `Study.ask` warns that heartbeats are meant for `Study.optimize`; heretic records them itself.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")


# --------------------------------------------------------------------------------------------
# Worker identity
# --------------------------------------------------------------------------------------------


def _process_start(pid: int) -> str:
    """The process start time in clock ticks since boot (Linux), so a reused pid is told apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else ""


def worker_id() -> str:
    """`host:pid:start` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}:{_process_start(os.getpid())}"


@dataclass(frozen=True)
class WorkerId:
    host: str
    pid: int
    start: str

    @classmethod
    def parse(cls, value: object) -> WorkerId | None:
        if not isinstance(value, str):
            return None
        parts = value.rsplit(":", 2)
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), parts[2])

    def is_dead_local_process(self) -> bool:
        """True only when this worker ran on this host and its process is certainly gone."""
        if self.host != socket.gethostname() or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
        except OSError:
            return False  # no /proc (macOS): the pid exists, so assume it is the worker
        state = stat[stat.rfind(")") + 2 :].split()[0]
        if state in ("Z", "X"):
            return True  # killed, waiting for its parent to reap it
        return bool(self.start) and _process_start(self.pid) != self.start


# --------------------------------------------------------------------------------------------
# Test hook
# --------------------------------------------------------------------------------------------


def pause_point(name: str, count: int | None = None) -> None:
    """Stop here when HERETIC_TEST_PAUSE_AT names this point (`name` or `name:count`).

    Crash tests wait for the line this prints on stderr, then kill the process with SIGKILL.
    With HERETIC_TEST_RESUME_FILE set, the process goes on once that file exists (tests of
    several workers use it to make them overlap); otherwise it stops forever.
    """
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    for item in wanted.split(","):
        point, _, number = item.strip().partition(":")
        if point == name and (not number or (count is not None and int(number) == count)):
            print(f"heretic: paused at {item.strip()}", file=sys.stderr, flush=True)
            resume = os.environ.get(RESUME_ENV)
            while not (resume and Path(resume).exists()):
                time.sleep(0.1 if resume else 3600)
            return


# --------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].split("+", 1)[0].lower()


def make_storage(
    url: str,
    heartbeat_interval: int | None = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
) -> optuna.storages.BaseStorage:
    """An Optuna RDB storage for `url`, with heartbeats, and errors the user can act on.

    SQLite gets a long lock timeout, since several local workers write to one file; PostgreSQL
    and MySQL get connection pre-ping, since a worker may sit idle while others finish.
    Creating the tables races when several workers start at once on an empty database, so a
    failure is retried a few times before it is reported.
    """
    scheme = _scheme(url)
    _check_storage_url(url, scheme)
    shown = redact(url)
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 120}} if scheme == "sqlite" else {"pool_pre_ping": True}
    )
    if heartbeat_interval is not None and grace_period is None:
        grace_period = GRACE_FACTOR * heartbeat_interval
    last: Exception | None = None
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    _with_installed_driver(url),
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                )
        except ImportError as e:
            driver = {"postgresql": "psycopg2-binary", "postgres": "psycopg2-binary"}.get(
                scheme, "the database driver"
            )
            raise StudyError(
                f"Cannot open study storage {shown}: the Python driver for {scheme} is missing "
                f"({e.__cause__ or e}). Install it: pip install {driver}"
            ) from e
        except Exception as e:  # sqlalchemy raises many kinds for unreachable servers
            last = e
            if _is_unreachable(e):
                break
            time.sleep(0.5 * (attempt + 1))
    assert last is not None
    message = str(last).strip().splitlines()[0] if str(last).strip() else type(last).__name__
    raise StudyError(
        f"Cannot open study storage {shown}: {message}. Check that the database server is "
        "running and reachable, and the URL (user, password, host, port, database)."
    ) from last


def _check_storage_url(url: str, scheme: str) -> None:
    """Refuse, before connecting, a URL that is not a database heretic can use, and an SQLite
    file whose folder does not exist (SQLite itself only says "unable to open database
    file"), each with what to give instead."""
    if "://" not in url or scheme not in _RDB_SCHEMES:
        raise StudyError(
            f"Storage {url!r} is not a database URL heretic can use: give "
            "sqlite:///PATH/study.db (one machine) or "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE (several machines)."
        )
    if scheme == "sqlite":
        path = url.split(":///", 1)[1] if ":///" in url else ""
        if path and path != ":memory:" and not Path(path).parent.is_dir():
            raise StudyError(
                f"Cannot open study storage {url}: folder {Path(path).parent} does not exist. "
                "Create it or fix --storage."
            )


def redact(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _with_installed_driver(url: str) -> str:
    """`postgresql://` with the driver that is installed: SQLAlchemy 2.1 assumes psycopg 3,
    while psycopg2-binary (heretic's dev extra) is the one with wheels nearly everywhere."""
    head, sep, rest = url.partition("://")
    if head not in ("postgresql", "postgres") or not sep:
        return url
    for module, dialect in (("psycopg2", "postgresql+psycopg2"), ("psycopg", "postgresql+psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"{dialect}://{rest}"
    return url


def _is_unreachable(e: Exception) -> bool:
    text = str(e).lower()
    return any(
        s in text
        for s in ("connection refused", "could not translate host", "unable to open", "timeout")
    )


def backend(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage behind Optuna's per-process cache (writes go straight to the database)."""
    storage = study._storage
    return getattr(storage, "_backend", storage)


def _heartbeat_interval(storage: optuna.storages.BaseStorage) -> int | None:
    get = getattr(storage, "get_heartbeat_interval", None)
    return get() if get is not None else None


# --------------------------------------------------------------------------------------------
# Trials: claim, heartbeat, recover
# --------------------------------------------------------------------------------------------


def claim_trial(trial: optuna.Trial) -> None:
    """Record which process runs `trial`, so that recovery can tell whether it is still alive."""
    trial.set_user_attr(WORKER_ATTR, worker_id())


class Heartbeat:
    """Records the trial's heartbeat every `heartbeat_interval` seconds while it runs.

    Heartbeats are written from a thread: the scoring itself spends its time in torch, which
    releases the GIL, so a slow trial on a live worker keeps beating.
    """

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self.storage = backend(study)
        self.trial_id = trial._trial_id
        self.interval = _heartbeat_interval(self.storage)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _beat(self) -> None:
        assert self.interval is not None
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried next interval
                self.storage.record_heartbeat(self.trial_id)  # type: ignore[attr-defined]
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Heartbeat:
        if self.interval is not None:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()


def claimed_count(study: optuna.Study) -> int:
    """Finished (scored or pruned) trials plus those running now on any worker: what counts
    against n_trials."""
    counted = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(t.state in counted for t in study.get_trials(deepcopy=False))


def _stale_reasons(study: optuna.Study) -> dict[int, str]:
    """RUNNING trials (by trial id) that belong to a dead worker, with the reason."""
    reasons: dict[int, str] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = WorkerId.parse(t.user_attrs.get(WORKER_ATTR))
        if owner is not None and owner.is_dead_local_process():
            reasons[t._trial_id] = (
                f"its worker (pid {owner.pid} on {owner.host}) stopped while it was running"
            )
    storage = backend(study)
    interval = _heartbeat_interval(storage)
    get_stale = getattr(storage, "_get_stale_trial_ids", None)
    if interval is not None and get_stale is not None:
        for trial_id in get_stale(study._study_id):
            reasons.setdefault(
                trial_id,
                "its worker sent no heartbeat for more than "
                f"{getattr(storage, 'grace_period', None) or 2 * interval} s",
            )
    return reasons


def recover_stale_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Fail the RUNNING trials of dead workers and enqueue their parameters again.

    Returns the trials this process failed (another worker recovering at the same moment wins
    some of them; each is failed and retried once).
    """
    storage = backend(study)
    recovered = []
    for trial_id, reason in _stale_reasons(study).items():
        try:
            storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason)
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished, or another worker failed it first
        trial = storage.get_trial(trial_id)
        recovered.append(trial)
        if trial.params:
            study.enqueue_trial(
                dict(trial.params), user_attrs={RETRY_OF_ATTR: trial.number}, skip_if_exists=False
            )
    return recovered


def wait_for_other_workers(
    study: optuna.Study,
    on_wait: Callable[[int], None] | None = None,
    poll_seconds: float = 2.0,
) -> None:
    """Block until no trial of the study is running, so every worker sees the same front.

    A trial of a worker that died meanwhile is failed (see `recover_stale_trials`) instead of
    waited for forever.
    """
    told = False
    while True:
        recover_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        if not told and on_wait is not None:
            on_wait(len(running))
            told = True
        time.sleep(poll_seconds)


# --------------------------------------------------------------------------------------------
# The output folder: locks and leftovers of killed runs
# --------------------------------------------------------------------------------------------


def prepare_output_dir(output_dir: Path) -> Path:
    """Create the output folder and check it is writable, before any expensive work."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise ExportError(
            f"Output folder {output_dir} exists as a file (or a file is in its path): "
            "choose another --output-dir."
        ) from e
    except OSError as e:
        raise ExportError(
            f"Cannot create output folder {output_dir}: {e.strerror or e}. Fix --output-dir."
        ) from e
    try:
        temp_sibling(output_dir / "heretic-write-test").unlink()
    except OSError as e:
        raise ExportError(
            f"Output folder {output_dir} is not writable ({e.strerror or e}): fix its "
            "permissions or choose another --output-dir."
        ) from e
    return output_dir


class OutputDirLease:
    """A shared lock on the output folder for this worker's lifetime.

    The worker that finds no other worker holding it undoes what killed runs left behind
    (`atomic.clean_leftovers`: temporaries removed, a replaced folder's backup put back when
    the run died between the two renames of the replace).
    """

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / ".heretic.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        self.cleaned: list[str] = []
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another worker uses the folder: its temporaries may be live
        else:
            self.cleaned = clean_leftovers(output_dir)
        fcntl.flock(self.fd, fcntl.LOCK_SH)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> OutputDirLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def exclusive_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive `fcntl` lock on `path` (created if needed); `on_wait` runs if it is taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
