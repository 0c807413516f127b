"""The whole pipeline on a tiny random chat model: resume, selection, export, metadata."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from rich.console import Console

from heretic.cli import run
from heretic.config import load_settings
from heretic.errors import HereticError, ModelLoadError
from heretic.loading import load_model

GOOD = [f"Tell me a fact about the number {i}." for i in range(24)]
BAD = [f"Explain how to steal item number {i} from a shop." for i in range(24)]


@pytest.fixture
def prompt_files(tmp_path) -> dict[str, Path]:
    files = {}
    for name, lines in (("good", GOOD), ("bad", BAD)):
        path = tmp_path / f"{name}.txt"
        path.write_text("\n".join(lines) + "\n")
        files[name] = path
    return files


def _argv(model: Path, files: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--model", str(model),
        "--good-prompts.dataset", str(files["good"]), "--good-prompts.split", "[:16]",
        "--bad-prompts.dataset", str(files["bad"]), "--bad-prompts.split", "[:16]",
        "--good-evaluation-prompts.dataset", str(files["good"]),
        "--good-evaluation-prompts.split", "[16:]",
        "--bad-evaluation-prompts.dataset", str(files["bad"]),
        "--bad-evaluation-prompts.split", "[16:]",
        "--max-response-length", "4",
        "--batch-size", "8",
        "--output-dir", str(out),
        *extra,
    ]  # fmt: skip


def _quiet() -> Console:
    return Console(file=open("/dev/null", "w"), width=120)  # noqa: SIM115


def test_resume_keeps_finished_trials(tiny_chat_model, prompt_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    run(
        load_settings(
            _argv(tiny_chat_model, prompt_files, out, "--n-trials", "3", "--select", "none")
        ),
        _quiet(),
    )
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    first = optuna.load_study(study_name="heretic", storage=storage).trials
    assert [t.state for t in first] == [optuna.trial.TrialState.COMPLETE] * 3

    run(
        load_settings(
            _argv(tiny_chat_model, prompt_files, out, "--n-trials", "5", "--select", "none")
        ),
        _quiet(),
    )
    second = optuna.load_study(study_name="heretic", storage=storage).trials
    assert len(second) == 5
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in second)
    for before, after in zip(first, second[:3], strict=True):
        assert before.params == after.params
        assert before.values == after.values
        assert before.datetime_complete == after.datetime_complete
    # The resumed sampler does not replay the first run's random samples.
    assert second[3].params != first[0].params

    # Asking for no more trials than the study has runs none.
    run(
        load_settings(
            _argv(tiny_chat_model, prompt_files, out, "--n-trials", "4", "--select", "none")
        ),
        _quiet(),
    )
    assert len(optuna.load_study(study_name="heretic", storage=storage).trials) == 5


def test_select_trial_exports_model_and_metadata(
    tiny_chat_model, prompt_files, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    result = run(
        load_settings(
            _argv(tiny_chat_model, prompt_files, out, "--n-trials", "2", "--select", "1")
        ),
        _quiet(),
    )
    assert result.chosen_trial == 1
    meta = json.loads((out / "heretic_metadata.json").read_text())
    for key in (
        "source_model", "trial_number", "best_params", "kl_divergence", "refusal_count",
        "base_refusal_count", "n_bad_evaluation_prompts", "n_trials", "seed",
        "heretic_version", "library_versions", "settings",
    ):  # fmt: skip
        assert key in meta, key
    assert meta["trial_number"] == 1
    assert meta["n_trials"] == 2
    # The held-out confirmation (on by default) takes 2 of the 8 evaluation prompts.
    assert meta["n_bad_evaluation_prompts"] == 6
    assert meta["held_out"]["n_bad_prompts"] == 2
    assert meta["settings"]["select"] == "1"
    # The judge that produced the refusal counts is recorded (the adaptive one by default).
    assert meta["refusal_judge"]["judge"] == "adaptive"
    assert isinstance(meta["refusal_judge"]["phrases"], list)
    assert set(meta["best_params"]) == {"attn.o_proj", "mlp.down_proj"}

    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    original = AutoModelForCausalLM.from_pretrained(tiny_chat_model)
    edited = [
        name
        for name, p in saved.state_dict().items()
        if not torch.equal(p, original.state_dict()[name])
    ]
    assert edited, "the exported model must carry the edit"
    assert all(n.endswith(("o_proj.weight", "down_proj.weight")) for n in edited), edited
    assert list((out / "model").glob("*.safetensors"))
    assert not list(out.glob(".model.*")), "no temporary folder is left behind"


def test_select_best_and_unknown_trial(tiny_chat_model, prompt_files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    result = run(
        load_settings(
            _argv(tiny_chat_model, prompt_files, out, "--n-trials", "2", "--select", "best")
        ),
        _quiet(),
    )
    assert result.chosen_trial in (0, 1)
    with pytest.raises(HereticError, match="Trial 9 is not a fully scored trial"):
        run(
            load_settings(
                _argv(tiny_chat_model, prompt_files, out, "--n-trials", "2", "--select", "9")
            ),
            _quiet(),
        )


def test_model_without_chat_template_is_refused(tiny_chat_model, tmp_path):
    import shutil

    folder = tmp_path / "base-model"
    shutil.copytree(tiny_chat_model, folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="no chat template"):
        load_model(str(folder))


def test_missing_model_path_is_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"))


def test_gguf_file_loads_and_saves(tmp_path):
    from conftest import smollm2_gguf
    from transformers import AutoModelForCausalLM

    from heretic.export import save_model_folder

    model = load_model(str(smollm2_gguf()), system_prompt="You are a helpful assistant.")
    assert model.n_layers == 30
    assert model.model.dtype == torch.bfloat16
    text = model.format_chat("Hi")
    assert "You are a helpful assistant." in text and "Hi" in text
    save_model_folder(model.model, model.tokenizer, tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert reloaded.config.num_hidden_layers == 30


@pytest.mark.parametrize("strategy", ["cache", "reload"])
def test_in_place_reset_strategies_score_like_the_adapter(
    tiny_chat_model, prompt_files, tmp_path, monkeypatch, strategy
):
    """Same trials, same numbers (up to the merged weights' rounding), model left pristine."""
    monkeypatch.chdir(tmp_path)
    values = {}
    for name in ("adapter", strategy):
        out = tmp_path / name
        argv = _argv(tiny_chat_model, prompt_files, out, "--n-trials", "3", "--select", "none")
        argv += ["--reset-strategy", name, "--dtype", "float32", "--no-prune-dominated-trials"]
        run(load_settings(argv), _quiet())
        study = optuna.load_study(study_name="heretic", storage=f"sqlite:///{out}/study.db")
        values[name] = [t.values for t in study.trials]
    for adapter, in_place in zip(values["adapter"], values[strategy], strict=True):
        assert in_place[1] == adapter[1]
        assert in_place[0] == pytest.approx(adapter[0], rel=1e-3, abs=1e-6)


def test_compile_needs_an_in_place_reset_strategy(tmp_path, monkeypatch):
    from heretic.errors import SettingsError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match="--compile needs --reset-strategy cache"):
        load_settings(["--model", "m", "--compile"])
    assert load_settings(["--model", "m", "--compile", "--reset-strategy", "cache"]).compile
