"""The demo's command line: its settings, and `evaluate` on its output."""

from __future__ import annotations

from pathlib import Path

import pytest

from heretic import demo


def test_demo_settings_put_the_users_options_last():
    settings = demo.demo_settings(Path("/organism"), ["--n-trials", "3"])
    assert settings.model == "/organism" and settings.n_trials == 3
    assert settings.bad_evaluation_prompts.split == "[200:280]"
    assert not settings.evaluate_model


def test_demo_evaluate_scores_the_demos_output_with_the_demos_prompts():
    settings = demo.demo_settings(Path("/organism"), ["evaluate", "--batch-size", "8"])
    assert settings.evaluate_model == str(Path("heretic_demo_output") / "model")
    assert settings.model == "/organism", "the base is the organism the demo edited"
    assert settings.bad_evaluation_prompts.dataset.endswith("harmful.txt")
    assert settings.confirmation_response_length == 96 and settings.batch_size == 8


def test_demo_evaluate_before_the_demo_says_to_run_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "build_demo_organism", lambda path: tmp_path / "organism")
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["evaluate"])
    assert exit_info.value.code == 2
    assert "run the demo first" in capsys.readouterr().err
