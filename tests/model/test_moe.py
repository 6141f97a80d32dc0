"""MoE: Llama-4 routing semantics against a per-token reference, dropless, balancing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.model.config import ModelConfig
from trainer.model.moe import MoE, load_balance_loss, router_z_loss


def build_moe(top_k: int = 1, n_experts: int = 4, dtype=torch.float64, **overrides) -> MoE:
    cfg = ModelConfig(
        vocab_size=64, dim=16, n_heads=2, n_kv_heads=1, expert_ffn_dim=24,
        n_experts=n_experts, top_k=top_k, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    moe = MoE(cfg)
    moe.init_weights(std=0.3, out_std=0.3)
    return moe.to(dtype)


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


def reference_moe(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token, as Llama 4 defines it: shared(x) + sum_k expert_k(sigmoid(logit_k) * x)."""
    shared = moe.shared_expert
    out = []
    for x in x_TD:
        logits = moe.router.gate.weight @ x
        total = shared.w2.weight @ (F.silu(shared.w1.weight @ x) * (shared.w3.weight @ x))
        for e in torch.topk(logits, moe.top_k).indices:
            score = torch.sigmoid(logits[e])
            w = moe.experts
            total = total + swiglu(score * x, w.w1_EDF[e], w.w3_EDF[e], w.w2_EFD[e])
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_matches_per_token_reference(top_k):
    moe = build_moe(top_k=top_k)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    out, _ = moe(x)
    torch.testing.assert_close(out.reshape(-1, 16), reference_moe(moe, x.reshape(-1, 16)))


def test_router_score_multiplies_the_expert_input_not_its_output():
    moe = build_moe()
    x = torch.randn(12, 16, dtype=torch.float64)
    out, _ = moe(x[None])
    logits = x @ moe.router.gate.weight.T
    experts = logits.argmax(-1)
    scores = torch.sigmoid(logits.gather(1, experts[:, None]))
    w = moe.experts
    on_output = torch.stack(
        [
            scores[t] * swiglu(x[t], w.w1_EDF[e], w.w3_EDF[e], w.w2_EFD[e])
            for t, e in enumerate(experts)
        ]
    )
    routed = out[0] - moe.shared_expert(x)
    assert not torch.allclose(routed, on_output, atol=1e-6)  # SwiGLU is not homogeneous
    on_input = torch.stack(
        [
            swiglu(scores[t] * x[t], w.w1_EDF[e], w.w3_EDF[e], w.w2_EFD[e])
            for t, e in enumerate(experts)
        ]
    )
    torch.testing.assert_close(routed, on_input)


def test_dropless_when_every_token_picks_one_expert():
    moe = build_moe(dtype=torch.float32)
    moe.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 1e6, 0.0]))  # force expert 2
    x = torch.randn(1, 50, 16)
    out, _ = moe(x)
    load = moe.pop_expert_load()
    assert load.tolist() == [0.0, 0.0, 50.0, 0.0]  # no capacity limit: all 50 reach it
    out.sum().backward()  # experts without tokens must not break the backward
    assert moe.experts.w1_EDF.grad[[0, 1, 3]].abs().sum() == 0
    torch.testing.assert_close(
        out[0].double(),
        reference_with_forced_expert(moe.double(), x[0].double(), 2),
        atol=1e-5,
        rtol=1e-5,
    )


def reference_with_forced_expert(moe: MoE, x_TD: torch.Tensor, expert: int) -> torch.Tensor:
    w = moe.experts
    logits = x_TD @ moe.router.gate.weight.T
    scores = torch.sigmoid(logits[:, expert : expert + 1])
    routed = swiglu(scores * x_TD, w.w1_EDF[expert], w.w3_EDF[expert], w.w2_EFD[expert])
    return moe.shared_expert(x_TD) + routed


def test_expert_bias_changes_selection_but_not_scores():
    moe = build_moe()
    x = torch.randn(40, 16, dtype=torch.float64)
    scores, experts, logits = moe.router(x)
    moe.router.expert_bias.copy_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    biased_scores, biased_experts, _ = moe.router(x)
    assert (biased_experts == 0).all()
    torch.testing.assert_close(biased_scores, torch.sigmoid(logits[:, :1]))
    assert not torch.equal(experts, biased_experts)


def test_update_expert_bias_moves_toward_balance():
    moe = build_moe()
    moe.update_expert_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]), rate=0.01)
    torch.testing.assert_close(
        moe.router.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.0], dtype=torch.float64)
    )


def test_expert_load_accumulates_until_popped():
    moe = build_moe(top_k=2)
    moe(torch.randn(1, 10, 16, dtype=torch.float64))
    moe(torch.randn(1, 5, 16, dtype=torch.float64))
    assert moe.pop_expert_load().sum() == 30  # (10 + 5) tokens x 2 experts each
    assert moe.pop_expert_load().sum() == 0


def test_router_losses():
    uniform_logits = torch.zeros(8, 4)
    balanced = torch.arange(8).remainder(4)[:, None]
    assert load_balance_loss(uniform_logits, balanced).item() == pytest.approx(1.0)
    collapsed = torch.zeros(8, 1, dtype=torch.long)
    assert load_balance_loss(uniform_logits, collapsed).item() == pytest.approx(1.0)
    skewed_logits = torch.tensor([[4.0, -4.0, -4.0, -4.0]]).repeat(8, 1)
    assert load_balance_loss(skewed_logits, collapsed).item() > 2.0
    logits = torch.randn(5, 4)
    expected = torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(router_z_loss(logits), expected)


def test_router_loss_is_weighted_by_config():
    moe = build_moe(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)
    x = torch.randn(1, 20, 16, dtype=torch.float64)
    _, loss = moe(x)
    _, experts, logits = moe.router(x[0])
    expected = 0.5 * load_balance_loss(logits, experts) + 0.1 * router_z_loss(logits)
    torch.testing.assert_close(loss.double(), expected.double())


def test_grouped_kernel_matches_portable_loop():
    moe = build_moe(dtype=torch.float32)
    x = torch.randn(64, 16)
    counts = torch.tensor([20, 0, 30, 14])
    fast = moe.experts(x, counts)
    slow = moe.double().experts(x.double(), counts)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=1e-5)
