"""Expert parallelism against the single-process MoE: outputs, gradients, uneven loads, bytes.

Every rank builds the same seeded model, shards the experts, and runs its own tokens; it also
runs the unsharded model on every rank's tokens. Its outputs, input gradients and the router and
shared-expert gradients must match the unsharded run on its own tokens; the gathered expert
gradients must match the SUM over ranks of the unsharded expert gradients (each expert's slice
lives on one rank and receives gradient from every rank's tokens).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distributed import run_distributed

from parallel.expert import (
    EXPERT_WEIGHTS,
    apply_expert_parallel,
    gather_experts,
    local_expert_range,
    shard_experts,
)
from trainer.model.config import ModelConfig
from trainer.model.moe import MoE
from trainer.model.transformer import Transformer

DIM, TOKENS, REL_TOL = 16, 24, 1e-5
NEVER, ALWAYS = -1e6, 1e6


def tiny_config(n_experts: int, top_k: int, **overrides) -> ModelConfig:
    return ModelConfig(
        vocab_size=64, dim=DIM, n_heads=2, n_kv_heads=1, expert_ffn_dim=24, dense_ffn_dim=32,
        n_layers=2, n_experts=n_experts, top_k=top_k, attention_chunk_size=4, **overrides,
    )  # fmt: skip


def build_moe(cfg: ModelConfig) -> MoE:
    torch.manual_seed(0)
    moe = MoE(cfg)
    moe.init_weights(std=0.3, out_std=0.3)
    return moe


def rank_tokens(rank: int, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's input (1, T, D) and a fixed output weighting for its loss."""
    gen = torch.Generator().manual_seed(100 + rank)
    x, w = torch.randn(2, 1, n_tokens, DIM, generator=gen)
    return x, w


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err, scale = (actual - expected).norm().item(), expected.norm().item()
    assert err <= REL_TOL * scale, f"{what}: |diff| {err:.3g} > {REL_TOL} * |ref| {scale:.3g}"


# Scenarios: (top_k, router bias for rank r of ep, tokens on rank r).
def no_bias(rank: int, ep: int, n_experts: int) -> torch.Tensor:
    return torch.zeros(n_experts)


def skewed_bias(rank: int, ep: int, n_experts: int) -> torch.Tensor:
    """The last rank's experts get nothing from anyone, expert 1 gets most tokens of the other
    ranks, and rank 0 keeps every token on its own expert 0 (nothing leaves it)."""
    bias = torch.zeros(n_experts)
    bias[local_expert_range(n_experts, ep, ep - 1).start :] = NEVER
    bias[1] = 3.0
    if rank == 0:
        bias[0] = ALWAYS
    return bias


SCENARIOS = {
    "balanced_top2": (2, no_bias, lambda rank: TOKENS),
    "skewed_top1": (1, skewed_bias, lambda rank: TOKENS),
    "empty_rank_top2": (2, no_bias, lambda rank: 0 if rank == 1 else TOKENS),
}


def moe_loss(moe: MoE, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out, _ = moe(x)
    return out, (out * w).sum()


def check_moe_scenario(rank: int, ep: int, n_experts: int, scenario: str) -> None:
    top_k, bias_of, tokens_of = SCENARIOS[scenario]
    cfg = tiny_config(n_experts, top_k)
    inputs = [rank_tokens(r, tokens_of(r)) for r in range(ep)]
    n_local = n_experts // ep

    # Unsharded reference: every rank's tokens, expert gradients summed over ranks.
    ref, routed_to = build_moe(cfg), []
    ref_expert_grads = {n: 0.0 for n in EXPERT_WEIGHTS}
    for r, (x, w) in enumerate(inputs):
        ref.zero_grad()
        ref.router.expert_bias.copy_(bias_of(r, ep, n_experts))
        x = x.clone().requires_grad_()
        out, loss = moe_loss(ref, x, w)
        loss.backward()
        for n in EXPERT_WEIGHTS:
            ref_expert_grads[n] = ref_expert_grads[n] + getattr(ref.experts, n).grad
        if r == rank:
            own_out, own_x_grad = out.detach(), x.grad
            own_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
        routed_to.append(ref.router(x.detach()[0])[1].reshape(-1))

    moe = build_moe(cfg)
    moe.router.expert_bias.copy_(bias_of(rank, ep, n_experts))
    stats = apply_expert_parallel(moe, None)
    x, w = inputs[rank]
    x = x.clone().requires_grad_()
    out, loss = moe_loss(moe, x, w)
    loss.backward()

    assert_rel_close(out.detach(), own_out, f"{scenario} rank {rank} output")
    assert_rel_close(x.grad, own_x_grad, f"{scenario} rank {rank} input grad")
    for name, param in moe.named_parameters():
        if not name.startswith("experts."):
            assert_rel_close(param.grad, own_grads[name], f"{scenario} rank {rank} {name} grad")
    for name, grad in gather_experts(moe, None, grads=True).items():
        assert_rel_close(grad, ref_expert_grads[name], f"{scenario} gathered {name} grad")

    # Bytes: exactly the copies that cross ranks, each D float32 values, once each way.
    owner = [experts // n_local for experts in routed_to]
    sent = (owner[rank] != rank).sum().item()
    received = sum((owner[r] == rank).sum().item() for r in range(ep) if r != rank)
    row_bytes = DIM * 4
    counts = stats.pop()
    assert counts["dispatch_bytes"] == sent * row_bytes
    assert counts["combine_bytes"] == received * row_bytes
    assert counts["routed_bytes"] == len(owner[rank]) * row_bytes
    assert counts["count_bytes"] == (ep - 1) * n_local * 8 and counts["exchanges"] == 1
    assert counts["balanced_bytes"] == len(owner[rank]) * row_bytes * 2 * (ep - 1) / ep
    assert stats.pop()["token_bytes"] == 0
    if scenario == "balanced_top2":
        assert sent > 0 and received > 0  # the comparison above did exercise the exchange

    if scenario == "skewed_top1":
        loads = torch.bincount(torch.cat(routed_to), minlength=n_experts)
        assert loads[n_local * (ep - 1) :].sum() == 0  # the last rank receives nothing
        assert loads[1] > (ep - 1) * TOKENS / 2  # it takes most tokens of ranks 1, 2, ...
        assert (owner[0] == 0).all()  # rank 0 keeps everything
        last_rank_grads = gather_experts(moe, None, grads=True)["w1_EDF"][n_local * (ep - 1) :]
        assert last_rank_grads.abs().sum() == 0


def check_sharding_errors(rank: int, ep: int) -> None:
    with pytest.raises(ValueError, match=rf"n_experts \(3\) divisible by parallel.ep \({ep}\)"):
        apply_expert_parallel(build_moe(tiny_config(3, 1)), None)
    moe = build_moe(tiny_config(4, 1))
    apply_expert_parallel(moe, None)
    with pytest.raises(ValueError, match="already sharded"):
        shard_experts(moe, None)


def build_transformer(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    return model


def transformer_loss(model: Transformer, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(200 + rank)
    tokens = torch.randint(0, 64, (2, 9), generator=gen)
    out = model(tokens[:, :-1])
    ce = F.cross_entropy(out.logits_BSV.flatten(0, 1), tokens[:, 1:].flatten())
    return ce + out.router_loss, out.logits_BSV.detach()


def check_transformer(rank: int, ep: int) -> None:
    cfg = tiny_config(4, 1, router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    ref = build_transformer(cfg)
    summed_grads = {n: 0.0 for n, _ in ref.named_parameters()}
    for r in range(ep):
        ref.zero_grad()
        loss, logits = transformer_loss(ref, r)
        loss.backward()
        for n, p in ref.named_parameters():
            summed_grads[n] = summed_grads[n] + p.grad
        if r == rank:
            own_logits = logits
            own_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    model = build_transformer(cfg)
    names_before = list(model.state_dict())
    stats = apply_expert_parallel(model, None)
    assert list(model.state_dict()) == names_before  # checkpoint and optimizer names unchanged
    for layer, moe in model.moe_layers().items():
        full = gather_experts(moe, None)
        for name in EXPERT_WEIGHTS:
            assert getattr(moe.experts, name).shape[0] == 4 // ep
            torch.testing.assert_close(full[name], getattr(ref.moe_layers()[layer].experts, name))

    loss, logits = transformer_loss(model, rank)
    loss.backward()
    assert_rel_close(logits, own_logits, f"rank {rank} logits")
    params = dict(model.named_parameters())
    for name, grad in own_grads.items():
        if ".experts." not in name:
            assert_rel_close(params[name].grad, grad, f"rank {rank} {name} grad")
    for layer, moe in model.moe_layers().items():
        for name, grad in gather_experts(moe, None, grads=True).items():
            key = f"layers.{layer}.feed_forward.experts.{name}"
            assert_rel_close(grad, summed_grads[key], f"gathered {key} grad")
    counts = stats.pop()
    assert counts["exchanges"] == len(model.moe_layers()) and counts["token_bytes"] > 0


def check_expert_parallel(rank: int, ep: int, n_experts: int) -> None:
    torch.set_num_threads(1)  # ranks share the machine's cores; tiny ops gain nothing from more
    for scenario in SCENARIOS:
        check_moe_scenario(rank, ep, n_experts, scenario)
    check_transformer(rank, ep)
    check_sharding_errors(rank, ep)


@pytest.mark.parametrize("ep, n_experts", [(2, 4), (4, 8)])
def test_expert_parallel_matches_single_process(ep, n_experts):
    """One process group per degree (spawning dominates the time): three MoE load scenarios,
    a two-layer Transformer, and the sharding errors."""
    run_distributed(check_expert_parallel, world_size=ep, args=(n_experts,))


def test_local_expert_range():
    assert local_expert_range(8, 4, 2) == range(4, 6)
    with pytest.raises(ValueError, match="divisible"):
        local_expert_range(6, 4, 0)


def test_one_rank_group_leaves_the_model_untouched():
    moe = build_moe(tiny_config(4, 1))
    before = {n: p for n, p in moe.named_parameters()}

    class OneRank:
        def size(self) -> int:
            return 1

        def rank(self) -> int:
            return 0

    stats = apply_expert_parallel(moe, OneRank())
    assert all(p is before[n] for n, p in moe.named_parameters())
    assert not moe.experts._forward_pre_hooks and stats.pop()["token_bytes"] == 0
