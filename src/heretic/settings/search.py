"""Settings fields: the Optuna study, how its trials run and which one is kept, and what a
rerun reuses."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator


class StudyFields(BaseModel):
    """The Optuna study: its size, seed, name and storage."""

    n_trials: int = Field(
        default=200,
        ge=1,
        description="Total trials the study should hold; rerunning resumes up to this number.",
    )
    n_startup_trials: int | None = Field(
        default=None,
        ge=1,
        description="Random trials before TPE takes over (default: a third of n_trials, "
        "at most 60).",
    )
    seed: int = Field(
        default=42, description="Seed for every random source (sampler, torch, Python)."
    )
    study_name: str = Field(
        default="heretic", description="Name of the Optuna study in the storage."
    )
    storage: str | None = Field(
        default=None,
        description="Optuna storage URL (default: sqlite:///OUTPUT_DIR/study.db). "
        "Same URL = resume.",
    )

    def resolved_startup_trials(self) -> int:
        if self.n_startup_trials is not None:
            return self.n_startup_trials
        return max(1, min(60, self.n_trials // 3))


class TrialFields(BaseModel):
    """How trials run (pruning, undoing the edit, layer skipping, compiling)
    and which trial is exported."""

    select: str = Field(
        default="ask",
        description="Trial to export after the search: 'ask' (menu), 'best' (front point nearest "
        "the origin), 'none' (export nothing), or a trial number.",
    )
    verbose: bool = Field(default=False, description="Print more detail (per-trial parameters).")
    prune_dominated_trials: bool = Field(
        default=True,
        description="Stop counting a trial's refusals once the count so far already puts it "
        "behind the Pareto front (it is recorded as pruned; front numbers are unaffected).",
    )
    kl_prune_threshold: float = Field(
        default=1.0,
        ge=0.0,
        description="Skip the refusal count of a trial whose KL divergence exceeds this "
        "(recorded as pruned, never on the front): past about 1 the edited model's answers "
        "to harmless prompts are mostly broken; 0 = off.",
    )
    reset_strategy: Literal["adapter", "cache", "reload"] = Field(
        default="adapter",
        description="How a trial's edit is undone: 'adapter' (edit as forward hooks, weights "
        "untouched, free), 'cache' (edit merged in place, editable matrices copied back from a "
        "one-time cache), 'reload' (merged in place, matrices re-read from disk: slow).",
    )
    skip_unedited_layers: bool = Field(
        default=True,
        description="KL passes start at a trial's lowest edited layer, replaying the original "
        "model's stored outputs of the layers below (exact: checked on the model at start; "
        "stores at most max(256 MB, 5% of the model), capped at 2 GB).",
    )
    compile: bool = Field(
        default=False,
        description="Run the model through torch.compile during the search (pays on GPUs for "
        "long runs; the first passes are slow while it compiles).",
    )
    screening_tokens: int = Field(
        default=16,
        ge=0,
        description="Decode every bad prompt this many tokens before any runs to "
        "max_response_length, so a trial that cannot reach the Pareto front is pruned early "
        "(exact: front numbers are unaffected; needs prune_dominated_trials); 0 = off.",
    )

    @field_validator("select")
    @classmethod
    def _check_select(cls, value: str) -> str:
        value = value.strip().lower()
        if value in ("ask", "best", "none") or value.isdigit():
            return value
        raise ValueError("must be 'ask', 'best', 'none' or a trial number")


class ResumeFields(BaseModel):
    """What a rerun reuses (directions, a study made with other settings) and when a
    dead worker's trial is retried."""

    directions: Path | None = Field(
        default=None,
        description="Refusal directions file to use instead of computing them (default: "
        "reuse OUTPUT_DIR/directions.safetensors when it matches the model and prompts).",
    )
    force: bool = Field(
        default=False,
        description="Continue a study that was created with different objective settings "
        "(model, prompts, markers, ...) instead of refusing.",
    )
    heartbeat_interval: int = Field(
        default=30,
        ge=1,
        description="Seconds between a running trial's heartbeats; a trial silent for 4 "
        "intervals belongs to a dead worker and is retried.",
    )
