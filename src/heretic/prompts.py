"""Load one prompt set (a list of strings) from a `DatasetSpecification`.

A prompt set comes either from a local file or folder, or from the Hugging Face Hub. Local files
are read with the standard library (plus pyarrow/pandas for parquet) so that small prompt lists
need neither the network nor the `datasets` cache. Every failure the user can fix raises a
`DatasetError` whose message starts with the setting name (e.g. ``bad_prompts: ...``), because a
run loads several prompt sets and the user must know which one to correct.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from heretic.config import DatasetSpecification
from heretic.errors import DatasetError
from heretic.splits import SplitSlice, parse_split_for

T = TypeVar("T")

LOCAL_SUFFIXES = (".txt", ".json", ".jsonl", ".csv", ".parquet")
"""Suffixes that mark `dataset` as a local file even when it does not exist (no hub lookup)."""

_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")
"""Hub ids never start like this, so such a value is a local path the user mistyped."""

DEFAULT_COLUMNS = ("text", "instruction")
"""Column names tried, in order, when the specification names none."""


# --------------------------------------------------------------------------------------------
# Rows: a uniform view over records, plain string lists and `datasets` datasets
# --------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Column names plus a way to read one column, whatever the source was.

    `string_columns` drives the default column choice: a set with exactly one text column
    needs no `column` setting even if that column is called something like ``prompt``.
    """

    source: str
    columns: list[str]
    string_columns: list[str]
    read_column: Callable[[str], Iterable[Any]]


def _rows_from_strings(source: str, values: list[Any]) -> _Rows:
    """A bare list of strings behaves like a one-column set called ``text``."""
    return _Rows(source, ["text"], ["text"], lambda _column: values)


def _rows_from_records(source: str, records: list[dict[str, Any]]) -> _Rows:
    """Rows given as dicts; columns are the union of keys, in order of first appearance."""
    columns: list[str] = []
    for record in records:
        columns.extend(key for key in record if key not in columns)

    def is_text(column: str) -> bool:
        values = [r.get(column) for r in records if r.get(column) is not None]
        return bool(values) and all(isinstance(v, str) for v in values)

    return _Rows(
        source,
        columns,
        [c for c in columns if is_text(c)],
        lambda column: (record.get(column) for record in records),
    )


def _rows_from_dataset(source: str, dataset: Any) -> _Rows:
    """Rows of a `datasets.Dataset`; text columns are taken from its declared features."""
    features = dataset.features or {}
    string_columns = [
        name
        for name, feature in features.items()
        if getattr(feature, "dtype", None) in ("string", "large_string")
    ]
    return _Rows(source, list(dataset.column_names), string_columns, lambda column: dataset[column])


def _choose_column(rows: _Rows, column: str | None, setting: str) -> str:
    """Pick the prompt column: the configured one, else text/instruction, else the only text one."""
    available = ", ".join(repr(c) for c in rows.columns) or "none"
    if column is not None:
        if column in rows.columns:
            return column
        raise DatasetError(
            f"{setting}: column {column!r} not found in {rows.source}; available columns: "
            f"{available}. Set {setting}.column to one of them."
        )
    for candidate in DEFAULT_COLUMNS:
        if candidate in rows.columns:
            return candidate
    if len(rows.string_columns) == 1:
        return rows.string_columns[0]
    raise DatasetError(
        f"{setting}: cannot tell which column of {rows.source} holds the prompts (no 'text' or "
        f"'instruction' column); available columns: {available}. "
        f"Set {setting}.column to the one holding the prompt text."
    )


def _to_prompt(value: Any, setting: str, column: str, source: str) -> str | None:
    """Normalise one cell: text is stripped, numbers become text, blanks and nulls are dropped.

    Anything else (lists, dicts, booleans) means the wrong column was chosen, which is worth
    an error rather than silently sending ``"{'role': ...}"`` to the model.
    """
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None  # pandas' missing value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return value.strip() or None
    raise DatasetError(
        f"{setting}: column {column!r} of {source} holds {type(value).__name__} values, not "
        f"text. Set {setting}.column to a column holding the prompt text."
    )


def _prompts_from_values(
    values: Iterable[Any], setting: str, column: str, source: str
) -> Iterator[str]:
    """Lazily yield the non-empty prompts of one column (lazy so streaming can stop early)."""
    for value in values:
        prompt = _to_prompt(value, setting, column, source)
        if prompt is not None:
            yield prompt


def _select(
    prompts: list[str], split: SplitSlice, split_text: str, setting: str, source: str
) -> list[str]:
    """Apply the slice and refuse an empty result, telling the user how many prompts exist."""
    selected = split.apply(prompts)
    if not selected:
        raise _empty_error(setting, source, split_text, len(prompts))
    return selected


def _empty_error(setting: str, source: str, split_text: str, available: int | None) -> DatasetError:
    """The shared 'nothing left' message; `available` is None when it could not be counted."""
    count = f" — {available} prompts available" if available is not None else ""
    fix = (
        f"add prompts to {source}"
        if available == 0
        else f"change {setting}.split to a slice within the available prompts"
    )
    return DatasetError(
        f"{setting}: the prompt set from {source} is empty after split {split_text!r}{count}; "
        f"{fix}."
    )


# --------------------------------------------------------------------------------------------
# Local files and folders
# --------------------------------------------------------------------------------------------


def is_local(dataset: str) -> bool:
    """Decide local vs hub without touching the network: existing paths and path-like values."""
    path = Path(dataset).expanduser()
    return (
        path.exists() or path.suffix.lower() in LOCAL_SUFFIXES or dataset.startswith(_PATH_PREFIXES)
    )


def _read_text(path: Path, setting: str) -> str:
    """Read a file as UTF-8 (BOM tolerated), turning decode/OS errors into actionable ones."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{setting}: {path} is not UTF-8 text ({exc}); save it as UTF-8."
        ) from exc
    except OSError as exc:
        raise DatasetError(f"{setting}: cannot read {path}: {exc}") from exc


def _read_txt(path: Path, setting: str) -> _Rows:
    return _rows_from_strings(f"file {path}", _read_text(path, setting).splitlines())


def _rows_from_json_value(data: Any, path: Path, setting: str) -> _Rows:
    """Accept a list of strings, a list of objects, or an object of equal-length columns."""
    source = f"file {path}"
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) <= 1:
            n = lengths.pop() if lengths else 0
            data = [{key: values[i] for key, values in data.items()} for i in range(n)]
    if isinstance(data, list):
        if not data:
            return _rows_from_strings(source, [])
        if all(isinstance(item, dict) for item in data):
            return _rows_from_records(source, data)
        if all(isinstance(item, str) or item is None for item in data):
            return _rows_from_strings(source, data)
    raise DatasetError(
        f"{setting}: {path} must hold a JSON list of strings or a list of objects "
        '(e.g. [{"text": "..."}]); mixed or other values cannot be used as prompts.'
    )


def _read_json(path: Path, setting: str) -> _Rows:
    try:
        data = json.loads(_read_text(path, setting))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{setting}: {path} is not valid JSON ({exc}); fix the file.") from exc
    return _rows_from_json_value(data, path, setting)


def _read_jsonl(path: Path, setting: str) -> _Rows:
    items: list[Any] = []
    for number, line in enumerate(_read_text(path, setting).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"{setting}: line {number} of {path} is not valid JSON ({exc}); "
                "JSON Lines files need one JSON object or string per line."
            ) from exc
    return _rows_from_json_value(items, path, setting)


def _read_csv(path: Path, setting: str) -> _Rows:
    text = _read_text(path, setting)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        records = [dict(row) for row in reader]
        columns = list(reader.fieldnames or [])
    except csv.Error as exc:
        raise DatasetError(f"{setting}: {path} is not valid CSV ({exc}); fix the file.") from exc
    # Columns come from the header even for a header-only file, so errors list them.
    rows = _rows_from_records(f"file {path}", records)
    rows.columns = columns
    rows.string_columns = columns
    return rows


def _parquet_records(path: Path) -> list[dict[str, Any]]:
    """Prefer pyarrow (no pandas needed); fall back to pandas, which may bring fastparquet."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pass
    else:
        return pq.read_table(path).to_pylist()
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("neither pyarrow nor pandas is installed") from None
    return pd.read_parquet(path).to_dict("records")


def _read_parquet(path: Path, setting: str) -> _Rows:
    try:
        records = _parquet_records(path)
    except ImportError as exc:
        raise DatasetError(
            f"{setting}: reading {path} needs a parquet engine ({exc}); run `pip install pyarrow`"
            " or convert the prompts to .txt, .json, .jsonl or .csv."
        ) from exc
    except Exception as exc:  # pyarrow/pandas raise many unrelated types for a bad file
        raise DatasetError(f"{setting}: cannot read parquet file {path}: {exc}") from exc
    return _rows_from_records(f"file {path}", records)


_READERS: dict[str, Callable[[Path, str], _Rows]] = {
    ".txt": _read_txt,
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def _read_folder(path: Path, split: SplitSlice, setting: str) -> _Rows:
    """A folder is either a `save_to_disk` dataset or a folder of data files for `datasets`."""
    import datasets

    try:
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
        else:
            loaded = datasets.load_dataset(str(path))
    except Exception as exc:  # `datasets` raises assorted types for unusable folders
        raise DatasetError(
            f"{setting}: cannot load folder {path} as a dataset ({type(exc).__name__}: {exc}). "
            "Point the setting at a folder saved with `save_to_disk`, a folder of data files, "
            f"or a single file ({', '.join(LOCAL_SUFFIXES)})."
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        name = _pick_split_name(list(loaded), split.name, path, setting)
        return _rows_from_dataset(f"folder {path} (split {name!r})", loaded[name])
    return _rows_from_dataset(f"folder {path}", loaded)


def _pick_split_name(names: list[str], wanted: str | None, path: Path, setting: str) -> str:
    """Use the named split; without a name, the only split or else 'train'."""
    if wanted is None and len(names) == 1:
        return names[0]
    name = wanted or "train"
    if name in names:
        return name
    raise DatasetError(
        f"{setting}: folder {path} has no split {name!r}; available splits: "
        f"{', '.join(repr(n) for n in names)}. Set {setting}.split to e.g. "
        f"'{names[0]}[:200]'."
    )


def _load_local(spec: DatasetSpecification, setting: str) -> list[str]:
    """Local file or folder; the split name is ignored for a single file (it has no splits)."""
    split = parse_split_for(setting, spec.split)
    path = Path(spec.dataset).expanduser()
    if not path.exists():
        kind = "file" if path.suffix.lower() in LOCAL_SUFFIXES else "path"
        raise DatasetError(
            f"{setting}: {kind} {spec.dataset} does not exist (looked for {path.absolute()}). "
            f"Fix {setting}.dataset so that it points at an existing file or folder."
        )
    if path.is_dir():
        rows = _read_folder(path, split, setting)
    else:
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise DatasetError(
                f"{setting}: {path} has an unsupported file type {path.suffix!r}; "
                f"use one of {', '.join(LOCAL_SUFFIXES)}."
            )
        rows = reader(path, setting)
    column = _choose_column(rows, spec.column, setting)
    prompts = list(_prompts_from_values(rows.read_column(column), setting, column, rows.source))
    return _select(prompts, split, spec.split, setting, rows.source)


# --------------------------------------------------------------------------------------------
# Hugging Face Hub
# --------------------------------------------------------------------------------------------


def _hub_error(spec: DatasetSpecification, setting: str, exc: Exception) -> DatasetError:
    """Explain a hub failure; offline use and local files are the usual ways out."""
    config = f", config {spec.config!r}" if spec.config else ""
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    network = (
        "HF_HUB_OFFLINE is set, so only the local cache is used and it lacks this set: run once "
        "with network access,"
        if offline
        else "without network access set HF_HUB_OFFLINE=1 to use only the local cache,"
    )
    return DatasetError(
        f"{setting}: cannot load dataset {spec.dataset!r}{config}, split {spec.split!r} from the "
        f"Hugging Face Hub ({type(exc).__name__}: {exc}). Check the dataset id, "
        f"{setting}.config and {setting}.split; {network} or set {setting}.dataset to a local "
        f"file ({', '.join(LOCAL_SUFFIXES)})."
    )


def _hub_call(spec: DatasetSpecification, setting: str, call: Callable[[], T]) -> T:
    """Run a hub operation, wrapping everything but our own errors.

    `datasets` and `huggingface_hub` raise many unrelated exception types (ConnectionError,
    DatasetNotFoundError, ValueError for a missing config, HTTP errors), and every one of them
    here means "this dataset/config/split cannot be fetched", so they are all wrapped.
    """
    try:
        return call()
    except DatasetError:
        raise
    except Exception as exc:
        raise _hub_error(spec, setting, exc) from exc


def _require_split_name(spec: DatasetSpecification, split: SplitSlice, setting: str) -> None:
    """Hub datasets have several splits, so unlike a local file the name cannot be implied."""
    if split.name is None:
        raise DatasetError(
            f"{setting}: split {spec.split!r} has no split name; hub datasets need one, "
            f"e.g. 'train{split.slice_text() or '[:200]'}'. Set {setting}.split accordingly."
        )


def _validate_hub_split(spec: DatasetSpecification, setting: str) -> list[SplitSlice]:
    """Check each '+'-joined part before any network call, so typos fail fast and clearly."""
    parts = [parse_split_for(setting, part) for part in spec.split.split("+")]
    for part in parts:
        _require_split_name(spec, part, setting)
    return parts


def check_hub_spec(spec: DatasetSpecification, setting: str, *, streaming: bool = False) -> None:
    """Everything about a hub prompt set that can be checked without the network: the id's
    form and the split, so that a typo in the last set is not found after the first downloads."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec.dataset)
    except HFValidationError as exc:
        raise DatasetError(
            f"{setting}: {spec.dataset!r} is neither a local file ({', '.join(LOCAL_SUFFIXES)}) "
            f"nor a Hugging Face dataset id ({exc}). Fix {setting}.dataset."
        ) from exc
    if streaming or spec.streaming:
        _streaming_split(spec, setting)
    else:
        _validate_hub_split(spec, setting)


def _load_hub(spec: DatasetSpecification, setting: str) -> list[str]:
    """Load via `datasets`, which understands split slices (and '+') natively."""
    import datasets

    parts = _validate_hub_split(spec, setting)
    source = f"dataset {spec.dataset!r}"
    dataset = _hub_call(
        spec,
        setting,
        lambda: datasets.load_dataset(spec.dataset, spec.config, split=spec.split),
    )
    rows = _rows_from_dataset(source, dataset)
    column = _choose_column(rows, spec.column, setting)
    prompts = list(_prompts_from_values(rows.read_column(column), setting, column, source))
    if not prompts:
        available = _count_hub_prompts(spec, parts, column, setting) if len(parts) == 1 else None
        raise _empty_error(setting, source, spec.split, available)
    return prompts


def _count_hub_prompts(
    spec: DatasetSpecification, parts: list[SplitSlice], column: str, setting: str
) -> int | None:
    """Count the whole split for the 'empty' message; it is cached by now, so this is cheap."""
    import datasets

    try:
        full = datasets.load_dataset(spec.dataset, spec.config, split=parts[0].name)
        source = f"dataset {spec.dataset!r}"
        return sum(1 for _ in _prompts_from_values(full[column], setting, column, source))
    except Exception:  # only used to improve a message that is being raised anyway
        return None


def _streaming_split(spec: DatasetSpecification, setting: str) -> SplitSlice:
    """The one split a streamed set reads, checked before any network call."""
    if "+" in spec.split:
        raise DatasetError(
            f"{setting}: split {spec.split!r} combines splits with '+', which streaming does not "
            f"support; set {setting}.split to a single split such as 'train[:200]'."
        )
    split = parse_split_for(setting, spec.split)
    _require_split_name(spec, split, setting)
    return split


def _load_hub_streaming(spec: DatasetSpecification, setting: str) -> list[str]:
    """Stream the base split and slice it here, since streaming datasets reject slice syntax.

    Slices with only non-negative absolute bounds stop reading as soon as they are satisfied;
    percent or negative bounds need the total, so the whole split is read first.
    """
    import datasets

    split = _streaming_split(spec, setting)
    source = f"dataset {spec.dataset!r}"
    stream = _hub_call(
        spec,
        setting,
        lambda: iter(
            datasets.load_dataset(spec.dataset, spec.config, split=split.name, streaming=True)
        ),
    )
    first = _hub_call(spec, setting, lambda: next(stream, None))
    if first is None:
        raise _empty_error(setting, source, spec.split, 0)
    column = _choose_column(_rows_from_records(source, [first]), spec.column, setting)
    records = _guard(itertools.chain([first], stream), spec, setting)
    prompts = _prompts_from_values((r.get(column) for r in records), setting, column, source)
    if split.needs_length:
        return _select(list(prompts), split, spec.split, setting, source)
    return _take(prompts, split, spec.split, setting, source)


def _take(
    prompts: Iterator[str], split: SplitSlice, split_text: str, setting: str, source: str
) -> list[str]:
    """Apply a non-negative absolute slice without reading past its end."""
    start, stop = split.start or 0, split.stop
    if stop is not None and stop <= start:
        raise _empty_error(setting, source, split_text, None)
    selected: list[str] = []
    count = 0
    for count, prompt in enumerate(prompts, start=1):
        if count > start:
            selected.append(prompt)
        if stop is not None and count >= stop:
            break
    if not selected:  # only when the stream ended before `start`, so `count` is the total
        raise _empty_error(setting, source, split_text, count)
    return selected


def _guard(records: Iterator[T], spec: DatasetSpecification, setting: str) -> Iterator[T]:
    """Streaming fetches lazily, so network errors surface mid-iteration; wrap them too."""
    while True:
        try:
            record = next(records)
        except StopIteration:
            return
        except DatasetError:
            raise
        except Exception as exc:
            raise _hub_error(spec, setting, exc) from exc
        yield record


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def load_prompts(spec: DatasetSpecification, setting: str, *, streaming: bool = False) -> list[str]:
    """Load the prompts described by `spec`; `setting` (e.g. "bad_prompts") names it in errors.

    `streaming` (or `spec.streaming`) only affects hub datasets: it avoids downloading a large
    split when only a leading slice is wanted. Local files are always read whole.
    """
    if is_local(spec.dataset):
        return _load_local(spec, setting)
    if streaming or spec.streaming:
        return _load_hub_streaming(spec, setting)
    return _load_hub(spec, setting)
