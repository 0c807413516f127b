"""Errors a user can act on.

Every failure the user can fix raises a `HereticError` whose message says what went wrong *and*
what to do about it; `cli.main` prints the message (no traceback) and exits non-zero. Anything
else that escapes is a bug in heretic and keeps its traceback.
"""


class HereticError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class SettingsError(HereticError):
    """A setting has a value heretic cannot use."""


class DatasetError(HereticError):
    """A prompt set cannot be loaded (missing file, unknown column, empty set, bad slice)."""


class ModelLoadError(HereticError):
    """The model cannot be loaded, or is not one heretic can edit."""


class StudyError(HereticError):
    """The Optuna study cannot be opened or does not match the current run."""


class ExportError(HereticError):
    """The chosen model cannot be written or uploaded."""


class DirectionsError(HereticError):
    """A refusal directions file cannot be read or was made for another model."""
