"""FP8 linear and FP8 routed experts, forward and backward, against the unconverted layers.

Tolerances, as relative Frobenius errors |y8 - y| / |y|. Round-to-nearest with p mantissa bits
leaves a relative error spread uniformly over half an ulp; for mantissas spread over [1, 2) its
RMS is about 0.2 * 2^-p: 0.026 for E4M3 (p = 3), 0.051 for E5M2 (p = 2). The errors of the many
terms of a dot product are independent, so a GEMM's relative error is about the root sum of
squares of its two operands' RMS errors:
    forward  E4M3 x E4M3: sqrt(2) * 0.026 = 0.036,
    dgrad / wgrad (hybrid) E5M2 x E4M3: sqrt(0.051^2 + 0.026^2) = 0.057.
A linear layer is one GEMM per direction: we allow 1.5x those (0.055 and 0.085). The SwiGLU
experts chain three GEMMs and a product (silu(x w1) * (x w3)) w2, whose errors add in
quadrature: about sqrt(3) x per direction (0.062 forward, 0.10 backward); we allow 0.1 and 0.15.
Blockwise scaling has the same per-element rounding (its finer scales only help the small tiles).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.model.moe import GroupedExperts
from trainer.precision.experts import Fp8GroupedExperts
from trainer.precision.fp8 import E4M3, Recipe
from trainer.precision.linear import Fp8Linear

RECIPES = ["delayed", "current", "blockwise"]
FP8_CUDA = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not FP8_CUDA, reason="needs CUDA sm89+")),
]


def skip_untested(recipe: str, device: str) -> None:
    if recipe == "blockwise" and device == "cuda":
        pytest.skip("blockwise on CUDA needs F.scaled_mm's block scales; not wired in yet")


LINEAR_TOL = {"forward": 0.055, "backward": 0.085}
EXPERTS_TOL = {"forward": 0.10, "backward": 0.15}


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def run(module, inputs, grad_out, params):
    """Output, input gradient and parameter gradients of one forward/backward."""
    for p in params:
        p.grad = None
    x = inputs[0].detach().requires_grad_()
    out = module(x, *inputs[1:])
    out.backward(grad_out)
    return out.detach(), x.grad, [p.grad.clone() for p in params]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", RECIPES)
def test_linear_matches_unconverted(recipe, dtype, device):
    skip_untested(recipe, device)
    torch.manual_seed(0)
    linear = nn.Linear(384, 200, bias=False).to(device, dtype)
    fp8 = Fp8Linear.from_linear(linear, Recipe(scaling=recipe))
    x = torch.randn(3, 70, 384, dtype=dtype).to(device)
    grad = torch.randn(3, 70, 200, dtype=dtype).to(device) * 1e-3  # small, like real gradients
    for step in range(2):  # the second step runs delayed scaling from its history
        y8, dx8, (dw8,) = run(fp8, (x,), grad, [linear.weight])
        if recipe == "delayed" and step == 0:
            fp8.fp8.update(fp8.fp8.current_amax().clone())
    y, dx, (dw,) = run(linear, (x,), grad, [linear.weight])
    assert y8.dtype == dtype and dw8.dtype == dtype
    assert rel(y8, y) < LINEAR_TOL["forward"]
    assert rel(dx8, dx) < LINEAR_TOL["backward"]
    assert rel(dw8, dw) < LINEAR_TOL["backward"]


def test_linear_keeps_parameters_and_bias():
    linear = nn.Linear(64, 32, bias=True)
    fp8 = Fp8Linear.from_linear(linear, Recipe(scaling="current"))
    assert fp8.weight is linear.weight and fp8.bias is linear.bias
    x = torch.randn(5, 64)
    assert rel(fp8(x).detach(), linear(x).detach()) < LINEAR_TOL["forward"]


def test_e4m3_format_quantises_gradients_in_e4m3():
    fp8 = Fp8Linear.from_linear(nn.Linear(32, 16, bias=False), Recipe("current", E4M3, E4M3))
    fp8(torch.randn(4, 32, requires_grad=True)).sum().backward()
    assert fp8.fp8.dtypes == [E4M3] * 3


def experts_and_tokens(counts: list[int], device: str = "cpu"):
    torch.manual_seed(1)
    experts = GroupedExperts(len(counts), 256, 160)
    experts.init_weights(std=0.02, out_std=0.01)
    x = torch.randn(sum(counts), 256)
    grad = torch.randn(sum(counts), 256) * 1e-3
    return experts.to(device), x.to(device), torch.tensor(counts, device=device), grad.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_experts_match_unconverted(recipe, device):
    """Uneven loads, an expert without tokens, tiles that straddle no expert boundary."""
    skip_untested(recipe, device)
    experts, x, counts, grad = experts_and_tokens([40, 0, 150, 7], device)
    fp8 = Fp8GroupedExperts.from_experts(experts, Recipe(scaling=recipe))
    params = list(experts.parameters())
    assert list(dict(fp8.named_parameters())) == ["w1_EDF", "w3_EDF", "w2_EFD"]
    for step in range(2):
        y8, dx8, dw8 = run(fp8, (x, counts), grad, params)
        if recipe == "delayed" and step == 0:
            fp8.fp8.update(fp8.fp8.current_amax().clone())
    y, dx, dw = run(experts, (x, counts), grad, params)
    assert rel(y8, y) < EXPERTS_TOL["forward"]
    assert rel(dx8, dx) < EXPERTS_TOL["backward"]
    for name, a, b in zip(("w1", "w3", "w2"), dw8, dw, strict=True):
        assert a[1].eq(0).all(), f"{name}: the expert without tokens got a gradient"
        assert rel(a, b) < EXPERTS_TOL["backward"], name


def test_experts_without_any_tokens():
    experts, x, counts, _ = experts_and_tokens([0, 0])
    fp8 = Fp8GroupedExperts.from_experts(experts, Recipe(scaling="delayed"))
    out = fp8(x.requires_grad_(), counts)
    out.sum().backward()
    assert out.shape == (0, 256) and experts.w1_EDF.grad.eq(0).all()
