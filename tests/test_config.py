"""Settings precedence (CLI > env > config.toml > defaults) and bad values."""

import pytest

from heretic.config import Settings, load_settings
from heretic.errors import SettingsError


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for key in list(__import__("os").environ):
        if key.startswith("HERETIC_"):
            monkeypatch.delenv(key)
    return tmp_path


def test_defaults(workdir):
    s = load_settings([])
    assert s.n_trials == 200
    assert s.select == "ask"
    assert s.trust_remote_code is False
    assert s.batch_size == 0
    assert s.resolved_storage().startswith("sqlite:///")
    assert s.resolved_storage().endswith("heretic_output/study.db")


def test_all_four_levels(workdir, monkeypatch):
    (workdir / "config.toml").write_text(
        'n_trials = 7\nseed = 3\nstudy_name = "from-toml"\nsystem_prompt = "toml"\n'
        '[bad_prompts]\ndataset = "bad.txt"\nsplit = "[:10]"\n'
    )
    monkeypatch.setenv("HERETIC_SEED", "5")
    monkeypatch.setenv("HERETIC_STUDY_NAME", "from-env")
    monkeypatch.setenv("HERETIC_BAD_PROMPTS__COLUMN", "prompt")
    s = load_settings(["--study-name", "from-cli", "--bad-prompts.split", "[:270]"])
    assert s.study_name == "from-cli"  # CLI beats env and toml
    assert s.seed == 5  # env beats toml
    assert s.n_trials == 7  # toml beats default
    assert s.system_prompt == "toml"
    assert s.max_response_length == 100  # default
    # Nested fields merge across levels.
    assert s.bad_prompts.dataset == "bad.txt"
    assert s.bad_prompts.split == "[:270]"
    assert s.bad_prompts.column == "prompt"


def test_a_prompt_set_given_without_its_dataset_changes_the_default_set(workdir, monkeypatch):
    """`--bad-prompts.split "[:270]"` alone keeps the default dataset and column."""
    s = load_settings(["--bad-prompts.split", "train[:270]"])
    assert (s.bad_prompts.dataset, s.bad_prompts.split) == (
        "mlabonne/harmful_behaviors",
        "train[:270]",
    )
    assert s.bad_prompts.column == "text"
    monkeypatch.setenv("HERETIC_SACRED_PROMPTS__SPLIT", "validation[:50]")
    sacred = load_settings([]).sacred_prompts
    assert (sacred.dataset, sacred.config, sacred.streaming) == ("cais/mmlu", "all", True)
    assert sacred.split == "validation[:50]"
    # A set that names its dataset starts from the plain defaults, not from the default set's.
    own = load_settings(["--bad-prompts.dataset", "bad.json"]).bad_prompts
    assert (own.split, own.column) == ("train", None)


def test_config_flag_and_env(workdir, monkeypatch):
    other = workdir / "other.toml"
    other.write_text("n_trials = 11\n")
    assert load_settings(["--config", str(other)]).n_trials == 11
    monkeypatch.setenv("HERETIC_CONFIG", str(other))
    assert load_settings([]).n_trials == 11


def test_env_n_trials(workdir, monkeypatch):
    monkeypatch.setenv("HERETIC_N_TRIALS", "5")
    assert load_settings([]).n_trials == 5
    monkeypatch.setenv("HERETIC_SELECT", "best")
    assert load_settings([]).select == "best"


def test_select_values(workdir):
    assert load_settings(["--select", "12"]).select == "12"
    assert load_settings(["--select", "BEST"]).select == "best"
    with pytest.raises(SettingsError, match="select"):
        load_settings(["--select", "maybe"])


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--n-trials", "-3"], "n_trials"),
        (["--dtype", "float8"], "dtype"),
        (["--batch-size", "-1"], "batch_size"),
    ],
)
def test_bad_values_name_the_setting(workdir, argv, fragment):
    with pytest.raises(SettingsError, match=fragment):
        load_settings(argv)


def test_unknown_toml_key_and_malformed_toml(workdir):
    (workdir / "config.toml").write_text("n_trails = 5\n")
    with pytest.raises(SettingsError, match="n_trails: unknown setting"):
        load_settings([])
    (workdir / "config.toml").write_text("n_trials = = 5\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings([])


def test_missing_config_file(workdir):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(["--config", "nope.toml"])


def test_every_setting_is_documented_in_default_toml():
    from pathlib import Path

    from heretic.config import default_toml

    text = (Path(__file__).parents[1] / "config.default.toml").read_text()
    assert text == default_toml(), "regenerate config.default.toml from heretic.config.default_toml"
    for name, field in Settings.model_fields.items():
        assert field.description, name
        if name != "config":
            assert f"{name} =" in text or f"[{name}]" in text, name
