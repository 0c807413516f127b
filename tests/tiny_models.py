"""Tiny random models of every decoder family heretic supports, built from a config (no
downloads): hidden size 64, a few layers, 4 experts, non-zero biases and norm weights (HF
initializes them to 0 or 1, which would hide an unmerged bias or an ignored post-norm gain)."""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import CONFIG_MAPPING

TEXT: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    # mixtures of experts
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    n_shared_experts=1,
    first_k_dense_replace=1,
    # linear attention, Mamba, convolutions
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    mamba_n_heads=4,
    mamba_d_head=16,
    mamba_d_state=8,
    mamba_n_groups=1,
    mamba_expand=2,
    ssm_state_size=8,
    n_groups=1,
    # multi-head latent attention
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    # per-layer inputs (Gemma 3n / 4)
    hidden_size_per_layer_input=8,
    vocab_size_per_layer_input=128,
    sliding_window=16,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

VISION: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=4,
    depth=4,
    num_attention_heads=2,
    num_heads=2,
    image_size=32,
    patch_size=8,
    out_hidden_size=64,
    projection_dim=64,
)


FAMILIES: dict[str, dict[str, Any]] = {
    "afmoe": {},
    "apertus": {},
    "arcee": {},
    "aya_vision": {},
    "bamba": {"mamba_d_head": 32, "attn_layer_indices": [1, 3]},
    "bitnet": {},
    "cohere": {},
    "cohere2": {},
    "cohere2_moe": {},
    "cwm": {},
    "deepseek_v2": {"num_key_value_heads": 4},
    "deepseek_v3": {"head_dim": 8, "n_group": 1, "topk_group": 1, "num_key_value_heads": 4},
    "deepseek_v4": {
        # hyper-connections: 4 residual streams; every attention kind, hash and top-k routing
        "num_key_value_heads": 1,
        "layer_types": [
            "sliding_attention",
            "compressed_sparse_attention",
            "heavily_compressed_attention",
            "compressed_sparse_attention",
        ],
        "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"],
        "compress_rates": {"compressed_sparse_attention": 2, "heavily_compressed_attention": 4},
        "o_groups": 2,
        "o_lora_rank": 16,
        "index_n_heads": 2,
        "index_head_dim": 16,
        "index_topk": 4,
        "hc_sinkhorn_iters": 4,
    },
    "diffllama": {},
    "dots1": {},
    "ernie4_5": {},
    "ernie4_5_moe": {},
    "exaone4": {},
    "exaone_moe": {},
    "falcon_h1": {"mamba_d_head": 32, "mamba_d_ssm": 128},
    "falcon_mamba": {},
    "flex_olmo": {},
    "gemma": {},
    "gemma2": {},
    "gemma3": {},
    "gemma3_text": {},
    "gemma4": {},
    "gemma4_text": {},
    "gemma4_text_moe": {"model_type": "gemma4_text", "enable_moe_block": True, "top_k_experts": 2},
    "glm": {},
    "glm4": {},
    "glm4_moe": {},
    "glm4_moe_lite": {"head_dim": 8, "num_key_value_heads": 4},
    "glm4v": {
        "rope_parameters": {
            "rope_type": "default",
            "mrope_section": [1, 1, 2],
            "partial_rotary_factor": 0.5,
        }
    },
    "glm5_next": {
        # hyper-connections like deepseek_v4, with linear attention and indexed (NoPE)
        # attention; the last layer reuses the top-k of the layer below (a layer output tuple)
        "num_key_value_heads": 4,
        "qk_rope_head_dim": 0,
        "qk_nope_head_dim": 16,
        "layer_types": [
            "linear_attention",
            "full_attention",
            "full_attention",
            "full_attention",
        ],
        "indexer_types": ["full", "full", "full", "shared"],
        "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
        "index_topk": 4,
        "index_kpool": 2,
        "index_head_dim": 16,
        "index_n_heads": 2,
        "linear_head_dim": 16,
        "linear_num_heads": 4,
        "hc_sinkhorn_iters": 4,
    },
    "gpt_neox": {},
    "gpt_oss": {},
    "granite": {},
    "granitemoe": {},
    "granitemoehybrid": {
        "mamba_d_head": 32,
        "layer_types": ["linear_attention", "full_attention", "linear_attention", "full_attention"],
    },
    "granitemoeshared": {},
    "helium": {},
    "hunyuan_v1_dense": {},
    "hunyuan_v1_moe": {},
    "idefics3": {},
    "internlm3": {},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "jetmoe": {},
    "lfm2": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "lfm2_moe": {
        "layer_types": ["conv", "full_attention", "conv", "full_attention"],
        "num_dense_layers": 1,
    },
    "lfm2_vl": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "lfm3": {},
    "llama": {},
    "llama4": {
        # the vision-language class (Llama 4 Scout / Maverick): run through its language model
        # (see discovery.text_runner). Fused experts as wide as the hidden size (their output
        # axis cannot be read from the shapes), dense and MoE layers interleaved, biased
        # attention, chunked attention within the prompts' length.
        "intermediate_size": 64,
        "intermediate_size_mlp": 96,
        "interleave_moe_layer_step": 2,
        "attention_bias": True,
        "attention_chunk_size": 16,
        "vision_config": {
            "intermediate_size": 128,
            "vision_output_dim": 64,
            "projector_input_dim": 64,
            "projector_output_dim": 64,
        },
    },
    "llama4_text": {},
    "llava": {},
    "mamba": {},
    "mamba2": {"num_heads": 4, "head_dim": 32},
    "minicpm3": {"num_key_value_heads": 4},
    "minimax_m2": {},
    "ministral": {},
    "ministral3": {},
    "mistral": {},
    "mistral3": {},
    "mistral4": {"num_key_value_heads": 4},
    "mixtral": {},
    "nanochat": {},
    "nemotron": {},
    "nemotron_h": {},
    "olmo": {},
    "olmo2": {},
    "olmo3": {},
    "olmo_hybrid": {},
    "olmoe": {},
    "phi": {},
    "phi3": {},
    "phimoe": {},
    "qwen2": {},
    "qwen2_5_vl": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}},
    "qwen2_moe": {},
    "qwen2_vl": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}},
    "qwen3": {},
    "qwen3_5": {},
    "qwen3_5_moe": {},
    "qwen3_5_moe_text": {},
    "qwen3_5_text": {},
    "qwen3_moe": {},
    "qwen3_next": {},
    "qwen3_vl": {},
    "qwen3_vl_moe": {},
    "seed_oss": {},
    "smollm3": {},
    "smolvlm": {},
}
"""Every family of the architecture matrix, with its own config overrides (`model_type` names
the transformers model type of a variant, `vision_config` overrides `VISION`)."""

BIASED: set[str] = {"gpt_neox", "gpt_oss", "llama4", "phi"}
"""Families whose residual writers have biases (checked to be edited with their weights)."""


def model_type(family: str) -> str:
    """The transformers model type of a family of the matrix (variants name their own)."""
    return FAMILIES.get(family, {}).get("model_type", family)


def is_multimodal(family: str) -> bool:
    sub_configs = getattr(CONFIG_MAPPING[model_type(family)], "sub_configs", {}) or {}
    return "vision_config" in sub_configs


def tiny_config(family: str, **overrides: Any):
    config_class = CONFIG_MAPPING[model_type(family)]
    own = {k: v for k, v in FAMILIES.get(family, {}).items() if k != "model_type"}
    vision = {**VISION, **own.pop("vision_config", {})}
    text = {**TEXT, **own, **overrides}
    text["vocab_size_per_layer_input"] = text["vocab_size"]
    if is_multimodal(family):
        return config_class(text_config=text, vision_config=vision)
    return config_class(**text)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero biases and norm weights, so an unmerged bias or an ignored gain shows."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1 or name.endswith(("bias", "_bias")) or "norm" in name.lower():
            noise = torch.randn(param.shape, generator=generator) * 0.2
            param.add_(noise.to(param.dtype))
    return model


def tiny_model(family: str, dtype: torch.dtype = torch.float32, **overrides: Any):
    """A tiny random model of `family` (config overrides as keyword arguments)."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(0)
    causal = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    auto = transformers.AutoModelForCausalLM
    if is_multimodal(family) or model_type(family) not in causal:
        auto = transformers.AutoModelForImageTextToText
    model = auto.from_config(config, dtype=dtype).eval()
    return randomize(model)


def plain_greedy(model, prompts: list[str], max_new_tokens: int) -> list[str]:
    """transformers' own greedy decoding of a heretic `Model` (by the module that runs its text
    prompts, `Model.runner`): the reference for heretic's."""
    batch = model.encode(prompts)
    with torch.inference_mode():
        out = model.runner.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=model.tokenizer.pad_token_id,
        )
    return model.tokenizer.batch_decode(
        out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )


def chat_llama_config(tokenizer, **overrides: Any) -> transformers.LlamaConfig:
    """The 2-layer Llama the pipeline tests run on, sized to a real chat tokenizer."""
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.LlamaConfig(**{**settings, **overrides})


def sample_edit(n_layers: int = 2, hidden: int = 64, seed: int = 0):
    """(directions, strengths) of an edit that touches both components: attention at layer 0
    only, the MLP at every layer with different strengths."""
    from heretic.sites import COMPONENTS

    gen = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n_layers, hidden, generator=gen), dim=-1)
    strengths = {c: torch.zeros(n_layers) for c in COMPONENTS}
    strengths[COMPONENTS[0]][0] = 1.0
    strengths[COMPONENTS[1]][:] = torch.tensor([0.7, 1.3])[:n_layers]
    return directions, strengths


def add_range_trial(study, kl: float, refusals: int, weight: float, max_weight: float) -> None:
    """A finished trial of the range search space (every component over all layers at
    `weight`) with the given objectives, for tests that need a study without searching."""
    import optuna

    from heretic.optimization import KL_ATTR, REFUSALS_ATTR
    from heretic.sites import COMPONENTS

    dist = optuna.distributions.FloatDistribution(0.0, max_weight)
    unit = optuna.distributions.FloatDistribution(0.0, 1.0)
    params, dists = {}, {}
    for c in COMPONENTS:
        params |= {f"{c}.layer_min": 0.0, f"{c}.layer_span": 1.0, f"{c}.weight": weight}
        dists |= {f"{c}.layer_min": unit, f"{c}.layer_span": unit, f"{c}.weight": dist}
    study.add_trial(
        optuna.trial.create_trial(
            params=params,
            distributions=dists,
            values=[kl, float(refusals)],
            user_attrs={KL_ATTR: kl, REFUSALS_ATTR: refusals},
        )
    )


def coverage_failure(model, layer: int, component: str) -> str:
    """The coverage check's message once one site is left out: the complete set of the model's
    sites must pass first, so a check that fails everything cannot pass the tests."""
    import pytest

    from heretic.coverage import check_coverage
    from heretic.discovery import discover_sites, find_decoder_layers
    from heretic.errors import ModelLoadError

    layers = find_decoder_layers(model)
    sites = discover_sites(model)
    check_coverage(model, layers, sites, model.config.get_text_config().hidden_size)
    incomplete = [s for s in sites if not (s.layer == layer and s.component == component)]
    with pytest.raises(ModelLoadError) as error:
        check_coverage(model, layers, incomplete, model.config.get_text_config().hidden_size)
    return str(error.value)
