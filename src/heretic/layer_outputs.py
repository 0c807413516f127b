"""Stored layer outputs for layer skipping: a trial's KL pass starts at its lowest edited layer
and replays the original model's outputs of the layers below (`Model.first_token_logprobs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerOutputs:
    """Outputs of a few decoder layers ("checkpoints"), per batch, from one pass over fixed
    prompts. A trial's edit changes nothing below its first edited layer, so a later pass over
    the same batches can start from the nearest checkpoint below it instead of layer 0: the
    same numbers, bit for bit, for less compute (the evaluator checks this on the model before
    relying on it)."""

    layers: list[int]
    batches: list[dict[int, torch.Tensor]] = field(default_factory=list)
    tuple_output: int = 0  # the length of a layer's tuple output, 0 for a tensor
    # Where the outputs are kept (None: where each layer ran); a replay moves each back to the
    # device its layer ran on (`devices`).
    store: torch.device | None = None
    devices: dict[int, torch.device] = field(default_factory=dict)

    @classmethod
    def evenly_spaced(
        cls, n_layers: int, n_checkpoints: int, store: torch.device | None = None
    ) -> LayerOutputs:
        """`n_checkpoints` layers spread over 0..n_layers-2 (the last layer is never skipped)."""
        n = max(0, min(n_checkpoints, n_layers - 1))
        if n == 0:
            return cls([], store=store)
        step = (n_layers - 1) / n
        return cls(sorted({int(round(step * (k + 1))) - 1 for k in range(n)}), store=store)

    def keep(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        """The copy of a layer's output to store (on `store` when set)."""
        self.devices[layer] = output.device
        if self.store is None or self.store == output.device:
            return output.detach().clone()
        return output.detach().to(self.store, copy=True)

    def stored(self, batch_index: int, layer: int) -> torch.Tensor:
        """A stored output, on the device its layer ran on."""
        tensor = self.batches[batch_index][layer]
        device = self.devices.get(layer, tensor.device)
        return tensor if tensor.device == device else tensor.to(device)

    def checkpoint_below(self, layer: int) -> int:
        """The highest checkpoint strictly below `layer`, or -1 (start from the embeddings)."""
        below = [i for i in self.layers if i < layer]
        return max(below) if below else -1

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.batches for t in b.values())
