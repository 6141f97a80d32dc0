"""Transformer Engine backend: runs only where TE imports and CUDA exists; skips elsewhere."""

from __future__ import annotations

import pytest
import torch

from trainer.config import FP8Config, load_config
from trainer.model.transformer import Transformer
from trainer.precision import apply_fp8
from trainer.precision.te import TeGroupedExperts, te_available

pytestmark = pytest.mark.skipif(
    not (te_available() and torch.cuda.is_available()),
    reason="needs Transformer Engine and CUDA",
)


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(load_config().model).cuda()
    model.init_weights()
    return model.eval()  # no idle vision-tower pass; autograd still runs


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_tiny_model_runs_on_te(recipe):
    model = tiny_model()
    names = [n for n, _ in model.named_parameters()]
    summary = apply_fp8(model, FP8Config(backend="te", recipe=recipe))
    assert isinstance(model.layers["1"].feed_forward.experts, TeGroupedExperts)
    assert [n for n, _ in model.named_parameters()] == names  # TE's own weights are removed
    assert len(summary.converted) == 30
    tokens = torch.randint(0, 256, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(tokens)
    out.logits_BSV.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "vision" not in n)
    assert any(k.endswith("_extra_state") for k in model.state_dict())
