"""Settings fields: what the edit removes (the refusal directions and their refinements) and
the space of edits the search explores."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class EditFields(BaseModel):
    """The refusal directions and the edit's search space: strengths, profile over depth,
    direction scope, row normalization, readouts, warm start."""

    direction_method: Literal["mean_difference", "pca"] = Field(
        default="mean_difference",
        description="Refusal direction per layer: difference of means, or contrastive PCA.",
    )
    min_weight: float = Field(
        default=0.0,
        ge=0.0,
        description="Smallest edit strength the search tries (1 = remove r fully).",
    )
    max_weight: float = Field(
        default=2.5,
        gt=0.0,
        description="Largest edit strength the search tries (1 = remove r fully; above 1 the "
        "edit also offsets what unedited layers wrote along r: with fitted readouts the best "
        "trials on the organism use up to 2.3).",
    )
    search_space: Literal["range", "tent"] = Field(
        default="range",
        description="Strength profile over depth per component: 'tent' (peak weight and "
        "position, floor weight, width) or 'range' (layer_min, layer_max, one weight).",
    )
    direction_scope: Literal["per_layer", "global", "search"] = Field(
        default="per_layer",
        description="Refusal direction a trial removes: 'per_layer' (each layer its own), "
        "'global' (one, interpolated at a searched fractional layer), 'search' (per trial).",
    )
    row_normalization: Literal["none", "pre", "full"] = Field(
        default="none",
        description="How the edit treats each weight row's norm: 'none' (plain projection "
        "W - w r r^T W), 'pre' (project the row-normalized matrix, scale rows back), 'full' "
        "(as 'pre', then give every row its original norm back, so the edit only turns rows). "
        "Applies to linear modules; mixture-of-experts blocks get the plain projection.",
    )
    readout: Literal["direction", "fitted"] = Field(
        default="fitted",
        description="What each module's edit reads: 'direction' (the refusal direction: the "
        "classic W - w r r^T W) or 'fitted' (a per-module readout fitted by ridge regression so "
        "that harmless outputs are left alone: W - w r v^T W; needs direction_scope per_layer "
        "and row_normalization none).",
    )
    readout_ridge: float = Field(
        default=0.01,
        gt=0.0,
        description="Ridge penalty of the fitted readouts, relative to the module outputs' mean "
        "squared norm per dimension.",
    )
    readout_ridge_cv: bool = Field(
        default=False,
        description="Choose each fitted readout's ridge penalty by leave-one-out "
        "cross-validation on the direction prompts (from 1e-4 to 1, relative, per module) "
        "instead of readout_ridge for all.",
    )
    orthogonalize_good_mean: bool = Field(
        default=True,
        description="Make each layer's refusal direction orthogonal to the mean residual of the "
        "good prompts, so the edit leaves the part every prompt carries alone.",
    )
    use_warm_start_params: bool = Field(
        default=True,
        description="Start a new study with known-good trials for the model's family (from "
        "its config's model_type), where heretic has measured that family.",
    )


class RefinementFields(BaseModel):
    """Optional refinements of the refusal directions: supervised probes, the helpfulness
    direction, the sacred (capability) directions."""

    use_supervised_probing: bool = Field(
        default=False,
        description="Refine each layer's refusal direction with a logistic-regression probe "
        "trained on whether the original model actually refused each bad prompt (greedy "
        "responses of probe_response_length tokens, judged by the refusal markers).",
    )
    probe_l2: float = Field(
        default=0.01,
        ge=0.0,
        description="L2 penalty of the probes (on residuals scaled to unit RMS per layer).",
    )
    min_probe_accuracy: float = Field(
        default=0.65,
        ge=0.0,
        le=1.0,
        description="Keep a layer's probe only when its 5-fold cross-validated balanced "
        "accuracy reaches this; other layers keep the plain direction.",
    )
    ensemble_probe_pca: bool = Field(
        default=True,
        description="Use normalize(probe_weight * probe + (1 - probe_weight) * contrastive PCA) "
        "(signs aligned) instead of the probe alone.",
    )
    probe_weight: float = Field(
        default=0.7, ge=0.0, le=1.0, description="Weight of the probe in the ensemble."
    )
    probe_response_length: int = Field(
        default=32,
        ge=1,
        description="Tokens generated per bad prompt to label it refused or complied for the "
        "probes (short: refusals show in the first words).",
    )
    orthogonalize_directions: bool = Field(
        default=False,
        description="Project the helpfulness direction, normalize(mean(helpful_prompts) - "
        "mean(unhelpfulness_prompts)), off the refusal direction, so the edit leaves "
        "helpfulness alone.",
    )
    use_sacred_directions: bool = Field(
        default=False,
        description="Project capability ('sacred') directions off the refusal direction: the "
        "top n_sacred_directions eigenvectors of cov(sacred_prompts) - sacred_alpha * "
        "cov(sacred_baseline_prompts), per layer.",
    )
    n_sacred_directions: int = Field(default=5, ge=1, description="Sacred directions per layer.")
    sacred_alpha: float = Field(
        default=1.0,
        ge=0.0,
        description="Weight of the baseline covariance subtracted from the sacred one.",
    )
    sacred_overlap_threshold: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="Warn when the mean |cos| between the refusal and the sacred directions "
        "exceeds this: the edit would then damage capabilities.",
    )
