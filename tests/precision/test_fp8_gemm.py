"""FP8 GEMMs of every torch recipe against float64, within a bound derived element by element.

The bound. Round-to-nearest into a format with p explicit mantissa bits has unit roundoff
u = 2^-(p+1): E4M3 (p = 3) u = 2^-4, E5M2 (p = 2) u = 2^-3, for values in the normal range. Below
it (subnormals) the error is absolute: at most half the subnormal spacing, d = 2^-10 (E4M3) or
2^-17 (E5M2), in scaled units. A value a quantised with scale s (no saturation) therefore satisfies
|a^ - a| <= e(a) = max(u |a|, d / s). A product term then errs by
|a^ b^ - a b| <= e(a)|b| + |a|e(b) + e(a)e(b), and a dot product of length K by the sum of these
over k, plus float32 accumulation (at most K * 2^-24 * sum |a^||b^|, a first-order bound on
recursive summation) and the rounding of the output (2^-24 relative):

    |C^_ij - C_ij| <= sum_k [e(a_ik)|b_kj| + |a_ik|e(b_kj) + e(a_ik)e(b_kj)]
                      + (K + 1) 2^-24 sum_k (|a_ik| + e(a_ik))(|b_kj| + e(b_kj)).

For well-scaled data the first term dominates: about 2u sum|a||b| = 2^-3 sum|a||b| for E4M3 x
E4M3. The test asserts it for every element, for operands with a wide (log-normal) spread of
magnitudes so that some values fall below the normal range. The scale each recipe chooses is
checked independently (fp8_max / amax of the tensor, tile or block), so the bound does not rest
on the implementation's own bookkeeping.
"""

from __future__ import annotations

import pytest
import torch

from trainer.precision.fp8 import (
    BLOCK,
    E4M3,
    E5M2,
    Quantised,
    Recipe,
    block_cols,
    block_rows,
    fp8_max,
    fp8_mm,
    quantise_tensorwise,
)
from trainer.precision.scaling import GRAD_OUTPUT, INPUT, WEIGHT, Fp8Scaling

UNIT_ROUNDOFF = {E4M3: 2.0**-4, E5M2: 2.0**-3}
HALF_SUBNORMAL = {E4M3: 2.0**-10, E5M2: 2.0**-17}


def spread(*shape: int, seed: int) -> torch.Tensor:
    """Gaussian signs and directions, log-normal magnitudes spanning ~6 decades."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * torch.exp(2 * torch.randn(*shape, generator=gen))


def element_error(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e(x) = max(u|x|, d / s): the largest quantisation error of each element (float64)."""
    x, scale = x.double(), scale.double()
    return torch.maximum(UNIT_ROUNDOFF[dtype] * x.abs(), HALF_SUBNORMAL[dtype] / scale)


def gemm_bound(a, b_t, err_a, err_b_t) -> torch.Tensor:
    """The bound of the module docstring for a (M, K) @ b_t (N, K).T, in float64."""
    a, b = a.double().abs(), b_t.double().abs().t()
    ea, eb = err_a, err_b_t.t()
    k = a.shape[1]
    return ea @ b + a @ eb + ea @ eb + (k + 1) * 2.0**-24 * ((a + ea) @ (b + eb))


def assert_within_bound(out, a, b_t, err_a, err_b_t) -> float:
    exact = a.double() @ b_t.double().t()
    error = (out.double() - exact).abs()
    bound = gemm_bound(a, b_t, err_a, err_b_t)
    worst = (error / bound).max().item()
    assert worst <= 1.0, f"error reaches {worst:.3f} x the bound"
    return worst


def per_tensor_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(fp8_max(dtype) / x.abs().max().item())


@pytest.mark.parametrize("dtypes", [(E4M3, E4M3), (E5M2, E4M3)], ids=["e4m3xe4m3", "e5m2xe4m3"])
def test_tensorwise_gemm_within_bound(dtypes):
    """The per-tensor GEMM (current scaling), incl. the hybrid backward's E5M2 x E4M3."""
    a, b_t = spread(48, 320, seed=1), spread(40, 320, seed=2)
    (qa, _), (qb, _) = (
        quantise_tensorwise(x, per_tensor_scale(x, d), d, True, x.abs().max())
        for x, d in zip((a, b_t), dtypes, strict=True)
    )
    out = fp8_mm(qa, qb, torch.float32)
    errs = [
        element_error(x, per_tensor_scale(x, d), d) for x, d in zip((a, b_t), dtypes, strict=True)
    ]
    assert_within_bound(out, a, b_t, *errs)


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_scaling_recipes_within_bound(recipe):
    """Delayed scaling after one update on the same data uses exactly the current scale."""
    scaling = Fp8Scaling(Recipe(scaling=recipe), ("gemm",))
    a, b_t = spread(33, 300, seed=3), spread(29, 300, seed=4)
    if recipe == "delayed":
        scaling.quantise(a, INPUT), scaling.quantise(b_t, WEIGHT)  # first use, then history
        scaling.update(scaling.current_amax().clone())
    qa, qb = scaling.quantise(a, INPUT), scaling.quantise(b_t, WEIGHT)
    for q, x in ((qa, a), (qb, b_t)):
        torch.testing.assert_close(q.scale_inv, 1 / per_tensor_scale(x, E4M3), rtol=1e-6, atol=0)
    errs = [element_error(x, 1 / q.scale_inv, E4M3) for x, q in ((a, qa), (b_t, qb))]
    assert_within_bound(fp8_mm(qa, qb, torch.float32), a, b_t, *errs)


def tile_scales(x: torch.Tensor) -> torch.Tensor:
    """Independent reference: fp8_max / amax of each 1x128 tile, expanded to every element."""
    rows, cols = x.shape
    scales = torch.empty(rows, cols)
    for start in range(0, cols, BLOCK):
        amax = x[:, start : start + BLOCK].abs().amax(1, keepdim=True)
        scales[:, start : start + BLOCK] = fp8_max(E4M3) / amax
    return scales


def block_scales(w: torch.Tensor) -> torch.Tensor:
    """Independent reference: fp8_max / amax of each 128x128 block, expanded to every element."""
    scales = torch.empty_like(w)
    for r in range(0, w.shape[0], BLOCK):
        for c in range(0, w.shape[1], BLOCK):
            block = (slice(r, r + BLOCK), slice(c, c + BLOCK))
            scales[block] = fp8_max(E4M3) / w[block].abs().amax()
    return scales


def test_blockwise_gemms_within_bound():
    """1x128 activation tiles x 128x128 weight blocks, in both directions a weight is used."""
    scaling = Fp8Scaling(Recipe(scaling="blockwise"), ("gemm",))
    x, w = spread(37, 300, seed=5), spread(260, 300, seed=6)  # partial tiles and blocks
    w_q, w_blocks = scaling.quantise_blocks(w, WEIGHT)
    w_err = element_error(w, block_scales(w), E4M3)
    # Forward: x (M, K) @ w (N, K).T, contraction over K.
    xq = scaling.quantise_tiles(x, INPUT)
    torch.testing.assert_close(
        1 / xq.scale_inv.repeat_interleave(BLOCK, 1)[:, :300], tile_scales(x), rtol=1e-6, atol=0
    )
    out = fp8_mm(xq, block_rows(w_q, w_blocks), torch.float32)
    assert_within_bound(out, x, w, element_error(x, tile_scales(x), E4M3), w_err)
    # dgrad-shaped: g (M, N) @ w (N, K), contraction over N (the blocks used transposed).
    g = spread(37, 260, seed=7)
    gq = scaling.quantise_tiles(g, GRAD_OUTPUT)
    out = fp8_mm(gq, block_cols(w_q, w_blocks), torch.float32)
    g_err = element_error(g, tile_scales(g) * fp8_max(E5M2) / fp8_max(E4M3), E5M2)
    assert_within_bound(out, g, w.t(), g_err, w_err.t())


def test_saturation_and_underflow_are_counted():
    """A stale delayed scale saturates the values it is too large for, and counts them."""
    x = torch.tensor([[1.0, 2.0, -4.0, 1e-9, 0.0]])
    scale = torch.tensor(fp8_max(E4M3) / 2.0)  # fits |x| <= 2: -4 saturates
    q, stats = quantise_tensorwise(x, scale, E4M3, True, x.abs().max())
    assert q.data.float().mul(q.scale_inv).tolist() == [[1.0, 2.0, -2.0, 0.0, 0.0]]
    assert (stats.overflow.item(), stats.underflow.item()) == (1, 1)  # -4; 1e-9 (not 0.0)


def test_empty_operands():
    """An expert that receives no tokens: zero rows, or a zero-length contraction."""
    q = Quantised(torch.zeros(0, 64, dtype=E4M3), torch.tensor(1.0))
    w = Quantised(torch.ones(8, 64, dtype=E4M3), torch.tensor(1.0))
    assert fp8_mm(q, w, torch.float32).shape == (0, 8)
    empty_k = Quantised(torch.zeros(8, 0, dtype=E4M3), torch.tensor(1.0))
    assert fp8_mm(empty_k, empty_k, torch.float32).eq(0).all()


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_underflow_count_is_the_nonzeros_rounded_to_zero(dtype):
    x = spread(64, 256, seed=8)
    x[0] *= 1e-9  # E5M2 spans 31 binades: make sure some values fall below them
    q, stats = quantise_tensorwise(x, per_tensor_scale(x, dtype), dtype, True, x.abs().max())
    made_zero = int(((q.data.float() == 0) & (x != 0)).sum())
    assert made_zero > 0 and int(stats.underflow) == made_zero
