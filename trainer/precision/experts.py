"""Routed experts whose grouped GEMMs run in FP8: one `torch._scaled_mm` per expert.

Shape legend: R token copies sorted by expert, D model dim, F expert FFN dim, E experts,
M_e the copies routed to expert e (rows [start_e, start_e + M_e) of R).

Per-tensor recipes scale each of the three weight stacks (w1, w3, w2: E matrices each) as ONE
tensor, and each GEMM's input and output gradient likewise over all experts. The state therefore
does not depend on E: expert parallelism slices the weights and keeps the same state, and with
the amax reduced (MAX) over all ranks every rank uses the scale one process would. Blockwise
scaling is per 128x128 block of each expert's matrix, per 1x128 tile of each token row, and
128x1 tiles for wgrad taken inside each expert's rows (a tile never straddles two experts).

`torch._scaled_grouped_mm` (one kernel for all experts) exists only on CUDA (sm90+, row-wise
scales, bf16 output); the per-expert loop runs everywhere and is what is tested here.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.model.moe import GroupedExperts
from trainer.precision.fp8 import Quantised, Recipe, block_cols, block_rows, fp8_mm
from trainer.precision.scaling import GRAD_OUTPUT, INPUT, WEIGHT, Fp8Scaling

GEMMS = ("w1", "w3", "w2")


class Fp8GroupedExperts(GroupedExperts):
    """`GroupedExperts` with FP8 GEMMs: the same w1_EDF / w3_EDF / w2_EFD, plus `fp8` state."""

    @classmethod
    def from_experts(
        cls,
        experts: GroupedExperts,
        recipe: Recipe,
        amax_group: dist.ProcessGroup | None = None,
    ) -> Fp8GroupedExperts:
        """A converted copy that shares `experts`' parameter objects (no weight is copied)."""
        n_experts, dim, hidden = experts.w1_EDF.shape
        with torch.device("meta"):
            fp8 = cls(n_experts, dim, hidden)
        fp8.w1_EDF, fp8.w3_EDF, fp8.w2_EFD = experts.w1_EDF, experts.w3_EDF, experts.w2_EFD
        fp8.fp8 = Fp8Scaling(recipe, GEMMS, amax_group, device=experts.w1_EDF.device)
        return fp8

    def forward(self, x_RD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        counts = tokens_per_expert_E.tolist()  # note: a host sync (the per-expert loop needs it)
        gate_RF = Fp8GroupedMatmul.apply(x_RD, self.w1_EDF, counts, self.fp8, 0)
        up_RF = Fp8GroupedMatmul.apply(x_RD, self.w3_EDF, counts, self.fp8, 1)
        return Fp8GroupedMatmul.apply(F.silu(gate_RF) * up_RF, self.w2_EFD, counts, self.fp8, 2)


def _rows(q: Quantised, start: int, stop: int) -> Quantised:
    scale = q.scale_inv if q.scale_inv.dim() == 0 else q.scale_inv[start:stop]
    return Quantised(q.data[start:stop], scale)


def _flatten(operands: list[Quantised]) -> list[torch.Tensor]:
    return [t for q in operands for t in (q.data, q.scale_inv)]


def _unflatten(tensors: tuple[torch.Tensor, ...]) -> list[Quantised]:
    return [Quantised(tensors[i], tensors[i + 1]) for i in range(0, len(tensors), 2)]


def _segments(counts: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds


class Fp8GroupedMatmul(torch.autograd.Function):
    """Rows of expert e times w[e] (D, F), for every e, with FP8 forward, dgrad and wgrad."""

    @staticmethod
    def forward(ctx, x_RD, w_EDF, counts: list[int], scaling: Fp8Scaling, gemm: int):
        col = 3 * gemm
        segments = _segments(counts)
        if scaling.blockwise:
            xq = scaling.quantise_tiles(x_RD, col + INPUT)
            wq, w_blocks = scaling.quantise_blocks(w_EDF, col + WEIGHT)
            w_fwd = [block_cols(wq[e], w_blocks[e]) for e in range(len(counts))]  # (F, D)
            w_dgrad = [block_rows(wq[e], w_blocks[e]) for e in range(len(counts))]  # (D, F)
            x_wgrad = [
                scaling.quantise_tiles(x_RD[a:b].t(), col + INPUT, record=False)  # (D, M_e)
                for a, b in segments
            ]
        else:
            xq = scaling.quantise(x_RD, col + INPUT)
            wq_all = scaling.quantise(w_EDF, col + WEIGHT)
            w_dgrad = [Quantised(wq_all.data[e], wq_all.scale_inv) for e in range(len(counts))]
            w_fwd = [w.t_tensorwise() for w in w_dgrad]
            x_wgrad = [_rows(xq, a, b).t_tensorwise() for a, b in segments]
        out = [fp8_mm(_rows(xq, a, b), w_fwd[e], x_RD.dtype) for e, (a, b) in enumerate(segments)]
        # Through save_for_backward, so activation checkpointing can drop and recompute them.
        ctx.save_for_backward(*_flatten(w_dgrad + x_wgrad))
        ctx.scaling, ctx.gemm, ctx.segments = scaling, gemm, segments
        ctx.x_dtype, ctx.w_dtype = x_RD.dtype, w_EDF.dtype
        return torch.cat(out) if out else x_RD.new_zeros(0, w_EDF.shape[-1])

    @staticmethod
    def backward(ctx, grad_RF: torch.Tensor):
        saved = _unflatten(ctx.saved_tensors)
        n_experts = len(ctx.segments)
        w_dgrad, x_wgrad = saved[:n_experts], saved[n_experts:]
        scaling: Fp8Scaling = ctx.scaling
        col = 3 * ctx.gemm + GRAD_OUTPUT
        grad_RF = grad_RF.contiguous()
        if scaling.blockwise:
            gq = scaling.quantise_tiles(grad_RF, col)
            g_wgrad = [
                scaling.quantise_tiles(grad_RF[a:b].t(), col, record=False)  # (F, M_e)
                for a, b in ctx.segments
            ]
        else:
            gq = scaling.quantise(grad_RF, col)
            g_wgrad = [_rows(gq, a, b).t_tensorwise() for a, b in ctx.segments]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            pieces = [
                fp8_mm(_rows(gq, a, b), w_dgrad[e], ctx.x_dtype)
                for e, (a, b) in enumerate(ctx.segments)
            ]
            dx = torch.cat(pieces) if pieces else None
        if ctx.needs_input_grad[1]:
            dw = torch.stack(
                [fp8_mm(x, g, ctx.w_dtype) for x, g in zip(x_wgrad, g_wgrad, strict=True)]
            )
        return dx, dw, None, None, None
