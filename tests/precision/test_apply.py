"""`apply_fp8` on the tiny model of configs/tiny_cpu.toml: what it converts, what it keeps."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from trainer.config import FP8Config, load_config
from trainer.model.config import ConfigError
from trainer.model.transformer import Transformer
from trainer.precision import (
    apply_fp8,
    fp8_metrics,
    fp8_scalars,
    is_fp8_state_key,
    update_fp8_scales,
)
from trainer.precision.experts import Fp8GroupedExperts
from trainer.precision.linear import Fp8Linear
from trainer.precision.te import te_available

TINY = load_config().model  # configs/tiny_cpu.toml's [model], vision tower included


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(TINY)
    model.init_weights()
    # eval: skips the idle vision-tower pass a training forward makes for batches without
    # images (seconds on CPU); the tower stays in higher precision either way. Autograd runs.
    return model.eval()


def loss_and_grads(model: Transformer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    model.zero_grad(set_to_none=True)
    out = model(tokens)
    loss = torch.nn.functional.cross_entropy(
        out.logits_BSV.flatten(0, 1).float(), tokens.roll(-1, 1).flatten()
    )
    (loss + out.router_loss).backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe", ["delayed", "current", "blockwise"])
def test_tiny_model_trains_in_fp8(recipe):
    """Forward and backward run; the loss and gradients stay near the float32 model's.

    The loss moves by FP8 rounding of the logits' inputs only (~1e-3 relative at init); the
    whole-model gradient by the compounded per-layer errors of test_fp8_layers (< 0.25).
    """
    reference = tiny_model()
    ref_loss, ref_grads = loss_and_grads(reference)
    model = tiny_model()
    summary = apply_fp8(model, FP8Config(backend="torch", recipe=recipe))
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in reference.named_parameters()]
    for _ in range(2 if recipe == "delayed" else 1):  # step 2: scales from the history
        loss, grads = loss_and_grads(model)
        update_fp8_scales(model)
    assert grads.keys() == ref_grads.keys()
    assert abs(loss - ref_loss) / ref_loss < 1e-2
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref_flat = torch.cat([g.flatten() for g in ref_grads.values()])
    assert ((flat - ref_flat).norm() / ref_flat.norm()).item() < 0.25
    assert len(summary.converted) == 4 * 4 + 2 * 3 + 2 * 3 + 2  # attn, dense, shared, experts


def test_default_layers_and_what_stays_high_precision():
    model = tiny_model()
    summary = apply_fp8(model, FP8Config(backend="torch"))
    moe = model.layers["1"].feed_forward
    assert isinstance(moe.experts, Fp8GroupedExperts)
    assert isinstance(moe.shared_expert.w1, Fp8Linear)
    assert isinstance(model.layers["0"].feed_forward.w2, Fp8Linear)
    assert isinstance(model.layers["0"].attention.wo, Fp8Linear)
    kept = set(summary.kept)
    assert {"output", "layers.1.feed_forward.router.gate"} <= kept
    assert any(k.startswith("vision.") for k in kept)
    assert not any(isinstance(m, Fp8Linear) for m in model.vision.modules())
    assert "torch backend, delayed scaling; 30 layers" in str(summary)


def test_layer_selection_and_state_dict_keys():
    model = tiny_model()
    before = set(model.state_dict())
    apply_fp8(model, FP8Config(backend="torch", recipe="current", layers=["experts", "output"]))
    assert isinstance(model.output, Fp8Linear)
    assert not isinstance(model.layers["0"].attention.wq, Fp8Linear)
    assert set(model.state_dict()) == before  # current scaling keeps no state
    delayed = tiny_model()
    apply_fp8(delayed, FP8Config(backend="torch", layers=["attention"]))
    added = set(delayed.state_dict()) - before
    assert added == {
        f"layers.{i}.attention.{w}.fp8.{b}"
        for i in range(4) for w in ("wq", "wk", "wv", "wo") for b in ("amax_history", "scale")
    }  # fmt: skip
    assert {k for k in delayed.state_dict() if not is_fp8_state_key(k)} == before


def test_off_and_refusals():
    model = tiny_model()
    assert apply_fp8(model, FP8Config()).converted == []
    apply_fp8(model, FP8Config(backend="torch"))
    with pytest.raises(ValueError, match="before parallelize_model"):
        apply_fp8(model, FP8Config(backend="torch"))
    with pytest.raises(ConfigError, match="precision.fp8.recipe"):
        FP8Config(backend="torch", recipe="mxfp8")
    with pytest.raises(ConfigError, match="precision.fp8.layers"):
        FP8Config(backend="torch", layers=["router"])
    with pytest.raises(ConfigError, match="precision.fp8.backend"):
        load_config(overrides=["--precision.fp8.backend=fp8"])


@pytest.mark.skipif(te_available(), reason="checks the error raised without Transformer Engine")
def test_te_backend_without_te_names_the_key():
    with pytest.raises(ImportError, match='precision.fp8.backend = "te"'):
        apply_fp8(tiny_model(), FP8Config(backend="te"))


def test_metrics_per_layer_and_totals():
    model = tiny_model()
    apply_fp8(model, FP8Config(backend="torch"))
    loss_and_grads(model)
    metrics = fp8_metrics(model)
    wq = metrics["layers.0.attention.wq"]
    assert wq["input_amax"] > 0 and wq["weight_scale"] > 0 and wq["grad_output_amax"] > 0
    assert set(metrics["layers.1.feed_forward.experts"]) >= {"w1.input_amax", "w2.weight_scale"}
    scalars = fp8_scalars(metrics)
    assert scalars["fp8/layers.0.attention.wq/input_amax"] == wq["input_amax"]
    assert "fp8/overflow_total" in scalars and "fp8/underflow_total" in scalars
    assert fp8_metrics(model)["layers.0.attention.wq"]["input_amax"] == 0.0  # read and reset


def test_config_round_trips_through_toml():
    from trainer.config import to_toml

    cfg = load_config(
        overrides=["--precision.fp8.backend=torch", '--precision.fp8.layers=["experts"]']
    )
    path_cfg = dataclasses.asdict(cfg.precision.fp8)
    assert "recipe" in to_toml(cfg) and path_cfg["layers"] == ["experts"]
