"""Edit sites: the modules whose outputs are added to the residual stream, and the tensors
behind them that an edit changes.

An `EditSite` is one residual writer of one decoder layer (`discovery.find_sites` finds them by
following the model's own computation). Each is a *token mixer* (attention, linear attention,
Mamba, short convolution: its output at one position depends on other positions) or a *channel
mixer* (dense MLP, mixture of experts, per-layer input projections): the user-facing components
`attn` and `mlp` (`ATTN`, `MLP`). A layer with only one of them, several of one kind, or
parallel writers is normal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from heretic.quantization import float_weight, quantized_formats, tensor_format

# Component names used everywhere (parameters, metadata, warm-start profiles): the token mixer
# and the channel mixer of a layer.
ATTN = "attn.o_proj"
MLP = "mlp.down_proj"
COMPONENTS = (ATTN, MLP)
COMPONENT_ROLES = {ATTN: "token mixer", MLP: "channel mixer"}


@dataclass(eq=False)
class WriterTensor:
    """A parameter that an edit of its site changes, with its residual (output) axis.

    `expert_axis` is set for fused expert tensors (E, out, in) / (E, in, out) and their
    per-expert biases (E, out). `owner` is the module holding it, which a quantized weight
    needs to be read (FP8 block scales live on the module).
    """

    name: str
    param: nn.Parameter | torch.Tensor
    out_axis: int
    expert_axis: int | None = None
    owner: nn.Module | None = None

    def value(self) -> torch.Tensor:
        """The tensor's values as floats: dequantized when it is stored quantized (a model
        loaded in 4/8 bits), else the parameter itself (detached)."""
        return float_weight(self.param, self.owner)

    @property
    def quantization(self) -> str | None:
        """How it is stored when not in plain floats ("bitsandbytes 4-bit", ...), else None."""
        return tensor_format(self.param, self.owner)


@dataclass(eq=False)
class EditSite:
    """One residual writer of one decoder layer: the module whose output a hook edits, and the
    tensors a merge, an in-place reset, an adapter and a GGUF export change.

    `gain` is the elementwise gain of a norm applied to the module's output before it is added
    to the residual (Gemma's post-norms): removing the unit direction `normalize(gain * r)` from
    the module's output removes r from what the norm writes, since an RMS norm only rescales its
    input as a whole before the gain.
    """

    layer: int
    component: str
    name: str
    module: nn.Module
    weights: list[WriterTensor]
    biases: list[WriterTensor] = field(default_factory=list)
    gain: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        if isinstance(self.module, nn.Linear):
            return "linear"
        return "experts" if any(w.expert_axis is not None for w in self.weights) else "block"

    @property
    def is_linear(self) -> bool:
        return self.kind == "linear"

    def direction(self, r: torch.Tensor) -> torch.Tensor:
        """The unit direction to remove from this module's output for the residual direction r."""
        if self.gain is None:
            return r
        u = self.gain.to(device=r.device, dtype=torch.float32) * r.float()
        return u / u.norm().clamp_min(1e-12)

    def tensors(self) -> list[WriterTensor]:
        return [*self.weights, *self.biases]

    @property
    def quantization(self) -> list[str]:
        """The quantized formats of its tensors (empty when every one is plain floats)."""
        return quantized_formats((t.param, t.owner) for t in self.tensors())

    def describe(self) -> str:
        return f"{self.name} ({type(self.module).__name__}, {COMPONENT_ROLES[self.component]})"
