"""Settings: one pydantic class whose field descriptions are the CLI help and the config docs.

Precedence, highest first: command line > `HERETIC_*` environment variables > `config.toml`
(in the current folder, or the file named by `--config PATH` / `HERETIC_CONFIG`) > defaults.
Nested prompt-set fields are dotted on the command line (`--bad-prompts.split "[:270]"`),
joined by `__` in the environment (`HERETIC_BAD_PROMPTS__SPLIT`), and TOML tables in the file
(`[bad_prompts]`).

The fields are declared by topic in `heretic.settings` (one mixin class per group, with the
checks that concern only its own fields); `Settings` here combines them and keeps the checks
that span several groups, the settings sources and the config.default.toml rendering.
"""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    CliSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from heretic.errors import SettingsError
from heretic.placement import PLACING_DEVICE_MAPS
from heretic.reasoning import open_block
from heretic.settings.edit import EditFields, RefinementFields
from heretic.settings.evaluation import BenchmarkFields, ConfirmationFields
from heretic.settings.judge import DEFAULT_REFUSAL_MARKERS, JudgeFields
from heretic.settings.model import LoadingFields, RunFields
from heretic.settings.output import EXPORT_FORMATS, ExportFields
from heretic.settings.prompt_sets import DatasetSpecification, PromptSetFields
from heretic.settings.search import ResumeFields, StudyFields, TrialFields

__all__ = [
    "DEFAULT_REFUSAL_MARKERS",
    "ENV_PREFIX",
    "EXPORT_FORMATS",
    "DatasetSpecification",
    "Settings",
    "default_toml",
    "load_settings",
]

ENV_PREFIX = "HERETIC_"


# pydantic collects fields from the last base class to the first, and that order is the order of
# `heretic --help` and config.default.toml: so the groups are listed here last to first.
class Settings(
    PromptSetFields,
    RefinementFields,
    ResumeFields,
    BenchmarkFields,
    ExportFields,
    ConfirmationFields,
    TrialFields,
    JudgeFields,
    EditFields,
    LoadingFields,
    StudyFields,
    RunFields,
    BaseSettings,
):
    """heretic: remove refusals from a chat model, keeping everything else intact."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_avoid_json=True,
        cli_hide_none_type=True,
        cli_enforce_required=False,
        validate_default=True,
    )

    @model_validator(mode="after")
    def _check_readout(self) -> Settings:
        if self.readout == "fitted":
            if self.row_normalization != "none":
                raise ValueError(
                    "readout 'fitted' replaces row normalization: set row_normalization to "
                    f"'none' (it is {self.row_normalization!r}) or readout to 'direction'"
                )
            if self.direction_scope != "per_layer":
                raise ValueError(
                    "readout 'fitted' fits one readout per layer's own direction: set "
                    f"direction_scope to 'per_layer' (it is {self.direction_scope!r}) or readout "
                    "to 'direction'"
                )
        return self

    @model_validator(mode="after")
    def _check_confirmation(self) -> Settings:
        if self.confirm:
            return self
        given = [
            n for n in ("confirmation_bad_prompts", "confirmation_good_prompts") if getattr(self, n)
        ]
        if given:
            raise ValueError(
                f"{' and '.join(given)} given while confirm is false: drop them or set confirm "
                "to true"
            )
        if self.select_best_on == "held_out":
            raise ValueError(
                "select_best_on 'held_out' ranks by the confirmation's figures, which confirm = "
                "false turns off: set confirm to true or select_best_on to 'search'"
            )
        return self

    @model_validator(mode="after")
    def _check_thinking(self) -> Settings:
        block = open_block(self.response_prefix)
        if self.enable_thinking is False and block is not None:
            raise ValueError(
                f"response_prefix opens a thinking block ({block.open!r}) that it does not "
                "close, while enable_thinking is false: close it in the prefix (e.g. "
                f"{block.open + block.close!r}) or unset enable_thinking"
            )
        return self

    @model_validator(mode="after")
    def _check_placement(self) -> Settings:
        if self.max_memory is not None and self.device_map not in PLACING_DEVICE_MAPS:
            raise ValueError(
                f"max_memory caps accelerate's placement, but device_map {self.device_map!r} "
                f"places the model itself: set device_map to one of {PLACING_DEVICE_MAPS} or "
                "unset max_memory"
            )
        if self.quantization != "none":
            if self.compile:
                raise ValueError(
                    f"--compile is not supported with quantization {self.quantization!r}: drop "
                    "--compile or set quantization to 'none'"
                )
            if self.reset_strategy != "adapter":
                raise ValueError(
                    f"reset_strategy {self.reset_strategy!r} writes the edit into the weights, "
                    f"which quantization {self.quantization!r} stores as codes: use "
                    "reset_strategy 'adapter' (hooks) or quantization 'none'"
                )
        return self

    @model_validator(mode="after")
    def _check_compile(self) -> Settings:
        if self.compile and self.reset_strategy == "adapter":
            raise ValueError(
                "--compile needs --reset-strategy cache (or reload): the adapter strategy's "
                "hooks change with every trial, which would recompile the model each time"
            )
        return self

    @model_validator(mode="after")
    def _check_judge(self) -> Settings:
        if self.refusal_judge == "model" and not (self.judge_model or "").strip():
            raise ValueError(
                "refusal_judge 'model' needs judge_model: a hub id, model folder or .gguf file "
                "of a chat or classifier model (see docs/judges.md)"
            )
        if self.judge_prompt is not None and "{response}" not in self.judge_prompt:
            raise ValueError("judge_prompt must contain {response}, where the response goes")
        answers = [a for a in self.judge_answers if a.strip()]
        if len(answers) != 2 or answers[0] == answers[1]:
            raise ValueError(
                "judge_answers needs two different answers: the one meaning refusal, then the "
                f"one meaning not (it is {self.judge_answers!r})"
            )
        return self

    def resolved_storage(self) -> str:
        """The storage URL, defaulting to an SQLite file inside output_dir."""
        if self.storage:
            return self.storage
        return f"sqlite:///{(self.output_dir / 'study.db').resolve()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = _toml_path.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)


class _TomlPath:
    """The TOML file for the settings being built (set by `load_settings`, read by the source)."""

    value: Path | None = None

    def get(self) -> Path | None:
        return self.value


_toml_path = _TomlPath()


def _find_config_path(argv: list[str]) -> Path | None:
    """`--config PATH` on the command line, then HERETIC_CONFIG, then ./config.toml if present."""
    path: str | None = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    if path is None:
        path = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise SettingsError(
                f"Config file {p} does not exist: fix --config / {ENV_PREFIX}CONFIG."
            )
        return p
    default = Path("config.toml")
    return default if default.is_file() else None


def _check_toml(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"Config file {path} is not valid TOML: {e}") from e


def _format_validation_error(error: ValidationError, toml_path: Path | None) -> str:
    lines = ["Invalid settings:"]
    for err in error.errors():
        name = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            where = f" (in {toml_path})" if toml_path else ""
            lines.append(f"  {name}: unknown setting{where}; see config.default.toml for the list")
        else:
            lines.append(f"  {name}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_settings(argv: list[str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from the command line (argv), environment, config.toml and defaults.

    `overrides` act like command-line values; tests and benchmarks use them.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    toml_path = _find_config_path(argv)
    if toml_path is not None:
        _check_toml(toml_path)
    _toml_path.value = toml_path
    try:
        cli = CliSettingsSource(
            Settings,
            cli_prog_name="heretic",
            cli_parse_args=argv,
            cli_kebab_case=True,
            cli_implicit_flags=True,
            cli_avoid_json=True,
            cli_hide_none_type=True,
            cli_exit_on_error=True,
        )
        return Settings(_cli_settings_source=cli, **overrides)  # type: ignore[call-arg]
    except ValidationError as e:
        raise SettingsError(_format_validation_error(e, toml_path)) from None
    finally:
        _toml_path.value = None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        if not value:
            return "[]"
        inner = ",\n".join(f"    {_toml_value(v)}" for v in value)
        return f"[\n{inner},\n]"
    raise TypeError(type(value))


def default_toml() -> str:
    """config.default.toml, rendered from the Settings fields (a test keeps the file in sync)."""
    lines = [
        "# Every heretic setting with its default. Copy what you change into config.toml",
        "# (current folder, or --config PATH). Precedence: CLI > HERETIC_* env > config.toml.",
        "",
    ]
    tables = []
    defaults = Settings.model_construct()
    for name, field in Settings.model_fields.items():
        if name == "config":
            continue
        value = getattr(defaults, name)
        if isinstance(value, BaseModel) or field.annotation == DatasetSpecification | None:
            tables.append((name, field, value))
            continue
        lines.append(f"# {field.description}")
        lines.append(f"{name} = {_toml_value(value)}" if value is not None else f"# {name} =")
        lines.append("")
    for name, field, value in tables:
        lines.append(f"# {field.description}")
        if value is None:  # an optional prompt set: a table to fill in
            lines.append(f"# [{name}]")
            lines.append('# dataset = "..."')
            lines.append('# split = "..."')
            lines.append("")
            continue
        lines.append(f"[{name}]")
        for key, sub in type(value).model_fields.items():
            sub_value = getattr(value, key)
            lines.append(f"# {sub.description}")
            lines.append(
                f"{key} = {_toml_value(sub_value)}" if sub_value is not None else f"# {key} ="
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
