"""Rotary position embedding in Llama 4's complex interleaved-pair form, with llama3 scaling."""

from __future__ import annotations

import math

import torch

from trainer.model.config import ModelConfig
from trainer.model.numerics import upcast


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies (head_dim / 2,), float32 as in the reference implementation."""
    exponents = upcast(torch.arange(0, cfg.head_dim, 2, dtype=torch.int64)) / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    if cfg.rope_scaling == "llama3":
        inv_freq = _llama3_scaled(inv_freq, cfg)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths / `factor`, short ones kept, a smooth ramp between."""
    factor = cfg.rope_scaling_factor
    old_context = cfg.rope_original_max_position
    low_freq_wavelen = old_context / cfg.rope_low_freq_factor
    high_freq_wavelen = old_context / cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    if cfg.rope_high_freq_factor != cfg.rope_low_freq_factor:
        smooth = (old_context / wavelen - cfg.rope_low_freq_factor) / (
            cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        scaled = torch.where(medium, smoothed, scaled)
    return scaled


def rope_rotations(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Unit complex rotations (*positions.shape, head_dim / 2) for integer positions."""
    angles = upcast(positions)[..., None] * inv_freq.to(positions.device)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (..., T, H, Dh) by rotations (..., T, Dh / 2)."""
    pairs = torch.view_as_complex(upcast(x).reshape(*x.shape[:-1], -1, 2))
    rotated = torch.view_as_real(pairs * rotations.unsqueeze(-2)).flatten(-2)
    return rotated.type_as(x)
