"""Precision helpers shared by the model's layers."""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32: low-precision inputs are promoted for norms, softmax-like ops and RoPE,
    while float64 (used by reference tests) is left alone."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
