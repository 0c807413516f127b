"""Settings fields: the prompt sets, each a DatasetSpecification."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DatasetSpecification(BaseModel):
    """Where one prompt set comes from: a hub dataset or a local file, a split slice, a column."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(
        description="Hub dataset id, or a local file (.txt, .json, .jsonl, .csv, .parquet) "
        "or folder."
    )
    split: str = Field(
        default="train",
        description='Split with an optional slice, e.g. "train[:200]"; for local files just '
        '"[270:370]".',
    )
    column: str | None = Field(
        default=None,
        description="Column holding the prompt text (default: 'text' or 'instruction', "
        "whichever exists).",
    )
    config: str | None = Field(
        default=None, description="Hub dataset configuration name, e.g. 'en'."
    )
    streaming: bool = Field(
        default=False,
        description="Hub datasets: stream the split and stop after the slice instead of "
        "downloading it whole (for large corpora such as C4); local files are read whole.",
    )


def _spec(
    dataset: str,
    split: str,
    column: str | None = None,
    config: str | None = None,
    streaming: bool = False,
) -> DatasetSpecification:
    return DatasetSpecification(
        dataset=dataset, split=split, column=column, config=config, streaming=streaming
    )


class PromptSetFields(BaseModel):
    """Every prompt set: directions, evaluation, direction extras, confirmation, perplexity."""

    good_prompts: DatasetSpecification = Field(
        default_factory=lambda: _spec("mlabonne/harmless_alpaca", "train[:2000]", "text"),
        description="Harmless prompts for the refusal directions and the fitted readouts. Many "
        "of them: each readout is a ridge fit in the hidden size's dimensions that must leave "
        "harmless outputs alone, and 2000 instead of 400 cut the KL divergence on unseen "
        "harmless prompts by a fifth at the same held-out refusals (docs/generalization.md).",
    )
    bad_prompts: DatasetSpecification = Field(
        default_factory=lambda: _spec("mlabonne/harmful_behaviors", "train[:400]", "text"),
        description="Harmful prompts for the refusal directions.",
    )
    good_evaluation_prompts: DatasetSpecification = Field(
        default_factory=lambda: _spec("mlabonne/harmless_alpaca", "test[:100]", "text"),
        description="Harmless prompts for the KL divergence (keep them out of good_prompts).",
    )
    bad_evaluation_prompts: DatasetSpecification = Field(
        default_factory=lambda: _spec("mlabonne/harmful_behaviors", "test[:100]", "text"),
        description="Harmful prompts for counting refusals (keep them out of bad_prompts).",
    )
    helpful_prompts: DatasetSpecification = Field(
        default_factory=lambda: _spec("mlabonne/harmless_alpaca", "train[400:600]", "text"),
        description="Helpful requests for the helpfulness direction (orthogonalize_directions); "
        "default: harmless prompts that good_prompts does not use.",
    )
    unhelpfulness_prompts: DatasetSpecification = Field(
        default_factory=lambda: _spec("allenai/c4", "train[:200]", "text", "en", True),
        description="Plain text that asks for nothing, the other side of the helpfulness "
        "direction (streamed: C4 is large).",
    )
    sacred_prompts: DatasetSpecification = Field(
        default_factory=lambda: _spec("cais/mmlu", "validation[:200]", "question", "all", True),
        description="Capability prompts (knowledge questions) for the sacred directions.",
    )
    sacred_baseline_prompts: DatasetSpecification = Field(
        default_factory=lambda: _spec(
            "Salesforce/wikitext", "train[:200]", "text", "wikitext-2-raw-v1", True
        ),
        description="Plain prose whose covariance is subtracted from the sacred prompts' "
        "(empty lines are dropped).",
    )
    confirmation_bad_prompts: DatasetSpecification | None = Field(
        default=None,
        description="Harmful prompts for the held-out confirmation instead of a share of "
        "bad_evaluation_prompts (which the search then uses whole); prompts the search uses are "
        "left out.",
    )
    confirmation_good_prompts: DatasetSpecification | None = Field(
        default=None,
        description="Harmless prompts for the held-out confirmation's KL divergence (and the "
        "default perplexity text) instead of a share of good_evaluation_prompts; prompts the "
        "search uses are left out.",
    )
    perplexity_texts: DatasetSpecification | None = Field(
        default=None,
        description="Plain texts for the perplexity, each scored up to "
        "confirmation_response_length tokens (default: the original model's responses to the "
        "held-out good prompts).",
    )

    @model_validator(mode="before")
    @classmethod
    def _complete_prompt_sets(cls, data: Any) -> Any:
        """`--bad-prompts.split "[:270]"` alone means the default dataset with another slice,
        so a prompt set given without `dataset` takes its other keys from the default set (a
        set that names its dataset starts from the plain defaults, as before)."""
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            value = data.get(name)
            if field.annotation is DatasetSpecification and isinstance(value, dict):
                if "dataset" not in value and field.default_factory is not None:
                    default = field.default_factory()  # type: ignore[call-arg]
                    data = {**data, name: {**default.model_dump(), **value}}
        return data
