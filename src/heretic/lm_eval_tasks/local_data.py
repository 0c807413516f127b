"""Loader for lm-eval tasks whose data are JSON Lines files next to their YAML.

lm-eval's own `dataset_path: json` reads `data_files` relative to the current folder, so a
task shipped in a package (or kept in a folder of your own) could not find its data. A task
YAML names this function as its `custom_dataset` (`!function local_data.load`) and its files
as `dataset_kwargs: {data_files: {SPLIT: FILE.jsonl}}`, relative to this file's folder; copy
this file next to your own task YAMLs to do the same (docs/capability.md).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {number}: not JSON ({e})") from e
    if not rows:
        raise ValueError(f"{path} holds no rows")
    return rows


def load(data_files: dict[str, str] | None = None, **_metadata):
    """{split: Dataset} from JSON Lines files; relative paths are taken from this folder."""
    import datasets

    if not data_files:
        raise ValueError("the task YAML names no data_files under dataset_kwargs")
    splits = {}
    for split, name in data_files.items():
        path = Path(name).expanduser()
        path = path if path.is_absolute() else HERE / path
        if not path.is_file():
            raise FileNotFoundError(f"data file {path} of split {split!r} does not exist")
        splits[split] = datasets.Dataset.from_list(read_jsonl(path))
    return datasets.DatasetDict(splits)
