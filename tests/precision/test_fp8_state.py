"""Delayed scaling state: how it advances, and that checkpoints restore it bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.checkpoint import ModelState
from trainer.config import FP8Config
from trainer.model.config import ModelConfig
from trainer.model.transformer import Transformer
from trainer.precision import apply_fp8, update_fp8_scales
from trainer.precision.fp8 import E4M3, E5M2, Recipe, fp8_max
from trainer.precision.linear import Fp8Linear
from trainer.precision.scaling import GRAD_OUTPUT, INPUT, WEIGHT, Fp8Scaling

E4, E5 = fp8_max(E4M3), fp8_max(E5M2)


def scaling(history_len=3, algo="max", margin=0) -> Fp8Scaling:
    return Fp8Scaling(Recipe("delayed", E4M3, E5M2, margin, history_len, algo), ("gemm",))


def step(state: Fp8Scaling, input_amax: float) -> list[float]:
    """One step that saw an input of amax `input_amax` (weight 2, grad 0.5); returns scales."""
    for column, amax in ((INPUT, input_amax), (WEIGHT, 2.0), (GRAD_OUTPUT, 0.5)):
        state.quantise(torch.tensor([amax, -amax / 3]), column)
    state.update(state.current_amax().clone())
    return state.scale.tolist()


def test_scales_follow_the_max_of_the_history_window():
    state = scaling(history_len=3)
    assert state.scale.tolist() == [0.0, 0.0, 0.0]  # no scale yet: the first use is current
    inputs = [4.0, 1.0, 1.0, 1.0, 8.0]
    # The window holds this step and the two before: 4 leaves it at the 4th step.
    expected_input_amax = [4.0, 4.0, 4.0, 1.0, 8.0]
    for amax, expected in zip(inputs, expected_input_amax, strict=True):
        scales = step(state, amax)
        assert scales == pytest.approx([E4 / expected, E4 / 2.0, E5 / 0.5], rel=1e-7)
    assert state.amax_history[0].eq(0).all()  # the next step's slot starts empty


def test_most_recent_margin_and_missing_amax():
    state = scaling(algo="most_recent", margin=1)
    step(state, 4.0)
    assert step(state, 1.0)[0] == pytest.approx(E4 / 1.0 / 2)  # 2^margin headroom
    state.update(torch.tensor([0.0, float("inf"), 0.0]))  # a tensor that was never seen
    assert state.scale.tolist() == pytest.approx([E4 / 2, E4 / 2.0 / 2, E5 / 0.5 / 2])


def test_forward_uses_the_previous_steps_scale_and_counts_saturation():
    layer = Fp8Linear.from_linear(nn.Linear(16, 8, bias=False), Recipe("delayed"))
    state = layer.fp8
    layer(torch.full((2, 16), 0.5))
    state.update(state.current_amax().clone())
    used = state.scale[INPUT].item()
    state.pop_stats()
    layer(torch.full((2, 16), 4.0))  # 8x the amax the scale was made for: saturates
    stats = state.pop_stats()
    assert stats[1, INPUT].item() == used and stats[2, INPUT].item() == 32  # all 32 values
    assert state.amax_history[0, INPUT].item() == 4.0  # the next scale will fit it


def test_activation_checkpoint_recompute_leaves_state_alone():
    torch.manual_seed(0)
    layer = Fp8Linear.from_linear(nn.Linear(32, 32, bias=False), Recipe("delayed"))
    x = torch.randn(8, 32)
    layer(x).sum().backward()
    update_fp8_scales(layer)
    grads, histories = [], []
    for use_checkpoint in (False, True):
        layer.weight.grad = None
        xi = x.clone().requires_grad_()
        out = checkpoint(layer, xi, use_reentrant=False) if use_checkpoint else layer(xi)
        out.square().sum().backward()
        grads.append((xi.grad, layer.weight.grad))
        histories.append(layer.fp8.amax_history.clone())
        layer.fp8.amax_history[0] = 0
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert torch.equal(histories[0], histories[1])


def small_model() -> Transformer:
    cfg = ModelConfig(
        vocab_size=64, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, dense_ffn_dim=256,
        expert_ffn_dim=128, n_experts=4, top_k=1, interleave_moe_layer_step=2,
        attention_chunk_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    apply_fp8(model, FP8Config(backend="torch", recipe="delayed", amax_history_len=4))
    return model


def train_step(model: Transformer, seed: int) -> list[torch.Tensor]:
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(seed))
    model.zero_grad(set_to_none=True)
    logits = model(tokens).logits_BSV
    logits.float().logsumexp(-1).sum().backward()
    update_fp8_scales(model)
    return [logits.detach()] + [p.grad for p in model.parameters() if p.grad is not None]


def fp8_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".fp8." in k}


def assert_same_next_step(trained: Transformer, restored: Transformer) -> None:
    saved = fp8_buffers(trained)
    assert saved and saved.keys() == fp8_buffers(restored).keys()
    for key, value in fp8_buffers(restored).items():
        assert torch.equal(value, saved[key]), key
    for a, b in zip(train_step(trained, 9), train_step(restored, 9), strict=True):
        assert torch.equal(a, b)
    for key, value in fp8_buffers(restored).items():
        assert torch.equal(value, fp8_buffers(trained)[key]), key


def test_state_dict_round_trip_is_bit_exact():
    trained = small_model()
    for seed in range(3):
        train_step(trained, seed)
    restored = small_model()
    restored.load_state_dict(trained.state_dict())
    assert_same_next_step(trained, restored)


def test_dcp_round_trip_on_one_rank_is_bit_exact(tmp_path):
    """Through the trainer's `ModelState` and torch.distributed.checkpoint, as checkpoints go."""
    trained = small_model()
    for seed in range(3):
        train_step(trained, seed)
    restored = small_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save({"model": ModelState(trained)}, checkpoint_id=str(tmp_path))
        dcp.load({"model": ModelState(restored)}, checkpoint_id=str(tmp_path))
    assert_same_next_step(trained, restored)
