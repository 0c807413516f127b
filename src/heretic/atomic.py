"""Outputs that are whole or absent: every file and folder heretic writes goes through here.

A run takes hours and may be stopped at any moment (a full disk, Ctrl-C, `kill -9`), so no
output may ever be half-written, and the previous one must survive a failed replacement:

- a file is written under a hidden temporary name next to it and renamed over the old one
  (`atomic_file`): a rename inside one folder is atomic, so readers see the old file or the new;
- a folder is filled under a temporary name and swapped in (`staged_folder`). A folder cannot
  be renamed over a non-empty one, so the old folder is first renamed to a backup, the new one
  takes its name, and only then is the backup deleted;
- a write that fails or is interrupted removes its temporary itself; what a killed process left
  behind is recognised by its name alone and undone by the next run (`clean_leftovers`). That
  is why the temporary and backup names are made here and nowhere else.

Everything is created with the permissions a plain `open`/`mkdir` would give (not the private
ones `tempfile` uses), so outputs shared with other users stay readable.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from heretic.errors import ExportError

OUTPUT_DIR_HINT = "Free disk space or choose another --output-dir."

BACKUP_SUFFIX = ".heretic-old"
"""A folder being replaced is renamed to `.NAME.heretic-old` until the new one is in place."""
_TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}(\.png)?$")
"""`.NAME.XXXXXXXX`: what `tempfile` makes for the prefix `.NAME.` (and `.NAME.XXXXXXXX.png`,
the plots' temporaries before this module)."""
_LEGACY_BACKUPS = ("model.old", "adapter.old")
"""Backups of replaced folders as versions before this module named them."""


def default_mode(directory: bool) -> int:
    """The permissions a plain mkdir/open gives under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def writable_parent(path: Path, hint: str = OUTPUT_DIR_HINT) -> Path:
    """Create `path`'s folder if needed; an error names it when it cannot be written."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"Cannot create output folder {parent}: {e.strerror}. {hint}") from e
    if not os.access(parent, os.W_OK):
        raise ExportError(f"Output folder {parent} is not writable. {hint}")
    return parent


def temp_sibling(final: Path, directory: bool = False) -> Path:
    """A new, empty hidden file (or folder) next to `final`, named so `clean_leftovers` knows
    it for a temporary."""
    if directory:
        return Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    os.close(fd)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _write_error(path: Path, what: str, error: OSError, hint: str) -> ExportError:
    subject = f"{what} to {path}" if what else str(path)
    return ExportError(
        f"Writing {subject} failed ({error.strerror or error}); nothing was overwritten. {hint}"
    )


@contextlib.contextmanager
def atomic_file(path: Path, what: str = "", hint: str = OUTPUT_DIR_HINT) -> Iterator[Path]:
    """Yield a temporary path to write; when the block ends normally it replaces `path`.

    An error or interrupt in the block removes the temporary and leaves `path` as it was; an
    `OSError` becomes an `ExportError` naming `what` and `path`.
    """
    writable_parent(path, hint)
    try:
        tmp = temp_sibling(path)
    except OSError as e:
        raise _write_error(path, what, e, hint) from e
    try:
        yield tmp
        tmp.chmod(default_mode(directory=False))
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, what, e, hint) from e
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: Path, text: str, what: str = "", hint: str = OUTPUT_DIR_HINT) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_file(path, what, hint) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def staged_folder(path: Path, what: str = "", hint: str = OUTPUT_DIR_HINT) -> Iterator[Path]:
    """Yield a temporary folder to fill; when the block ends normally it replaces `path` whole.

    An error or interrupt in the block removes the temporary folder and leaves `path` as it
    was, so an output folder always holds one complete write.
    """
    writable_parent(path, hint)
    try:
        tmp = temp_sibling(path, directory=True)
    except OSError as e:
        raise _write_error(path, what, e, hint) from e
    try:
        tmp.chmod(default_mode(directory=True))
        yield tmp
        replace_folder(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise _write_error(path, what, e, hint) from e
    except BaseException:
        _remove(tmp)
        raise


def backup_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{BACKUP_SUFFIX}")


def replace_folder(new: Path, final: Path) -> None:
    """Rename `new` to `final`; an existing `final` is kept as a backup until `new` is in place
    (and is put back if that rename fails)."""
    backup = backup_name(final)
    _remove(backup)  # a backup a killed run left next to a complete `final`
    if not os.path.lexists(final):
        os.rename(new, final)
        return
    os.rename(final, backup)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(backup, final)
        raise
    _remove(backup)


def _backed_up(name: str) -> str | None:
    """The output a backup named `name` belongs to (None when `name` is no backup)."""
    if name.startswith(".") and name.endswith(BACKUP_SUFFIX) and len(name) > 1 + len(BACKUP_SUFFIX):
        return name[1 : -len(BACKUP_SUFFIX)]
    if name in _LEGACY_BACKUPS:
        return name[: -len(".old")]
    return None


def clean_leftovers(folder: Path) -> list[str]:
    """Undo what killed writes left in `folder`: temporaries are removed, a backup is put back
    where its output is missing (the write died between its two renames) and removed where the
    output is there. Returns the names touched. Only call it when no other process is writing
    to `folder` (their temporaries are live)."""
    touched = []
    for entry in sorted(folder.iterdir()):
        output = _backed_up(entry.name)
        if output is not None:
            final = entry.with_name(output)
            if os.path.lexists(final):
                _remove(entry)
            else:
                os.rename(entry, final)
        elif _TEMP_NAME.match(entry.name):
            _remove(entry)
        else:
            continue
        touched.append(entry.name)
    return touched
