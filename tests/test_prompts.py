"""Tests for loading prompt sets: local formats, column choice, split slices, and errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import datasets
import pytest

from heretic.config import DatasetSpecification
from heretic.errors import DatasetError
from heretic.prompts import load_prompts
from heretic.splits import SplitSlice, parse_split

SETTING = "bad_prompts"
TEXT_FEATURES = datasets.Features({"text": datasets.Value("string")})
PROMPTS = [f"prompt {i}" for i in range(10)]


def spec(dataset: Path | str, split: str = "train", column: str | None = None, **kw):
    return DatasetSpecification(dataset=str(dataset), split=split, column=column, **kw)


def load(dataset: Path | str, split: str = "train", column: str | None = None, **kw) -> list[str]:
    streaming = kw.pop("streaming", False)
    return load_prompts(spec(dataset, split, column, **kw), SETTING, streaming=streaming)


def load_error(dataset: Path | str, split: str = "train", column: str | None = None, **kw) -> str:
    """Load expecting a DatasetError; every such message must name the setting."""
    with pytest.raises(DatasetError) as info:
        load(dataset, split, column, **kw)
    message = str(info.value)
    assert message.startswith(f"{SETTING}: "), message
    return message


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.fixture
def txt(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local loading must never reach the hub; fail loudly if it tries."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected hub call {args} {kwargs}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


# -- parse_split ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("train", SplitSlice("train")),
        ("", SplitSlice(None)),
        ("[270:370]", SplitSlice(None, 270, 370)),
        ("[:200]", SplitSlice(None, None, 200)),
        ("[5:]", SplitSlice(None, 5, None)),
        ("[:]", SplitSlice(None)),
        ("train[:200]", SplitSlice("train", None, 200)),
        ("test-v2[-10:-2]", SplitSlice("test-v2", -10, -2)),
        ("train[:10%]", SplitSlice("train", None, 10, percent=True)),
        ("[-20%:]", SplitSlice(None, -20, None, percent=True)),
        (" [ 1 : 3 ] ", SplitSlice(None, 1, 3)),
    ],
)
def test_parse_split_accepts(split: str, expected: SplitSlice) -> None:
    assert parse_split(split) == expected


@pytest.mark.parametrize(
    ("split", "reason"),
    [
        ("[a:b]", "not an integer"),
        ("[1:2", "unbalanced"),
        ("[::2]", "step"),
        ("[5]", "colon"),
        ("[10%:20]", "mix"),
        ("[:150%]", "outside"),
        ("train+test", "combining"),
        ("train[1:2]x", "expected"),
    ],
)
def test_parse_split_rejects(split: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_split(split)


def test_percent_slice_rounds_like_datasets() -> None:
    # `datasets` rounds percent bounds to the closest index: 15% of 10 is 1.5 -> 2.
    assert parse_split("[:15%]").apply(list(range(10))) == [0, 1]
    assert parse_split("[-30%:]").apply(list(range(10))) == [7, 8, 9]
    assert parse_split("[10%:20%]").resolve(200) == slice(20, 40)


# -- formats ----------------------------------------------------------------------------------


def test_txt_strips_and_drops_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("\ufeff  first  \n\n   \nsecond\r\nthird", encoding="utf-8")
    assert load(path) == ["first", "second", "third"]


def test_json_list_of_strings(tmp_path: Path) -> None:
    assert load(write_json(tmp_path / "p.json", ["a", " b ", "", None])) == ["a", "b"]


def test_json_list_of_objects_uses_instruction(tmp_path: Path) -> None:
    rows = [{"instruction": "do x", "output": "y"}, {"instruction": "do z", "output": "w"}]
    assert load(write_json(tmp_path / "p.json", rows)) == ["do x", "do z"]


def test_json_custom_column(tmp_path: Path) -> None:
    rows = [{"goal": "g1", "target": "t1"}, {"goal": "g2", "target": "t2"}]
    assert load(write_json(tmp_path / "p.json", rows), column="target") == ["t1", "t2"]


def test_json_columnar_object(tmp_path: Path) -> None:
    data = {"text": ["a", "b"], "label": [0, 1]}
    assert load(write_json(tmp_path / "p.json", data)) == ["a", "b"]


def test_jsonl_objects_and_strings(tmp_path: Path) -> None:
    objects = tmp_path / "o.jsonl"
    objects.write_text('{"text": "a"}\n\n{"text": "b", "n": 1}\n{"n": 2}\n', encoding="utf-8")
    assert load(objects) == ["a", "b"]
    strings = tmp_path / "s.jsonl"
    strings.write_text('"x"\n"y"\n', encoding="utf-8")
    assert load(strings) == ["x", "y"]


def test_csv_with_header_and_multiline_cell(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('id,text\n1,hello\n2,"two\nlines"\n3,\n', encoding="utf-8")
    assert load(path) == ["hello", "two\nlines"]
    assert load(path, column="id") == ["1", "2", "3"]


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", None, "b"], "n": [1, 2, 3]}), path)
    assert load(path) == ["a", "b"]
    assert load(path, column="n", split="[1:]") == ["2", "3"]


def test_parquet_without_engine_says_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1")
    for module in ("pyarrow", "pyarrow.parquet", "pandas"):
        monkeypatch.setitem(sys.modules, module, None)
    assert "pip install pyarrow" in load_error(path)


def test_saved_dataset_folder(tmp_path: Path) -> None:
    data = datasets.Dataset.from_dict({"instruction": ["a", "b", "c"]})
    datasets.DatasetDict({"train": data, "test": data.select([2])}).save_to_disk(tmp_path / "d")
    assert load(tmp_path / "d", split="train[1:]") == ["b", "c"]
    assert load(tmp_path / "d", split="test") == ["c"]
    assert "'train', 'test'" in load_error(tmp_path / "d", split="validation")


# -- column choice ----------------------------------------------------------------------------


def test_default_column_prefers_text_over_instruction(tmp_path: Path) -> None:
    rows = [{"instruction": "i", "text": "t"}]
    assert load(write_json(tmp_path / "p.json", rows)) == ["t"]


def test_default_column_single_string_column(tmp_path: Path) -> None:
    rows = [{"id": 1, "prompt": "p1", "meta": {"a": 1}}, {"id": 2, "prompt": "p2"}]
    assert load(write_json(tmp_path / "p.json", rows)) == ["p1", "p2"]


def test_default_column_ambiguous_lists_columns(tmp_path: Path) -> None:
    rows = [{"goal": "g", "target": "t"}]
    message = load_error(write_json(tmp_path / "p.json", rows))
    assert "'goal', 'target'" in message and f"{SETTING}.column" in message


def test_unknown_column_lists_columns(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("goal,target\ng,t\n", encoding="utf-8")
    message = load_error(path, column="prompt")
    assert "'prompt'" in message and "'goal', 'target'" in message


def test_non_text_values_are_an_error(tmp_path: Path) -> None:
    rows = [{"text": ["a", "b"]}]
    assert "list" in load_error(write_json(tmp_path / "p.json", rows))


# -- splits on local files --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("train", PROMPTS),
        ("train[:2]", PROMPTS[:2]),
        ("[1:3]", PROMPTS[1:3]),
        ("test[8:]", PROMPTS[8:]),
        ("[-3:]", PROMPTS[-3:]),
        ("[2:-6]", PROMPTS[2:-6]),
        ("train[:20%]", PROMPTS[:2]),
        ("[-10%:]", PROMPTS[-1:]),
        ("[:100]", PROMPTS),
    ],
)
def test_local_split_slices(txt: Path, split: str, expected: list[str]) -> None:
    assert load(txt, split=split) == expected


# -- errors -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nope" / "bad.txt")
    assert "bad.txt does not exist" in message and f"{SETTING}.dataset" in message


def test_missing_relative_path_is_not_a_hub_lookup(tmp_path: Path) -> None:
    # Known suffix or ./ prefix means local, even though "data/bad.txt" looks like a hub id.
    assert "does not exist" in load_error("data/bad.txt")
    assert "does not exist" in load_error("./data/prompts")


def test_empty_after_split(txt: Path) -> None:
    message = load_error(txt, split="[20:30]")
    assert "empty after split '[20:30]'" in message and "10 prompts available" in message


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_text("\n \n", encoding="utf-8")
    assert "0 prompts available" in load_error(path)


@pytest.mark.parametrize("split", ["[a:b]", "[1:2", "[::2]", "train[x]"])
def test_bad_slice(txt: Path, split: str) -> None:
    message = load_error(txt, split=split)
    assert repr(split) in message and "[270:370]" in message


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "p.tsv"
    path.write_text("a\n", encoding="utf-8")
    assert ".tsv" in load_error(path)


def test_invalid_json_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text("[1,", encoding="utf-8")
    assert "not valid JSON" in load_error(tmp_path / "p.json")
    (tmp_path / "p.jsonl").write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    assert "line 2" in load_error(tmp_path / "p.jsonl")
    assert "list of strings" in load_error(write_json(tmp_path / "m.json", ["a", {"b": 1}]))


# -- hub ----------------------------------------------------------------------------------------


def test_hub_failure_is_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'org/prompts' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    for streaming in (False, True):
        message = load_error("org/prompts", split="train[:5]", streaming=streaming)
        assert "'org/prompts'" in message and "HF_HUB_OFFLINE" in message
        assert "local file" in message


def test_hub_passes_split_through(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []

    def fake(path: str, name: str | None = None, *, split: str) -> datasets.Dataset:
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"goal": ["a", "", "b"], "n": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert load("org/prompts", split="train[:3]+test", config="en") == ["a", "b"]
    assert calls == [("org/prompts", "en", "train[:3]+test")]


def test_hub_empty_slice_counts_the_whole_split(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(path: str, name: str | None = None, *, split: str) -> datasets.Dataset:
        texts = ["a", "b", "c"] if split == "train" else []
        return datasets.Dataset.from_dict({"text": texts}, features=TEXT_FEATURES)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    message = load_error("org/prompts", split="train[5:]")
    assert "'org/prompts'" in message and "3 prompts available" in message


def test_hub_bad_split_fails_before_network() -> None:
    # The autouse fixture makes any hub call fail the test.
    assert "[270:370]" in load_error("org/prompts", split="train[a:b]")
    assert "split name" in load_error("org/prompts", split="[:200]")


class FakeStream:
    """Stands in for an IterableDataset; records how many rows were read."""

    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows, self.read = rows, 0

    def __iter__(self):
        for row in self.rows:
            self.read += 1
            yield row


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> FakeStream:
    rows = [{"instruction": p, "id": i} for i, p in enumerate(PROMPTS)]
    rows.insert(3, {"instruction": "  ", "id": -1})
    fake = FakeStream(rows)

    def fake_load(path: str, name: str | None = None, *, split: str, streaming: bool):
        assert (path, split, streaming) == ("org/prompts", "train", True)
        return fake

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    return fake


def test_streaming_takes_slice_without_reading_everything(stream: FakeStream) -> None:
    assert load("org/prompts", split="train[2:4]", streaming=True) == PROMPTS[2:4]
    assert stream.read == 5  # four prompts plus the blank row, nothing beyond the slice


@pytest.mark.parametrize(
    ("split", "expected"),
    [("train", PROMPTS), ("train[-2:]", PROMPTS[-2:]), ("train[:30%]", PROMPTS[:3])],
)
def test_streaming_slices(stream: FakeStream, split: str, expected: list[str]) -> None:
    assert load("org/prompts", split=split, streaming=True) == expected


def test_streaming_custom_column_and_empty(stream: FakeStream) -> None:
    assert load("org/prompts", split="train[:2]", column="id", streaming=True) == ["0", "1"]
    message = load_error("org/prompts", split="train[50:]", streaming=True)
    assert "10 prompts available" in message
    assert "'+'" in load_error("org/prompts", split="train+test", streaming=True)


def test_streaming_error_during_iteration(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken():
        yield {"text": "a"}
        raise ConnectionError("connection reset")

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: broken())
    message = load_error("org/prompts", split="train[:5]", streaming=True)
    assert "connection reset" in message and "'org/prompts'" in message
