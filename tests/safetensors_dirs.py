"""Read every tensor of an HF checkpoint directory, for bit-exact comparisons in tests."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return tensors
