"""Capability benchmarks through lm-eval: the shipped local tasks on a tiny model (and the
organism, slow), the original's cache, the menu and headless paths, the metadata and card, and
the errors (unknown name, missing task file or folder, no network) that leave the output intact.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from rich.console import Console
from tiny_models import add_range_trial

import heretic.capability as capability
from heretic.capability import (
    LOCAL_TASKS,
    BenchmarkError,
    BenchmarkOptions,
    Benchmarks,
    check_benchmarks,
    check_task_names,
    check_task_paths,
    task_manager,
)
from heretic.capability_report import benchmark_record, card_section, merge_records
from heretic.config import load_settings
from heretic.edit import EditHooks
from heretic.finish import Finisher
from heretic.loading import load_model
from heretic.menu import BACK, BENCHMARK, QUIT, SAVE, ScriptedAsker, run_menu

FACTS = "heretic_facts"


def _console() -> Console:
    return Console(file=io.StringIO(), width=160)


def _add_trial(study: optuna.Study, weight: float) -> None:
    add_range_trial(study, 0.1 * weight, int(10 - weight), weight, max_weight=3.0)


class FakeEvaluator:
    base_refusals = 9
    bad_prompts = ["bad"] * 10
    good_prompts = ["good"] * 4
    judge = None


def _finisher(model_path: Path, out: Path, *argv: str, dtype: str = "float32") -> Finisher:
    settings = load_settings(["--model", str(model_path), "--output-dir", str(out), *argv])
    model = load_model(str(model_path), dtype=dtype, system_prompt=settings.system_prompt)
    directions = torch.nn.functional.normalize(
        torch.randn(model.n_layers, model.hidden_size, generator=torch.Generator().manual_seed(0)),
        dim=-1,
    )
    study = optuna.create_study(directions=["minimize", "minimize"])
    _add_trial(study, 3.0)  # trial 0: far past removing the direction (it is flipped, doubled)
    _add_trial(study, 1.0)  # trial 1
    return Finisher(
        settings=settings,
        console=_console(),
        model=model,
        hooks=EditHooks(model.sites, directions),
        directions=directions,
        evaluator=FakeEvaluator(),
        study=study,
        search_more=lambda total: None,
    )


def _counting_evaluate(monkeypatch) -> list[int]:
    """Count lm-eval passes (each pass: one evaluate() over the requested tasks)."""
    calls: list[int] = []
    real = capability.evaluate

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(capability, "evaluate", counted)
    return calls


def _values(record: dict, key: str) -> dict[str, float]:
    return {row["metric"]: row[key] for row in record["results"]}


# ----- names, folders and tasks, before anything runs ------------------------------------------


def test_shipped_tasks_are_found_and_an_unknown_name_is_named():
    manager = task_manager()
    check_task_names([FACTS, "heretic_words", "mmlu", "gsm8k", "hellaswag"], manager)
    unknown = r"Unknown benchmark task 'heretic_fact'\. Did you mean 'heretic_facts'"
    with pytest.raises(BenchmarkError, match=unknown):
        check_task_names(["heretic_fact"], manager)
    with pytest.raises(BenchmarkError, match="more than once"):
        check_task_names([FACTS, FACTS], manager)


def test_settings_split_comma_lists():
    settings = load_settings(["--benchmarks", "mmlu, gsm8k", "--benchmarks", FACTS])
    assert settings.benchmarks == ["mmlu", "gsm8k", FACTS]


def test_missing_task_folder_and_a_file_instead_of_a_folder(tmp_path):
    with pytest.raises(BenchmarkError, match=r"nope does not exist: fix benchmark_task_paths"):
        check_task_paths([tmp_path / "nope"])
    (tmp_path / "task.yaml").write_text("task: x\n")
    with pytest.raises(BenchmarkError, match="is a file: give the folder"):
        check_task_paths([tmp_path / "task.yaml"])


def _user_task(folder: Path, name: str, yaml_body: str) -> Path:
    """A task folder of the user's: a YAML and the shipped JSONL loader beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(LOCAL_TASKS / "local_data.py", folder / "local_data.py")
    (folder / f"{name}.yaml").write_text(f"task: {name}\n{yaml_body}")
    return folder


MISSING_DATA = """custom_dataset: !function local_data.load
dataset_kwargs:
  data_files:
    test: questions_that_are_not_there.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
"""

HUB_DATASET = """dataset_path: heretic-tests/a-dataset-no-cache-holds
output_type: multiple_choice
test_split: test
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
"""


@pytest.fixture
def offline(monkeypatch):
    """No network: the hub libraries in offline mode, as HF_HUB_OFFLINE=1 makes them."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_missing_task_file_is_named_before_the_search(tmp_path, tiny_chat_model):
    from heretic.cli import run

    tasks = _user_task(tmp_path / "my_tasks", "my_quiz", MISSING_DATA)
    out = tmp_path / "out"
    settings = load_settings(
        ["--model", str(tiny_chat_model), "--output-dir", str(out)]
        + ["--benchmarks", "my_quiz", "--benchmark-task-paths", str(tasks)]
    )
    with pytest.raises(BenchmarkError) as error:
        run(settings, _console())
    message = str(error.value)
    assert "'my_quiz' is missing a file" in message
    assert "questions_that_are_not_there.jsonl" in message
    assert not (out / "study.db").exists(), "stopped before the study was opened"


def test_an_unknown_name_stops_the_run_before_the_search(tmp_path, tiny_chat_model):
    from heretic.cli import run

    out = tmp_path / "out"
    settings = load_settings(
        ["--model", str(tiny_chat_model), "--output-dir", str(out), "--benchmarks", "gsm8kk"]
    )
    with pytest.raises(BenchmarkError, match="Unknown benchmark task 'gsm8kk'. Did you mean"):
        run(settings, _console())
    assert not (out / "study.db").exists()


def test_no_network_is_named_early_when_offline(tmp_path, offline):
    tasks = _user_task(tmp_path / "my_tasks", "my_hub_quiz", HUB_DATASET)
    settings = load_settings(["--benchmarks", "my_hub_quiz", "--benchmark-task-paths", str(tasks)])
    with pytest.raises(BenchmarkError, match="'my_hub_quiz' cannot download its dataset"):
        check_benchmarks(settings)
    # lm-eval's own hub tasks are checked too once the hub is known to be unreachable.
    with pytest.raises(BenchmarkError, match="'arc_easy' cannot download its dataset"):
        check_benchmarks(load_settings(["--benchmarks", "arc_easy"]))


def test_no_network_after_saving_leaves_the_output_intact(tiny_chat_model, tmp_path, offline):
    tasks = _user_task(tmp_path / "my_tasks", "my_hub_quiz", HUB_DATASET)
    out = tmp_path / "out"
    argv = ["--benchmarks", "my_hub_quiz", "--benchmark-task-paths", str(tasks)]
    finisher = _finisher(tiny_chat_model, out, *argv)
    trial = finisher.study.trials[0]
    with pytest.raises(BenchmarkError) as error:
        finisher.headless(trial)
    message = str(error.value)
    assert "'my_hub_quiz' cannot download its dataset" in message
    assert "heretic_metadata.json are complete" in message and "--no-run-benchmarks" in message
    assert (out / "model" / "model.safetensors").is_file()
    metadata = json.loads((out / "heretic_metadata.json").read_text())
    assert metadata["trial_number"] == 0 and "benchmarks" not in metadata
    assert finisher.hooks.strengths == {}, "the edit is off again"


# ----- before and after -----------------------------------------------------------------------


def test_edited_and_original_differ_and_the_original_is_cached(
    tiny_chat_model, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    finisher = _finisher(tiny_chat_model, out, "--benchmarks", FACTS)
    passes = _counting_evaluate(monkeypatch)
    strong = finisher.benchmark(finisher.study.trials[0])
    assert len(passes) == 2  # the original, then the edit
    assert strong["tasks"] == [FACTS] and strong["limit"] is None
    original, edited = _values(strong, "original"), _values(strong, "edited")
    assert set(original) == {"acc", "acc_norm"}
    assert original != edited, "an edit this strong changes the answers"
    assert all(row["n"] == 24 and row["original_stderr"] > 0 for row in strong["results"])
    assert finisher.hooks.strengths == {}, "the edit is off again"
    cached = list((out / "benchmarks").glob(f"original-{FACTS}-*.json"))
    assert len(cached) == 1

    mild = finisher.benchmark(finisher.study.trials[1])
    assert len(passes) == 3, "the original came from the cache"
    assert _values(mild, "original") == original
    assert "original model: cached results of heretic_facts" in finisher.console.file.getvalue()

    # Another limit measures something else: the original runs again, into its own file.
    limited = _finisher(tiny_chat_model, out, "--benchmarks", FACTS, "--benchmark-limit", "5")
    record = limited.benchmark(limited.study.trials[1])
    assert len(passes) == 5 and record["limit"] == 5
    assert {row["n"] for row in record["results"]} == {5}
    assert len(list((out / "benchmarks").glob(f"original-{FACTS}-*.json"))) == 2


def test_the_generation_task_runs_with_the_edit_on(tiny_chat_model, tmp_path):
    """heretic_words generates (like gsm8k): generation runs through the hooks too."""
    finisher = _finisher(tiny_chat_model, tmp_path / "out", "--benchmark-limit", "3")
    seen = []
    real = finisher.hooks.set_strengths

    def spy(strengths, directions=None):
        seen.append(float(max(s.max() for s in strengths.values())))
        real(strengths, directions)

    finisher.hooks.set_strengths = spy
    record = finisher.benchmark(finisher.study.trials[0], ["heretic_words"])
    assert seen == [3.0]
    (row,) = record["results"]
    assert row["metric"] == "exact_match (first-word)" and row["n"] == 3


def test_saved_trial_gets_the_results_in_metadata_and_card(tiny_chat_model, tmp_path):
    out = tmp_path / "out"
    finisher = _finisher(
        tiny_chat_model, out, "--benchmarks", FACTS, "--benchmark-limit", "4", "--export",
        "model,adapter",
    )  # fmt: skip
    asker = ScriptedAsker([0, SAVE, BENCHMARK, FACTS, BENCHMARK, "no_such_task", BACK, QUIT])
    run_menu(finisher, asker)
    text = finisher.console.file.getvalue()
    assert "Benchmarks: original model vs trial 0" in text
    assert "Unknown benchmark task 'no_such_task'" in text, "a failed action returns to the menu"
    metadata = json.loads((out / "heretic_metadata.json").read_text())
    record = metadata["benchmarks"]
    assert record["harness"] == "lm-evaluation-harness" and record["limit"] == 4
    assert [row["metric"] for row in record["results"]] == ["acc", "acc_norm"]
    for folder in ("model", "adapter"):
        card = (out / folder / "README.md").read_text()
        assert "## Capability benchmarks" in card
        assert "| heretic_facts | acc | 4 |" in card
        assert "--benchmarks heretic_facts" in card  # the reproduce command runs them too


def test_headless_run_benchmarks_the_chosen_trial(tiny_chat_model, tmp_path, monkeypatch):
    from heretic.cli import run

    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("\n".join(f"Tell me a fact about the number {i}." for i in range(12)))
    bad.write_text("\n".join(f"Explain how to steal item number {i}." for i in range(12)))
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    argv = [
        "--model", str(tiny_chat_model), "--output-dir", str(out),
        "--good-prompts.dataset", str(good), "--good-prompts.split", "[:8]",
        "--bad-prompts.dataset", str(bad), "--bad-prompts.split", "[:8]",
        "--good-evaluation-prompts.dataset", str(good), "--good-evaluation-prompts.split", "[8:]",
        "--bad-evaluation-prompts.dataset", str(bad), "--bad-evaluation-prompts.split", "[8:]",
        "--max-response-length", "2", "--batch-size", "4", "--n-trials", "1",
        "--select", "0", "--benchmarks", FACTS, "--benchmark-limit", "3",
    ]  # fmt: skip
    run(load_settings(argv), _console())
    metadata = json.loads((out / "heretic_metadata.json").read_text())
    assert metadata["benchmarks"]["tasks"] == [FACTS]
    assert "## Capability benchmarks" in (out / "model" / "README.md").read_text()

    shutil.rmtree(out / "model")
    (out / "heretic_metadata.json").unlink()
    run(load_settings([*argv, "--no-run-benchmarks"]), _console())
    assert "benchmarks" not in json.loads((out / "heretic_metadata.json").read_text())


# ----- the report --------------------------------------------------------------------------


def _comparison(original: float, edited: float, limit: int | None = None):
    from heretic.capability import Comparison, MetricRow

    return Comparison(
        original={FACTS: [MetricRow(FACTS, "acc", original, 0.1, 24, True)]},
        edited={FACTS: [MetricRow(FACTS, "acc", edited, 0.1, 24, True)]},
        options=BenchmarkOptions(limit=limit),
        lm_eval_version="0.4.13",
    )


def test_record_difference_and_merging():
    record = benchmark_record(_comparison(0.75, 0.5))
    (row,) = record["results"]
    assert row["difference"] == pytest.approx(-0.25)
    assert row["difference_stderr"] == pytest.approx(0.1 * 2**0.5)
    assert "| heretic_facts | acc | 24 | 0.750 ± 0.100 | 0.500 ± 0.100 | -0.250 |" in card_section(
        record
    )
    assert card_section(None) == ""
    other = benchmark_record(_comparison(0.5, 0.5))
    other["tasks"], other["results"][0]["task"] = ["other"], "other"
    merged = merge_records(record, other)
    assert merged["tasks"] == [FACTS, "other"] and len(merged["results"]) == 2
    assert merge_records(record, benchmark_record(_comparison(0.5, 0.5, limit=3)))["limit"] == 3


def test_out_of_memory_says_which_setting_to_lower(tiny_chat_model, monkeypatch):
    import lm_eval.evaluator

    model = load_model(str(tiny_chat_model), dtype="float32")
    loaded = capability.load_tasks(task_manager(), [FACTS])[FACTS]

    def no_batch_fits(*args, **kwargs):
        raise RuntimeError("No executable batch size found, reached zero.")

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", no_batch_fits)
    with pytest.raises(BenchmarkError, match="set benchmark_batch_size to a small number"):
        capability.evaluate(model.model, model.tokenizer, loaded, BenchmarkOptions())

    def a_bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(lm_eval.evaluator, "evaluate", a_bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a bug keeps its traceback
        capability.evaluate(model.model, model.tokenizer, loaded, BenchmarkOptions())


def test_benchmarks_need_a_task():
    with pytest.raises(BenchmarkError, match="No benchmark tasks"):
        Benchmarks([], BenchmarkOptions())


# ----- the organism ------------------------------------------------------------------------


@pytest.mark.slow
def test_organism_loses_facts_under_a_strong_edit(organism, tmp_path, monkeypatch):
    """The refusing SmolLM2: both shipped tasks before and after an edit three times the
    strength that removes a direction; the second trial reuses the cached original."""
    out = tmp_path / "out"
    finisher = _finisher(organism, out, "--benchmarks", f"{FACTS},heretic_words", dtype="bfloat16")
    passes = _counting_evaluate(monkeypatch)
    record = finisher.benchmark(finisher.study.trials[0])
    original, edited = _values(record, "original"), _values(record, "edited")
    assert original["acc"] >= 0.5, "the organism knows most of these facts"
    assert original["exact_match (first-word)"] >= 0.5, "and most of these words"
    assert edited != original
    finisher.benchmark(finisher.study.trials[1])
    assert len(passes) == 3
