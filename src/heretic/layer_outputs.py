"""Layer outputs: reading a layer's residual at the last position (`last_position`, one or
several residual streams), and stored outputs for layer skipping: a trial's KL pass starts at
its lowest edited layer and replays the original model's outputs of the layers below
(`Model.first_token_logprobs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def last_position(h: torch.Tensor, rows: int) -> torch.Tensor:
    """A layer's or module's output at the last position, as (rows, hidden).

    A module that sees its input flattened to (tokens, hidden) (expert blocks) is read at each
    row's last token. A layer with several residual streams (hyper-connections: DeepSeek V4 and
    GLM-5-Next keep [B, S, hc_mult, D]) is read as the mean of its streams, in float32: the
    model reads its residual out as a positive weighting of the streams (GLM-5-Next's head is
    exactly the mean; DeepSeek V4's weights each stream by a sigmoid gate), and every stream
    receives each writer's output scaled by a positive gain, so the mean holds the refusal
    direction as the model's own readout sees it, at the hidden size, which is what the edit
    removes from each writer. No single stream would do: each is mixed into the others."""
    if h.dim() == 2:
        h = h.reshape(rows, -1, h.shape[-1])
    last = h[:, -1]
    if last.dim() > 2:
        return last.float().mean(dim=tuple(range(1, last.dim() - 1)))
    return last


def _tensors(value) -> list[torch.Tensor]:
    items = value if isinstance(value, tuple) else (value,)
    return [t for t in items if isinstance(t, torch.Tensor)]


@dataclass
class LayerOutputs:
    """Outputs of a few decoder layers ("checkpoints"), per batch, from one pass over fixed
    prompts. A trial's edit changes nothing below its first edited layer, so a later pass over
    the same batches can start from the nearest checkpoint below it instead of layer 0: the
    same numbers, bit for bit, for less compute (the evaluator checks this on the model before
    relying on it)."""

    layers: list[int]
    # Per batch and layer, the layer's output: a tensor, or its whole tuple when it returns one,
    # since the next layer may read more than the hidden states (GLM-5-Next's shared top-k).
    batches: list[dict[int, torch.Tensor | tuple]] = field(default_factory=list)
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

    def keep(self, layer: int, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        """The copy of a layer's output to store (on `store` when set); of a tuple, every
        tensor in it is copied."""
        self.devices[layer] = _tensors(output)[0].device
        if isinstance(output, tuple):
            return tuple(self._copy(t) if isinstance(t, torch.Tensor) else t for t in output)
        return self._copy(output)

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.store is None or self.store == tensor.device:
            return tensor.detach().clone()
        return tensor.detach().to(self.store, copy=True)

    def stored(self, batch_index: int, layer: int) -> torch.Tensor | tuple:
        """A stored output, on the device its layer ran on."""
        value = self.batches[batch_index][layer]
        device = self.devices.get(layer)

        def move(t):
            moves = isinstance(t, torch.Tensor) and device is not None and t.device != device
            return t.to(device) if moves else t

        return tuple(move(t) for t in value) if isinstance(value, tuple) else move(value)

    def checkpoint_below(self, layer: int) -> int:
        """The highest checkpoint strictly below `layer`, or -1 (start from the embeddings)."""
        below = [i for i in self.layers if i < layer]
        return max(below) if below else -1

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for b in self.batches
            for value in b.values()
            for t in _tensors(value)
        )
