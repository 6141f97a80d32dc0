"""FP8 numerics without state: formats, scales, quantisation and the scaled GEMMs.

Shape legend: M rows of the left operand, N rows of the right operand, C the contraction dim,
G = ceil(C / 128) groups of 128 along C.

Convention: a scale multiplies a tensor into FP8 range, q = cast(clamp(x * scale)); the GEMM gets
the inverse scales (`torch._scaled_mm` "dequantisation" scales). Both GEMM operands are passed as
(rows, contraction): `fp8_mm(a_MC, b_NC)` computes a @ b.T. That is the layout cuBLASLt wants
(row-major A, column-major B) and lets one function serve forward, dgrad and wgrad.

Blockwise scaling (DeepSeek-V3): activations and gradients get one scale per 1x128 tile along the
contraction dim, weights one per 128x128 block. `torch._scaled_mm` on CPU takes per-tensor and
per-row/per-column scales but no block scales, so a block-scaled GEMM runs as G row-scaled FP8
GEMMs, one per 128-wide slice of the contraction dim, summed in float32: within slice g a tile
scale is a per-row scale of A and a block scale a per-column scale of B. This is the computation
DeepSeek-V3 describes (FP8 products over 128 elements, promoted and scaled in FP32), done with
real FP8 GEMMs rather than a dequantised matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
BLOCK = 128
"""Tile length and weight block side of blockwise scaling."""


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


@dataclass(frozen=True)
class Recipe:
    """What every FP8 layer of a model shares; built from `precision.fp8` by `recipe_from`."""

    scaling: str = "delayed"
    """"delayed", "current" or "blockwise"."""
    forward_dtype: torch.dtype = E4M3
    backward_dtype: torch.dtype = E5M2
    margin: int = 0
    amax_history_len: int = 16
    amax_compute_algo: str = "max"
    track_saturation: bool = True


def scale_from_amax(amax: torch.Tensor, dtype: torch.dtype, margin: int) -> torch.Tensor:
    """fp8_max / amax / 2^margin (float32); 0 where amax is 0 or not finite ("no scale yet")."""
    amax = amax.float()
    ok = (amax > 0) & torch.isfinite(amax)
    scale = fp8_max(dtype) / torch.where(ok, amax, 1.0) / 2.0**margin
    return torch.where(ok, scale, 0.0)


@dataclass
class Quantised:
    """An FP8 tensor (rows, contraction) and its inverse scale.

    `scale_inv` is 0-d for per-tensor scaling, (rows, G) for tiles along the contraction dim.
    """

    data: torch.Tensor
    scale_inv: torch.Tensor

    def t_tensorwise(self) -> Quantised:
        """The transpose; only per-tensor scaling survives a transpose unchanged."""
        assert self.scale_inv.dim() == 0, "tile scales do not transpose"
        return Quantised(self.data.t(), self.scale_inv)


@dataclass
class Saturation:
    """What one quantisation saw: amax, the (smallest) scale used, overflow/underflow counts."""

    amax: torch.Tensor
    scale: torch.Tensor
    overflow: torch.Tensor | None = None
    underflow: torch.Tensor | None = None


def overflow_threshold(dtype: torch.dtype) -> float:
    """Magnitudes above fp8_max plus half its spacing would round beyond fp8_max."""
    info = torch.finfo(dtype)
    spacing = info.eps * 2.0 ** math.floor(math.log2(info.max))
    return info.max + spacing / 2


def underflow_threshold(dtype: torch.dtype) -> float:
    """Magnitudes up to half the smallest subnormal round to zero (a tie goes to the even 0)."""
    info = torch.finfo(dtype)
    mantissa_bits = -round(math.log2(info.eps))
    return info.smallest_normal * 2.0**-mantissa_bits / 2


def _cast(x32_scaled: torch.Tensor, dtype: torch.dtype, count: bool, may_overflow: bool):
    """Clamp into range and round; with `count`, how many values saturated or became zero.

    Only a stale (delayed) scale can overflow: a scale taken from the tensor's own amax maps it
    to fp8_max within an ulp, so the other recipes skip that pass.
    """
    limit = fp8_max(dtype)
    q = x32_scaled.clamp(-limit, limit).to(dtype)
    if not count:
        return q, None, None
    magnitude = x32_scaled.abs()
    overflow = (magnitude > overflow_threshold(dtype)).sum() if may_overflow else None
    underflow = ((magnitude <= underflow_threshold(dtype)) & (magnitude > 0)).sum()
    if overflow is None:
        overflow = torch.zeros_like(underflow)
    return q, overflow, underflow


def quantise_tensorwise(
    x: torch.Tensor,
    scale: torch.Tensor,
    dtype: torch.dtype,
    count: bool,
    amax: torch.Tensor,
    may_overflow: bool = True,
) -> tuple[Quantised, Saturation]:
    """One float32 scale for the whole tensor (whose `amax` the caller has taken); values beyond
    fp8_max saturate (and are counted)."""
    with torch.no_grad():
        q, overflow, underflow = _cast(x.float() * scale, dtype, count, may_overflow)
    return Quantised(q, scale.reciprocal()), Saturation(amax, scale, overflow, underflow)


def quantise_tiles(
    x_MC: torch.Tensor, dtype: torch.dtype, margin: int, count: bool
) -> tuple[Quantised, Saturation]:
    """One scale per 1x128 tile along the last dim, from the tile's own amax (just in time)."""
    rows, cols = x_MC.shape
    groups = -(-cols // BLOCK)
    with torch.no_grad():
        padded = F.pad(x_MC.float(), (0, groups * BLOCK - cols)).view(rows, groups, BLOCK)
        amax_MG = padded.abs().amax(-1)
        scale_MG = _usable(scale_from_amax(amax_MG, dtype, margin))
        scaled = (padded * scale_MG[..., None]).view(rows, -1)[:, :cols]
        q, overflow, underflow = _cast(scaled, dtype, count, may_overflow=False)
        amax = amax_MG.amax() if amax_MG.numel() else amax_MG.new_zeros(())
        smallest = scale_MG.amin() if scale_MG.numel() else scale_MG.new_ones(())
    return Quantised(q, scale_MG.reciprocal()), Saturation(amax, smallest, overflow, underflow)


def quantise_blocks(
    w_RC: torch.Tensor, dtype: torch.dtype, margin: int, count: bool
) -> tuple[torch.Tensor, torch.Tensor, Saturation]:
    """One scale per 128x128 block of a 2-D weight (or of each matrix of a (E, R, C) stack).

    Returns the FP8 data, the block scales (..., ceil(R/128), ceil(C/128)) and the statistics.
    """
    *lead, rows, cols = w_RC.shape
    row_groups, col_groups = -(-rows // BLOCK), -(-cols // BLOCK)
    with torch.no_grad():
        padded = F.pad(w_RC.float(), (0, col_groups * BLOCK - cols, 0, row_groups * BLOCK - rows))
        blocks = padded.view(*lead, row_groups, BLOCK, col_groups, BLOCK)
        amax_RG = blocks.abs().amax(dim=(-3, -1))
        scale_RG = _usable(scale_from_amax(amax_RG, dtype, margin))
        scaled = (blocks * scale_RG[..., :, None, :, None]).view(padded.shape)
        scaled = scaled[..., :rows, :cols]
        q, overflow, underflow = _cast(scaled, dtype, count, may_overflow=False)
        stats = Saturation(amax_RG.amax(), scale_RG.amin(), overflow, underflow)
    return q, scale_RG, stats


def _usable(scale: torch.Tensor) -> torch.Tensor:
    """An all-zero tile or block has no amax; any scale quantises it exactly, take 1."""
    return torch.where(scale > 0, scale, 1.0)


def block_rows(q_RC: torch.Tensor, scale_RG: torch.Tensor) -> Quantised:
    """A 128x128-block-scaled matrix as an operand contracted over its columns C."""
    rows = q_RC.shape[0]
    per_row = scale_RG.repeat_interleave(BLOCK, dim=0)[:rows]
    return Quantised(q_RC, per_row.reciprocal())


def block_cols(q_RC: torch.Tensor, scale_RG: torch.Tensor) -> Quantised:
    """A 128x128-block-scaled matrix as an operand contracted over its rows R (its transpose)."""
    return block_rows(q_RC.t(), scale_RG.t())


# --------------------------------------------------------------------------- GEMMs


def fp8_mm(a: Quantised, b: Quantised, out_dtype: torch.dtype) -> torch.Tensor:
    """a.data (M, C) @ b.data (N, C).T -> (M, N), dequantised by both operands' scales."""
    if a.scale_inv.dim() == 0 and b.scale_inv.dim() == 0:
        return _scaled_mm(a.data, b.data, a.scale_inv, b.scale_inv, out_dtype)
    return _grouped_contraction_mm(a, b, out_dtype)


def _grouped_contraction_mm(a: Quantised, b: Quantised, out_dtype: torch.dtype) -> torch.Tensor:
    """Tile/block scales: one row-scaled FP8 GEMM per 128-slice of C, accumulated in float32."""
    rows, cols = a.data.shape[0], b.data.shape[0]
    contraction = a.data.shape[1]
    groups = -(-contraction // BLOCK)
    a_inv = _per_group(a.scale_inv, rows, groups)
    b_inv = _per_group(b.scale_inv, cols, groups)
    out = torch.zeros(rows, cols, dtype=torch.float32, device=a.data.device)
    for g in range(groups):
        cut = slice(g * BLOCK, min((g + 1) * BLOCK, contraction))
        out += _scaled_mm(
            a.data[:, cut], b.data[:, cut], a_inv[:, g : g + 1], b_inv[:, g : g + 1].t(), out.dtype
        )
    return out.to(out_dtype)


def _per_group(scale_inv: torch.Tensor, rows: int, groups: int) -> torch.Tensor:
    if scale_inv.dim() == 0:
        return scale_inv.expand(rows, groups)
    return scale_inv


def _scaled_mm(
    a_MC: torch.Tensor,
    b_NC: torch.Tensor,
    a_inv: torch.Tensor,
    b_inv: torch.Tensor,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """`torch._scaled_mm` on both operands contiguous as (rows, C): A row-major, B column-major.

    cuBLASLt demands that layout (and a contraction dim that is a multiple of 16: CUDA pads C
    with zeros, which add nothing); the CPU kernel takes any layout but is fastest with it too.
    The copies are of FP8 data, a byte per element, as TE's transposed ("columnwise") copies.
    """
    if a_MC.shape[1] == 0:
        return torch.zeros(a_MC.shape[0], b_NC.shape[0], dtype=out_dtype, device=a_MC.device)
    a_MC, b_NC = a_MC.contiguous(), b_NC.contiguous()
    rows_b = b_NC.shape[0]
    if a_MC.is_cuda:  # B's both dims must be multiples of 16 as well
        pad = -a_MC.shape[1] % 16
        a_MC, b_NC = _pad(a_MC, 0, pad), _pad(b_NC, -rows_b % 16 if b_inv.dim() == 0 else 0, pad)
    out = torch._scaled_mm(
        a_MC, b_NC.t(), a_inv.float().contiguous(), b_inv.float().contiguous(), out_dtype=out_dtype
    )
    return out[:, :rows_b]


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if not rows and not cols:
        return t
    return F.pad(t.view(torch.uint8), (0, cols, 0, rows)).view(t.dtype)
