"""A linear layer whose three GEMMs run in FP8 with `torch._scaled_mm`.

Shape legend: M rows (tokens), K input features, N output features.

forward  y = x w^T      x (E4M3) x w (E4M3)                       -> (M, N)
dgrad   dx = dy w       dy (E5M2 in "hybrid", else E4M3) x w (E4M3) -> (M, K)
wgrad   dw = dy^T x     dy x x                                    -> (N, K)

Per-tensor recipes save the FP8 x and w for backward (a transpose keeps a per-tensor scale). The
blockwise recipe contracts over K in forward but over M in wgrad, so, as in DeepSeek-V3, it also
quantises x in 128x1 tiles (1x128 tiles of x^T) during forward and saves those; w's 128x128
blocks serve both directions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from trainer.precision.fp8 import Quantised, Recipe, block_cols, block_rows, fp8_mm
from trainer.precision.scaling import GRAD_OUTPUT, INPUT, WEIGHT, Fp8Scaling


class Fp8Linear(nn.Linear):
    """`nn.Linear` with FP8 matmuls: the same `weight` (and `bias`), plus the `fp8` state."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        recipe: Recipe,
        amax_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.fp8 = Fp8Scaling(recipe, ("linear",), amax_group, device=device)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, recipe: Recipe, amax_group: dist.ProcessGroup | None = None
    ) -> Fp8Linear:
        """A converted copy that shares `linear`'s parameter objects (no weight is copied)."""
        with torch.device("meta"):
            fp8 = cls(linear.in_features, linear.out_features, linear.bias is not None, recipe)
        fp8.weight, fp8.bias = linear.weight, linear.bias
        fp8.fp8 = Fp8Scaling(recipe, ("linear",), amax_group, device=linear.weight.device)
        return fp8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = Fp8LinearFunction.apply(x, self.weight, self.fp8)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_NK: torch.Tensor, scaling: Fp8Scaling):
        x_MK = x.reshape(-1, x.shape[-1])
        if scaling.blockwise:
            xq = scaling.quantise_tiles(x_MK, INPUT)
            wq, w_blocks = scaling.quantise_blocks(weight_NK, WEIGHT)
            out = fp8_mm(xq, block_rows(wq, w_blocks), x.dtype)
            x_for_wgrad = scaling.quantise_tiles(x_MK.t(), INPUT, record=False)  # (K, M)
            w_for_dgrad = block_cols(wq, w_blocks)  # (K, N)
        else:
            xq = scaling.quantise(x_MK, INPUT)
            wq = scaling.quantise(weight_NK, WEIGHT)
            out = fp8_mm(xq, wq, x.dtype)
            x_for_wgrad, w_for_dgrad = xq.t_tensorwise(), wq.t_tensorwise()
        ctx.save_for_backward(
            x_for_wgrad.data, x_for_wgrad.scale_inv, w_for_dgrad.data, w_for_dgrad.scale_inv
        )
        ctx.scaling, ctx.x_shape, ctx.x_dtype = scaling, x.shape, x.dtype
        ctx.w_dtype = weight_NK.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_KM, x_inv, w_KN, w_inv = ctx.saved_tensors
        scaling: Fp8Scaling = ctx.scaling
        grad_MN = grad.reshape(-1, grad.shape[-1])
        if scaling.blockwise:
            gq = scaling.quantise_tiles(grad_MN, GRAD_OUTPUT)
            gq_t = scaling.quantise_tiles(grad_MN.t(), GRAD_OUTPUT, record=False)  # (N, M)
        else:
            gq = scaling.quantise(grad_MN, GRAD_OUTPUT)
            gq_t = gq.t_tensorwise()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = fp8_mm(gq, Quantised(w_KN, w_inv), ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = fp8_mm(gq_t, Quantised(x_KM, x_inv), ctx.w_dtype)
        return dx, dw, None
