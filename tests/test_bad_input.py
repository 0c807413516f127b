"""The bad-input matrix: each mistake exits non-zero with a message that names what to fix,
and loses nothing (the study, the directions file and a saved model stay as they were).

Every case goes through `heretic.cli.main`, the way a user meets it.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import optuna
import pytest
import torch
from test_robustness import heretic_argv

from heretic import cli
from heretic.config import load_settings
from heretic.directions import save_directions
from heretic.errors import StudyError
from heretic.evaluation import Score
from heretic.fingerprint import check_study_key, study_key
from heretic.optimization import (
    SearchSpace,
    open_study,
    run_search,
)


@pytest.fixture
def env(tmp_path, monkeypatch, tiny_chat_model):
    """A clean working folder with prompt files; no HERETIC_* variables leak in."""
    monkeypatch.chdir(tmp_path)
    for key in list(__import__("os").environ):
        if key.startswith("HERETIC_"):
            monkeypatch.delenv(key)
    files = {}
    for name in ("good", "bad"):
        path = tmp_path / f"{name}.txt"
        path.write_text("\n".join(f"{name} prompt number {i}." for i in range(24)) + "\n")
        files[name] = path
    return tmp_path, files, tiny_chat_model


def argv(env, *extra: str, model: Path | str | None = None) -> list[str]:
    tmp_path, files, tiny = env
    return heretic_argv(Path(model) if model is not None else tiny, files, tmp_path / "out", *extra)


def fails(args: list[str], capsys, code: int = 2) -> str:
    """Run the CLI, expect SystemExit(code), return stderr with whitespace normalised."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == code
    captured = capsys.readouterr()
    return " ".join((captured.err + captured.out).split())


def _strip(args: list[str], flag: str) -> list[str]:
    i = args.index(flag)
    return args[:i] + args[i + 2 :]


# ----- model ---------------------------------------------------------------------------------


def test_no_model(env, capsys):
    message = fails(_strip(argv(env), "--model"), capsys)
    assert "No model given: pass --model" in message


def test_missing_model_folder(env, capsys):
    message = fails(argv(env, model=env[0] / "no-such-model"), capsys)
    assert "does not exist: check --model" in message


def test_missing_hub_model(env, capsys):
    message = fails(argv(env, model="nobody-here/no-such-model-xyz"), capsys)
    assert "Cannot load model nobody-here/no-such-model-xyz" in message


def test_model_without_chat_template(env, capsys):
    folder = env[0] / "base-model"
    shutil.copytree(env[2], folder)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    message = fails(argv(env, model=folder), capsys)
    assert "no chat template" in message and "instruct/chat version" in message


def test_unsupported_architecture_names_what_is_missing(env, capsys):
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = env[0] / "gpt2"
    tokenizer = AutoTokenizer.from_pretrained(env[2])
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer))
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    message = fails(argv(env, model=folder), capsys)
    assert "Cannot find the decoder layers of GPT2LMHeadModel" in message
    assert "not supported" in message


def test_model_needing_remote_code(env, capsys):
    folder = env[0] / "custom"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (env[2] / name).exists():
            shutil.copy(env[2] / name, folder / name)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "heretic_custom",
                "architectures": ["CustomModel"],
                "auto_map": {
                    "AutoConfig": "configuration_custom.CustomConfig",
                    "AutoModelForCausalLM": "modeling_custom.CustomModel",
                },
            }
        )
    )
    message = fails(argv(env, model=folder), capsys)
    assert "--trust-remote-code" in message


# ----- prompt sets ---------------------------------------------------------------------------


def test_missing_prompt_file(env, capsys):
    args = argv(env)
    args[args.index("--bad-prompts.dataset") + 1] = str(env[0] / "missing.txt")
    message = fails(args, capsys)
    assert "bad_prompts" in message and "missing.txt" in message


def test_unknown_column(env, capsys):
    data = env[0] / "bad.json"
    data.write_text(json.dumps([{"prompt": f"p{i}", "id": i} for i in range(24)]))
    args = argv(env, "--bad-prompts.column", "nope")
    args[args.index("--bad-prompts.dataset") + 1] = str(data)
    message = fails(args, capsys)
    assert "column 'nope' not found" in message and "'prompt'" in message


def test_empty_prompt_set(env, capsys):
    empty = env[0] / "empty.txt"
    empty.write_text("\n\n")
    args = argv(env)
    args[args.index("--good-prompts.dataset") + 1] = str(empty)
    message = fails(args, capsys)
    assert "good_prompts" in message and "empty" in message


def test_malformed_slice(env, capsys):
    args = argv(env)
    args[args.index("--good-prompts.split") + 1] = "[a:b]"
    message = fails(args, capsys)
    assert "good_prompts: split '[a:b]' is malformed" in message


def test_too_few_prompts_for_the_split(env, capsys):
    args = argv(env)
    args[args.index("--bad-evaluation-prompts.split") + 1] = "[16:116]"
    message = fails(args, capsys)
    assert "bad_evaluation_prompts: split '[16:116]' asks for 100 prompts" in message
    assert "only 8" in message


def test_evaluation_prompts_overlapping_direction_prompts_warn(env, capsys):
    # No confirmation: it would need held-out prompts that no other set holds (its own error).
    args = argv(env, "--n-trials", "1", "--select", "none", "--no-confirm")
    args[args.index("--good-evaluation-prompts.split") + 1] = "[8:16]"
    cli.main(args)  # a warning, not an error: the run completes
    err = " ".join(capsys.readouterr().err.split())
    assert "Warning: 8 of the 8 good_evaluation_prompts are also good_prompts" in err


# ----- local mistakes are named before the hub is asked for anything --------------------------


@pytest.fixture
def no_hub(env, monkeypatch):
    """Any hub download fails the test: these mistakes must be found without the network."""
    import datasets

    def download(*args, **kwargs):
        raise AssertionError(f"the hub was asked for {args[:1]} before the local checks")

    monkeypatch.setattr(datasets, "load_dataset", download)
    return env


def hub_defaults(env, *extra: str, model: Path | str = "M") -> list[str]:
    """The default (hub) prompt sets, changed only by `extra`."""
    return ["--model", str(model), "--output-dir", str(env[0] / "out"), *extra]


def test_missing_model_folder_before_the_hub(no_hub, capsys):
    message = fails(hub_defaults(no_hub, model=no_hub[0] / "no-such-model-dir"), capsys)
    assert "no-such-model-dir does not exist: check --model" in message


def test_malformed_model_id_before_the_hub(no_hub, capsys):
    message = fails(hub_defaults(no_hub, model="my model"), capsys)
    assert "--model 'my model' is neither" in message and "Fix --model" in message


def test_missing_directions_file_before_the_hub(no_hub, capsys):
    message = fails(hub_defaults(no_hub, "--directions", "nope.safetensors"), capsys)
    assert "nope.safetensors does not exist: fix --directions" in message


@pytest.mark.parametrize(
    "setting, content, fragment",
    [
        ("bad_prompts", b"", "is empty"),
        ("bad_prompts", b"\n \n", "is empty"),
        ("good_evaluation_prompts", b"\xff\xfe\xff\n", "is not UTF-8 text"),
        ("bad_evaluation_prompts", None, "does not exist"),
    ],
)
def test_bad_local_prompt_file_before_the_hub(no_hub, capsys, setting, content, fragment):
    path = no_hub[0] / "prompts.txt"
    if content is not None:
        path.write_bytes(content)
    flag = f"--{setting.replace('_', '-')}.dataset"
    message = fails(hub_defaults(no_hub, flag, "prompts.txt"), capsys)
    assert message.startswith(f"Loading prompts Error: {setting}:")
    assert "prompts.txt" in message and fragment in message


def test_bad_split_of_a_later_hub_set_before_the_first_download(no_hub, capsys):
    message = fails(hub_defaults(no_hub, "--bad-evaluation-prompts.split", "[:100]"), capsys)
    assert "bad_evaluation_prompts: split '[:100]' has no split name" in message


def test_malformed_hub_dataset_id_before_the_first_download(no_hub, capsys):
    message = fails(
        hub_defaults(no_hub, "--sacred-prompts.dataset", "my prompts", "--use-sacred-directions"),
        capsys,
    )
    assert "sacred_prompts: 'my prompts' is neither a local file" in message


def test_hub_failure_names_its_set_after_the_local_sets(env, capsys, monkeypatch):
    """Local sets load first; then a hub that cannot be reached is named with its set and with
    the offline mode that kept it from the network."""
    import datasets

    asked = []

    def unreachable(path, *args, **kwargs):
        asked.append(path)
        raise ConnectionError(f"Couldn't reach {path!r} on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bad = env[0] / "bad.txt"
    message = fails(hub_defaults(env, "--bad-prompts.dataset", str(bad)), capsys)
    assert message.startswith("Loading prompts Error: good_prompts: cannot load dataset")
    assert "HF_HUB_OFFLINE is set" in message and "set good_prompts.dataset to a local" in message
    assert asked == ["mlabonne/harmless_alpaca"]


# ----- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--n-trials", "-3"], "n_trials"),
        (["--dtype", "float8"], "dtype"),
        (["--direction-method", "magic"], "direction_method"),
        (["--heartbeat-interval", "0"], "heartbeat_interval"),
        (["--select", "maybe"], "select"),
    ],
)
def test_bad_setting_values(env, capsys, extra, fragment):
    message = fails(argv(env, *extra), capsys)
    assert "Invalid settings" in message and fragment in message


def test_unknown_command_line_option(env, capsys):
    message = fails(argv(env, "--n-trails", "5"), capsys)
    assert "--n-trails" in message


def test_malformed_toml(env, capsys):
    (env[0] / "config.toml").write_text("n_trials = = 5\n")
    assert "not valid TOML" in fails(argv(env), capsys)


def test_unknown_toml_key(env, capsys):
    (env[0] / "config.toml").write_text("n_trails = 5\n")
    assert "n_trails: unknown setting" in fails(argv(env), capsys)


# ----- study and storage ---------------------------------------------------------------------


def _study_made_with(env, *extra: str) -> optuna.Study:
    settings = load_settings(argv(env, *extra))
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(settings.resolved_storage(), settings.study_name, 0, 1)
    check_study_key(study, study_key(settings))
    return study


def test_study_created_with_other_settings_is_refused_then_forced(env, capsys):
    _study_made_with(env, "--max-response-length", "50", "--system-prompt", "Be terse.")
    message = fails(argv(env, "--n-trials", "1", "--select", "none"), capsys)
    assert "was created with different settings" in message
    assert "max_response_length: study has 50, this run has 4" in message
    assert "system_prompt: study has 'Be terse.'" in message
    assert "--force" in message

    cli.main(argv(env, "--n-trials", "1", "--select", "none", "--force"))
    assert "--force: continuing a study" in " ".join(capsys.readouterr().err.split())
    cli.main(argv(env, "--n-trials", "1", "--select", "none"))  # the new settings stick


def test_storage_unreachable(env, capsys):
    message = fails(argv(env, "--storage", "postgresql://heretic:pw@127.0.0.1:1/study"), capsys)
    assert "Cannot open study storage postgresql://heretic:***@127.0.0.1:1/study" in message
    assert "reachable" in message and "pw@" not in message


def test_storage_in_missing_folder(env, capsys):
    message = fails(argv(env, "--storage", f"sqlite:///{env[0]}/nowhere/study.db"), capsys)
    assert "nowhere does not exist" in message


def test_storage_url_not_a_database(env, capsys):
    message = fails(argv(env, "--storage", "redis://localhost/0"), capsys)
    assert "not a database URL" in message and "postgresql://" in message


# ----- output folder and files ---------------------------------------------------------------


def test_output_folder_inside_a_file(env, capsys):
    blocker = env[0] / "a-file"
    blocker.write_text("")
    args = argv(env)
    args[args.index("--output-dir") + 1] = str(blocker / "out")
    message = fails(args, capsys)
    assert "output folder" in message.lower() and "--output-dir" in message


def test_output_folder_is_a_file(env, capsys):
    args = argv(env)
    (env[0] / "out").write_text("")
    message = fails(args, capsys)
    assert "exists as a file" in message


@pytest.mark.parametrize("export_method", ["shards", "in_memory"])
def test_disk_full_while_saving_loses_nothing(env, capsys, monkeypatch, export_method):
    from transformers import PreTrainedModel

    import heretic.shard_export

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    monkeypatch.setattr(heretic.shard_export, "_copy_range", full)
    message = fails(
        argv(env, "--n-trials", "2", "--select", "0", "--export-method", export_method), capsys
    )
    assert "No space left on device" in message and "Free disk space" in message
    out = env[0] / "out"
    assert not (out / "model").exists()
    assert not list(out.glob(".model.*")), "the temporary folder is removed"
    trials = optuna.load_study(study_name="heretic", storage=f"sqlite:///{out / 'study.db'}")
    assert len(trials.trials) == 2, "the study is kept: rerun to save"
    assert (out / "directions.safetensors").is_file()


def test_disk_full_while_writing_directions(env, capsys, monkeypatch):
    import heretic.directions

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(heretic.directions, "save_file", full)
    message = fails(argv(env, "--n-trials", "1", "--select", "none"), capsys)
    assert "Writing the refusal directions" in message and "Free disk space" in message
    assert not list((env[0] / "out").glob("*directions.safetensors*"))


def test_directions_file_missing(env, capsys):
    message = fails(argv(env, "--directions", str(env[0] / "nope.safetensors")), capsys)
    assert "nope.safetensors does not exist" in message


def test_directions_file_for_another_model(env, capsys):
    path = env[0] / "other.safetensors"
    save_directions(path, torch.ones(30, 576) / 24, {"model": "SmolLM2-135M"})
    message = fails(argv(env, "--directions", str(path)), capsys)
    assert "made for SmolLM2-135M (30 layers, hidden size 576)" in message
    assert "this model has 2 layers and hidden size 64" in message


def test_saved_directions_for_another_model_are_refused(env, capsys):
    out = env[0] / "out"
    out.mkdir()
    save_directions(out / "directions.safetensors", torch.ones(3, 8) / 8**0.5, {"model": "m"})
    message = fails(argv(env), capsys)
    assert "(3 layers, hidden size 8)" in message and "Delete the file" in message


# ----- numbers -------------------------------------------------------------------------------


def test_nan_activations(env, capsys, monkeypatch):
    from heretic.model import Model

    def nan_residuals(self, prompts, *args, **kwargs):
        return torch.full((len(prompts), self.n_layers, self.hidden_size), float("nan"))

    def nan_with_module_outputs(self, prompts, *args, **kwargs):
        outputs = torch.zeros(len(prompts), self.n_layers, 2, self.hidden_size)
        return nan_residuals(self, prompts), outputs

    monkeypatch.setattr(Model, "residuals", nan_residuals)
    # With fitted readouts (the default) one pass gives residuals and module outputs.
    monkeypatch.setattr(Model, "residuals_and_module_outputs", nan_with_module_outputs)
    message = fails(argv(env), capsys)
    assert "NaN/inf activations" in message and "--dtype float32" in message


def test_nan_kl_divergence_fails_the_trial_with_a_message(tmp_path):
    study = open_study(f"sqlite:///{tmp_path / 'study.db'}", "s", 0, 1)

    def score(params, *rest) -> Score:
        return Score(kl_divergence=float("nan"), refusals=0)

    with pytest.raises(StudyError, match="non-finite KL divergence.*--dtype float32"):
        run_search(study, 2, SearchSpace(n_layers=4), score)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
