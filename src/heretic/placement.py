"""Memory placement: per-device caps for accelerate (`max_memory`), and where the stored layer
outputs of layer skipping live.

A model bigger than one GPU is spread by accelerate (`device_map = "auto"`) over the GPUs and
then the CPU; `max_memory` caps each device, e.g. to leave room for the activations of large
batches. Layer skipping (`skip_unedited_layers`) keeps the original model's outputs of a few
layers for every KL batch: up to `layer_skip_budget` bytes. On the accelerator they cost memory
the batches could use; in CPU memory they cost one copy to the accelerator per replayed batch.
"""

from __future__ import annotations

import re

import torch

# device_map values with which accelerate places the model itself (and reads max_memory).
PLACING_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
LAYER_OUTPUT_PLACES = ("auto", "model", "cpu")
# "auto" keeps the stored outputs on the accelerator while they take at most this share of its
# free memory after loading; a bigger share would shrink the batches more than the replay saves.
AUTO_DEVICE_SHARE = 0.25

_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B|B)?$", re.IGNORECASE)
_DEVICE = re.compile(r"^(?:cuda:)?(\d+)$|^(cpu|mps|xpu(?::\d+)?|npu(?::\d+)?)$")


def parse_max_memory(text: str) -> dict[int | str, str]:
    """ "0=20GiB, 1=24GiB, cpu=64GiB" -> {0: "20GiB", 1: "24GiB", "cpu": "64GiB"}: the form
    accelerate takes (GPU indices as ints). Raises ValueError saying what is wrong."""
    result: dict[int | str, str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        device, sep, size = (x.strip() for x in part.partition("="))
        if not sep or not device or not size:
            raise ValueError(f"{part!r} is not DEVICE=SIZE (e.g. '0=20GiB,cpu=64GiB')")
        if device.lower() == "disk":
            raise ValueError(
                "disk offload is not supported (every pass would read the weights from disk): "
                "cap the GPUs and the CPU only"
            )
        match = _DEVICE.match(device.lower())
        if match is None:
            raise ValueError(
                f"unknown device {device!r}: use a GPU index (0, 1, ... or cuda:0) or 'cpu'"
            )
        if _SIZE.match(size) is None:
            raise ValueError(f"{size!r} is not a size (e.g. 20GiB, 500MB, or bytes)")
        key: int | str = int(match.group(1)) if match.group(1) is not None else match.group(2)
        if key in result:
            raise ValueError(f"device {device!r} is given twice")
        result[key] = size.replace(" ", "")
    if not result:
        raise ValueError("is empty: give DEVICE=SIZE pairs, e.g. '0=20GiB,cpu=64GiB'")
    return result


def layer_outputs_device(
    setting: str, model_device: torch.device, budget_bytes: int, free_bytes: int | None
) -> torch.device | None:
    """Where the stored layer outputs live: CPU memory (torch.device("cpu")), or None for
    where each layer runs (on several GPUs, each its own). "cpu" and "model" say so; "auto"
    keeps them with the layers on a CPU, and on an accelerator while the budget is at most
    AUTO_DEVICE_SHARE of its free memory (`free_bytes`; unknown: keep them there)."""
    if setting not in LAYER_OUTPUT_PLACES:
        raise ValueError(f"unknown place {setting!r} (choose from {LAYER_OUTPUT_PLACES})")
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "model" or model_device.type == "cpu" or free_bytes is None:
        return None
    return None if budget_bytes <= AUTO_DEVICE_SHARE * free_bytes else torch.device("cpu")


def free_accelerator_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (None for anything else: not measured)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def batch_size_reserve(store: torch.device | None, budget_bytes: int) -> int:
    """Memory the automatic batch size must leave free on the model's accelerator for the
    stored layer outputs: their budget when they stay with the layers, nothing in CPU memory
    (nor on a CPU model: `Model.find_batch_size` reserves on accelerators only)."""
    return 0 if store is not None and store.type == "cpu" else budget_bytes
