"""Settings fields: checking the chosen edit after the search (held-out confirmation,
perplexity, evaluating a saved model, capability benchmarks)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator


class ConfirmationFields(BaseModel):
    """The held-out confirmation, the perplexity, and `heretic evaluate`."""

    confirm: bool = Field(
        default=True,
        description="After the search, score the chosen trial and the other Pareto-front points "
        "once more on prompts the search never saw (a held-out share of each evaluation set, or "
        "confirmation_*_prompts), at confirmation_response_length tokens decoded to the end, "
        "and report those figures beside the search's (--no-confirm: the search uses the whole "
        "evaluation sets and nothing is confirmed).",
    )
    confirmation_holdout: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Share of each evaluation set held out of the search for the confirmation, "
        "where confirmation_bad_prompts / confirmation_good_prompts are not given (chosen by a "
        "hash of each prompt's text, so every rerun holds out the same prompts).",
    )
    confirmation_response_length: int = Field(
        default=256,
        ge=1,
        description="Tokens generated per held-out bad prompt, every response decoded to the end "
        "(no early stop, no screening, no pruning); also the most tokens of each perplexity "
        "text.",
    )
    select_best_on: Literal["search", "held_out"] = Field(
        default="search",
        description="The figures --select best ranks the Pareto front by: 'search' (the "
        "search's) or 'held_out' (the confirmation's; needs confirm).",
    )
    perplexity: bool = Field(
        default=True,
        description="Measure the cross-entropy (reported with its perplexity) of the original "
        "and the edited model on perplexity_texts, or by default on the original model's "
        "responses to the held-out good prompts (that default needs confirm).",
    )
    evaluate_model: str | None = Field(
        default=None,
        description="Evaluate this model (a Hugging Face id, a local folder or a .gguf file) "
        "against its base instead of searching (`heretic evaluate PATH` is the same): refusals "
        "on the evaluation and held-out prompts by the judge and by plain markers, KL "
        "divergence, perplexity and benchmarks, for both models. The base is --model, or where "
        "that is empty the model the evaluated one names (heretic_metadata.json, or base_model "
        "in its model card).",
    )
    evaluation_report: Path | None = Field(
        default=None,
        description="JSON report of --evaluate-model (default: "
        "OUTPUT_DIR/evaluation-NAME.json, NAME from the evaluated model's folder or id).",
    )


class BenchmarkFields(BaseModel):
    """lm-evaluation-harness benchmarks of the chosen trial against the original model."""

    benchmarks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks or groups to compare the chosen trial with the "
        'original model on, e.g. ["mmlu", "gsm8k"] (--benchmarks mmlu,gsm8k); heretic_facts and '
        "heretic_words ship with heretic and run offline (docs/capability.md).",
    )
    benchmark_limit: int | None = Field(
        default=None,
        ge=1,
        description="Documents per benchmark task (default: all); a quick estimate on a slow "
        "machine, with a larger standard error.",
    )
    benchmark_num_fewshot: int | None = Field(
        default=None,
        ge=0,
        description="Few-shot examples per benchmark question (default: each task's own; a "
        "task that fixes 0 keeps 0).",
    )
    benchmark_chat_template: bool = Field(
        default=False,
        description="Benchmark with the chat template and system prompt (lm-eval's "
        "apply_chat_template, few-shot as turns); off = plain text, as most published scores.",
    )
    benchmark_batch_size: int = Field(
        default=0,
        ge=0,
        description="Benchmark batch size (0 = lm-eval's automatic choice on a GPU, up to "
        "max_batch_size; 8 on the CPU).",
    )
    benchmark_task_paths: list[Path] = Field(
        default_factory=list,
        description="Folders of your own lm-eval task YAML files, usable by name in benchmarks.",
    )
    run_benchmarks: bool = Field(
        default=True,
        description="Headless: run benchmarks on the chosen trial (after saving it) and add the "
        "results to the metadata and model card; --no-run-benchmarks skips them. The menu has a "
        "Benchmark action instead.",
    )

    @field_validator("benchmarks")
    @classmethod
    def _split_benchmarks(cls, value: list[str]) -> list[str]:
        """`--benchmarks mmlu,gsm8k` and a list read the same."""
        return [name.strip() for item in value for name in item.split(",") if name.strip()]
