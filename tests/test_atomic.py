"""Every writer of heretic's outputs, stopped mid-write, leaves the previous output whole.

Three ways to stop a write: an `OSError` (a full disk), a `KeyboardInterrupt` (Ctrl-C), both of
which the writer itself must clean up after, and a hard kill (`kill -9`, simulated by
`os._exit` in a forked child), after which nothing in the process runs and the next run's
`clean_leftovers` must put the folder back in order.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from heretic.atomic import clean_leftovers, staged_folder
from heretic.errors import ExportError

KILLED = 17
"""The exit code of a child killed at the chosen point (anything else: the kill never came)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stop(how: str) -> None:
    if how == "disk full":
        raise OSError(errno.ENOSPC, "No space left on device")
    if how == "ctrl-c":
        raise KeyboardInterrupt
    os._exit(KILLED)


def _partial(path: Path | str, how: str) -> None:
    """Write the first bytes of a file, then stop."""
    Path(path).write_bytes(b"partial")
    _stop(how)


def _in_child(work: Callable[[], None]) -> int:
    """Run `work` in a forked child and return its exit code (KILLED when it was killed)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns
        code = 0
        try:
            work()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (recursively) and its bytes (None for folders)."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.name != ".heretic.lock"
    }


# ----- the writers ---------------------------------------------------------------------------


@dataclass
class Writer:
    """One of heretic's outputs: `write(out, version, stop)` writes version `version` of it into
    the folder `out`; with `stop` set, the write is stopped that way part of the way through."""

    name: str
    write: Callable[[Path, int, str | None, pytest.MonkeyPatch], None]


class _FakePretrained:
    """What `save_model_folder` needs of a model or tokenizer: `save_pretrained`."""

    def __init__(self, filename: str, version: int, stop: str | None) -> None:
        self.filename, self.version, self.stop = filename, version, stop

    def save_pretrained(self, folder: Path, **kwargs: object) -> None:
        (Path(folder) / "config.json").write_text(f"{self.version}")
        if self.stop is not None:
            _partial(Path(folder) / self.filename, self.stop)
        (Path(folder) / self.filename).write_text(f"{self.version}" * 1000)


def _model_folder(out: Path, version: int, stop: str | None, mp: pytest.MonkeyPatch) -> None:
    from heretic.export import save_model_folder

    model = _FakePretrained("model.safetensors", version, stop)
    save_model_folder(model, _FakePretrained("tokenizer.json", version, None), out / "model")


def _adapter_folder(out: Path, version: int, stop: str | None, mp: pytest.MonkeyPatch) -> None:
    with staged_folder(out / "adapter") as tmp:
        (tmp / "adapter_config.json").write_text(f"{version}")
        if stop is not None:
            _partial(tmp / "adapter_model.safetensors", stop)
        (tmp / "adapter_model.safetensors").write_text(f"{version}" * 1000)


class _Bomb:
    """Serialized through `default=str` after the text before it was written: stops the write."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __str__(self) -> str:
        _stop(self.how)
        return ""


def _metadata(out: Path, version: int, stop: str | None, mp: pytest.MonkeyPatch) -> None:
    from heretic.export import write_json

    data: dict[str, object] = {"trial_number": version, "padding": "x" * 100_000}
    if stop is not None:
        data["z"] = _Bomb(stop)
    write_json(data, out / "heretic_metadata.json")


def _directions(out: Path, version: int, stop: str | None, mp: pytest.MonkeyPatch) -> None:
    import heretic.directions

    if stop is not None:
        mp.setattr(heretic.directions, "save_file", lambda t, path, **kw: _partial(path, stop))
    heretic.directions.save_directions(
        out / heretic.directions.DIRECTIONS_FILE, torch.full((2, 4), 0.5 * version), {"v": "1"}
    )


def _gguf_source(path: Path, version: int) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("heretic.test_version", version)
    writer.add_tensor("blk.0.ffn_down.weight", np.full((4, 4), version, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf(out: Path, version: int, stop: str | None, mp: pytest.MonkeyPatch) -> None:
    import gguf

    from heretic.gguf_export import write_edited_gguf

    source = _gguf_source(out.parent / f"source-{version}.gguf", version)
    if stop is not None:
        mp.setattr(gguf.GGUFWriter, "write_tensor_data", lambda *a, **k: _stop(stop))
    write_edited_gguf(source, out / "model-heretic.gguf", {}, 4)


def _pareto(out: Path, version: int, stop: str | None, mp: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    from heretic.plots import TrialPoint, pareto_plot

    if stop is not None:
        mp.setattr(Figure, "savefig", lambda self, path, **kw: _partial(path, stop))
    trials = [TrialPoint(0, 0.1 * version, 3), TrialPoint(1, 0.5, 1)]
    pareto_plot(trials, [0, 1], 0, 10, 10, out / "pareto.png", title=f"v{version}")


WRITERS = [
    Writer("model folder", _model_folder),
    Writer("adapter folder", _adapter_folder),
    Writer("heretic_metadata.json", _metadata),
    Writer("directions file", _directions),
    Writer("GGUF file", _gguf),
    Writer("Pareto plot", _pareto),
]


@pytest.fixture(params=WRITERS, ids=lambda w: w.name)
def writer(request) -> Writer:
    return request.param


def _first_version(writer: Writer, tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    out = tmp_path / "out"
    out.mkdir()
    writer.write(out, 1, None, monkeypatch)
    before = _snapshot(out)
    assert before, "the writer wrote something"
    return out, before


@pytest.mark.parametrize("how", ["disk full", "ctrl-c"])
def test_a_stopped_write_keeps_the_previous_output(writer, how, tmp_path, monkeypatch):
    out, before = _first_version(writer, tmp_path, monkeypatch)
    expected = ExportError if how == "disk full" else KeyboardInterrupt
    with pytest.raises(expected) as raised:
        writer.write(out, 2, how, monkeypatch)
    if how == "disk full":
        assert "No space left on device" in str(raised.value)
        assert "nothing was overwritten" in str(raised.value)
    assert _snapshot(out) == before, "the previous output is whole and no temporary is left"


def test_a_killed_write_is_cleaned_up_by_the_next_run(writer, tmp_path, monkeypatch):
    out, before = _first_version(writer, tmp_path, monkeypatch)
    assert _in_child(lambda: writer.write(out, 2, "kill", monkeypatch)) == KILLED
    assert _snapshot(out) != before, "the kill left a temporary behind"
    assert clean_leftovers(out)
    assert _snapshot(out) == before


def test_a_finished_write_replaces_the_output_with_ordinary_permissions(
    writer, tmp_path, monkeypatch
):
    out, before = _first_version(writer, tmp_path, monkeypatch)
    writer.write(out, 2, None, monkeypatch)
    after = _snapshot(out)
    assert after.keys() == before.keys() and after != before
    for name in after:
        path = out / name
        mode = 0o777 if path.is_dir() else 0o666
        assert path.stat().st_mode & 0o777 == mode & ~_umask(), name
    assert clean_leftovers(out) == []


# ----- a kill between the renames of a folder replace ----------------------------------------


class _Renames:
    """Counts renames (os.rename and os.replace) and kills the process after the `kill_after`th."""

    def __init__(self, monkeypatch, kill_after: int | None = None) -> None:
        self.count = 0
        self.kill_after = kill_after
        for name in ("rename", "replace"):
            original = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(original))

    def _wrap(self, original):
        def rename(*args, **kwargs):
            original(*args, **kwargs)
            self.count += 1
            if self.count == self.kill_after:
                os._exit(KILLED)

        return rename


@pytest.mark.parametrize("name", ["model", "adapter"])
def test_a_kill_between_the_renames_of_a_folder_replace_is_undone(name, tmp_path, monkeypatch):
    """Killed after each rename in turn, the folder ends as the old or the new one, whole, once
    the next run has cleaned up: never missing, never a mix."""

    def write(out: Path, version: int) -> None:
        with staged_folder(out / name) as tmp:
            (tmp / "weights").write_text(f"{version}")

    counting = tmp_path / "counting"
    counting.mkdir()
    write(counting, 1)
    with monkeypatch.context() as mp:
        renames = _Renames(mp)
        write(counting, 2)
    assert renames.count >= 1
    versions = [{name: None, f"{name}/weights": f"{v}".encode()} for v in (1, 2)]
    for kill_after in range(1, renames.count + 1):
        out = tmp_path / f"killed-after-{kill_after}"
        out.mkdir()
        write(out, 1)
        with monkeypatch.context() as mp:
            _Renames(mp, kill_after)
            assert _in_child(lambda out=out: write(out, 2)) == KILLED
        clean_leftovers(out)
        assert _snapshot(out) in versions, f"killed after rename {kill_after}"


def test_cleanup_leaves_the_users_own_files_alone(tmp_path):
    """Only what heretic's writers make is touched: a user's `X.old` stays, even where heretic
    writes `X` but never backs it up."""
    mine = {
        ".gitignore": b"*",
        "notes.old": b"mine",
        "directions.safetensors.old": b"kept by hand",
        "heretic_metadata.json.old": b"{}",
        "pareto.png": b"png",
    }
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    assert clean_leftovers(tmp_path) == []
    assert _snapshot(tmp_path) == mine


def test_cleanup_restores_backups_left_by_earlier_versions(tmp_path):
    """Before the atomic module, a replaced folder's backup was `model.old`: still restored."""
    (tmp_path / "model.old").mkdir()
    (tmp_path / "model.old" / "weights").write_text("1")
    (tmp_path / ".model.ab12cd_9").mkdir()
    assert sorted(clean_leftovers(tmp_path)) == [".model.ab12cd_9", "model.old"]
    assert _snapshot(tmp_path) == {"model": None, "model/weights": b"1"}


def test_a_missing_output_folder_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="Cannot create output folder"):
        with staged_folder(tmp_path / "file" / "model"):
            pass


def test_directions_file_is_readable_by_others(tmp_path):
    from heretic.directions import save_directions

    path = tmp_path / "directions.safetensors"
    save_directions(path, torch.ones(2, 4), {})
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
