"""Delayed-scaling amax reduction on 2 gloo ranks equals one process on the whole batch.

A dense FP8 linear feeds an MoE layer whose routed and shared experts run in FP8; with 2 ranks
the routed experts are also split by expert parallelism, so each rank quantises other tokens AND
other expert weights than the single process does. Each rank takes half the tokens; the loss is a
fixed per-token weighting, so every per-token gradient is the single process's. With the amaxes
reduced (MAX) over the group, the first step's current-scaled quantisation and every later
delayed scale must be the single process's, bit for bit, and so must the outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed
from torch import nn

from parallel.expert import apply_expert_parallel
from trainer.model.config import ModelConfig
from trainer.model.moe import MoE
from trainer.precision import fp8_metrics, update_fp8_scales
from trainer.precision.experts import Fp8GroupedExperts
from trainer.precision.fp8 import Recipe
from trainer.precision.linear import Fp8Linear

DIM, TOKENS_PER_RANK, WORLD, STEPS = 64, 32, 2, 2


class DenseThenMoE(nn.Module):
    def __init__(self, amax_group: dist.ProcessGroup | None):
        super().__init__()
        cfg = ModelConfig(
            vocab_size=64, dim=DIM, n_heads=4, n_kv_heads=2, n_layers=2, dense_ffn_dim=128,
            expert_ffn_dim=96, n_experts=4, top_k=1,
        )  # fmt: skip
        torch.manual_seed(0)
        self.dense = nn.Linear(DIM, DIM, bias=False)
        self.moe = MoE(cfg)
        self.moe.init_weights(std=0.05, out_std=0.05)
        recipe = Recipe("delayed", amax_history_len=2)
        self.dense = Fp8Linear.from_linear(self.dense, recipe, amax_group)
        shared = self.moe.shared_expert
        for name in ("w1", "w2", "w3"):
            setattr(shared, name, Fp8Linear.from_linear(getattr(shared, name), recipe, amax_group))
        self.moe.experts = Fp8GroupedExperts.from_experts(self.moe.experts, recipe, amax_group)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.moe(self.dense(x_BSD))[0]


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of one step (1, tokens, D) and its per-token loss weights."""
    gen = torch.Generator().manual_seed(step)
    x, weights = torch.randn(2, 1, TOKENS_PER_RANK * WORLD, DIM, generator=gen)
    return x * (1 + step), weights  # the amax grows: delayed scales lag and must be reduced


def train(model: nn.Module, rows: slice) -> dict:
    outputs, states = [], []
    for step in range(STEPS):
        x, weights = batch(step)
        out = model(x[:, rows])
        (out * weights[:, rows]).sum().backward()
        update_fp8_scales(model)
        outputs.append(out.detach())
        states.append({k: v.clone() for k, v in model.state_dict().items() if ".fp8." in k})
    return {"outputs": outputs, "states": states, "metrics": fp8_metrics(model)}


def _rank(rank: int, world_size: int) -> dict:
    model = DenseThenMoE(dist.group.WORLD)
    apply_expert_parallel(model.moe, dist.group.WORLD)
    return train(model, slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK))


@pytest.fixture(scope="module")
def single_process() -> dict:
    return train(DenseThenMoE(None), slice(None))


def test_two_ranks_use_the_single_process_scales(single_process):
    ranks = run_distributed(_rank, world_size=WORLD)
    for rank, result in enumerate(ranks):
        for step in range(STEPS):
            expected = single_process["states"][step]
            got = result["states"][step]
            assert got.keys() == expected.keys()
            for key, value in expected.items():
                assert torch.equal(got[key], value), f"rank {rank}, step {step}: {key}"
            rows = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
            torch.testing.assert_close(
                result["outputs"][step], single_process["outputs"][step][:, rows],
                rtol=1e-6, atol=0,
            )  # fmt: skip
        # Metrics reduced over the ranks: the amaxes (MAX) and counts (SUM) of one process.
        for layer, stats in single_process["metrics"].items():
            for key, value in stats.items():
                if not key.endswith("_scale"):  # scales used are each rank's own
                    assert result["metrics"][layer][key] == value, (rank, layer, key)


def test_without_reduction_the_ranks_disagree():
    """Control: without the amax group each rank scales from its own half of the data."""

    def local_scales(rows: slice) -> torch.Tensor:
        model = DenseThenMoE(None)
        x, weights = batch(0)
        (model(x[:, rows]) * weights[:, rows]).sum().backward()
        update_fp8_scales(model)
        return model.dense.fp8.scale

    first, second = (local_scales(slice(r * TOKENS_PER_RANK, (r + 1) * TOKENS_PER_RANK))
                     for r in range(WORLD))  # fmt: skip
    assert not torch.equal(first, second)
