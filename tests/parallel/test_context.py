"""Context parallelism against one process: the split, the attention plan, logits and gradients.

Each rank builds the same seeded model, splits every row over the cp ranks, and runs forward and
backward of a fixed weighting of its local logits. Its logits must equal the one-process logits
at its token positions, and the SUM over ranks of its parameter gradients must equal the
one-process gradients (each rank's loss is its share of the one-process loss). The batch makes
every case happen: documents crossing the cp chunk boundaries, a document longer than a chunk
(its prefix spans several chunks of other ranks), attention chunks not aligned with cp chunks,
GQA, the NoPE layer with temperature tuning (floor_scale small enough that the temperature
changes inside a row), dense and MoE layers. float64, so any mask or merge error is far above
the tolerance.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from distributed import run_distributed

from parallel.context import ContextParallel, local_token_index
from trainer.model.config import ModelConfig
from trainer.model.transformer import Transformer

ROWS, SEQ_LEN, REL_TOL = 2, 48, 1e-9
DOCUMENT_LENGTHS = ((5, 14, 13, 16), (48,))


def tiny_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, dense_ffn_dim=64,
        expert_ffn_dim=32, n_experts=4, top_k=1, interleave_moe_layer_step=2,
        nope_layer_interval=4, attention_chunk_size=20, attn_temperature_tuning=True,
        floor_scale=4.0, attn_scale=0.5,
    )  # fmt: skip


def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (ROWS, SEQ_LEN), generator=gen)
    documents, positions = [], []
    for lengths in DOCUMENT_LENGTHS:
        documents.append(torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)]))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
    weight = torch.randn(ROWS, SEQ_LEN, 64, generator=gen, dtype=torch.float64)
    return {
        "tokens": tokens,
        "document_ids": torch.stack(documents),
        "positions": torch.stack(positions),
        "weight": weight,
    }


def build_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config()).double()
    model.init_weights()
    return model


def forward_backward(model: Transformer, data: dict, weight: torch.Tensor):
    logits = model(data["tokens"], data["positions"], data["document_ids"]).logits_BSV
    (logits * weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def context_parallel_rank(rank: int, world_size: int) -> dict:
    model, data = build_model(), batch()
    split = ContextParallel(dist.group.WORLD, world_size, rank)
    model.sequence_split = split
    logits, grads = forward_backward(model, data, split.shard(data["weight"]))
    return {"logits": logits, "grads": grads}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err, scale = (actual - expected).norm().item(), expected.norm().item()
    assert err <= REL_TOL * scale, f"{what}: |diff| {err:.3g} > {REL_TOL} * |ref| {scale:.3g}"


@pytest.mark.parametrize("cp", [2, 4])
def test_context_parallel_matches_one_process(cp):
    data = batch()
    logits, grads = forward_backward(build_model(), data, data["weight"])
    per_rank = run_distributed(context_parallel_rank, world_size=cp)
    for rank, result in enumerate(per_rank):
        index = local_token_index(SEQ_LEN, cp, rank)
        assert_rel_close(result["logits"], logits[:, index], f"rank {rank} logits")
    assert set(per_rank[0]["grads"]) == set(grads)
    for name, grad in grads.items():
        summed = sum(result["grads"][name] for result in per_rank)
        assert_rel_close(summed, grad, f"gradient of {name}")


def test_the_shares_partition_each_row_into_balanced_chunks():
    shares = [local_token_index(16, 4, r).tolist() for r in range(4)]
    assert shares[0] == [0, 1, 14, 15] and shares[3] == [6, 7, 8, 9]
    assert sorted(sum(shares, [])) == list(range(16))


def test_a_row_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match=r"2 x parallel.cp = 4 equal chunks, but the row length"):
        local_token_index(10, 2, 0)


def test_prefix_runs_are_the_continued_segments():
    """cp=2, rows of 16 (chunks of 4): rank 0 holds [0:4] and [12:16], rank 1 [4:8] and [8:12]."""
    documents = torch.tensor([[0] * 6 + [1] * 10])
    positions = torch.tensor([list(range(6)) + list(range(10))])
    rank0 = ContextParallel(None, 2, 0).layout(documents, positions, None)
    rank1 = ContextParallel(None, 2, 1).layout(documents, positions, None)
    # Rank 0's late chunk [12:16] continues document 1, begun at 6: keys 6..11, all 4 queries.
    assert [(p.queries, p.keys) for p in rank0.prefixes] == [(slice(4, 8), slice(6, 12))]
    # Rank 1's [4:8] continues document 0 for 2 tokens; [8:12] continues document 1 from 6.
    assert [(p.queries, p.keys) for p in rank1.prefixes] == [
        (slice(0, 2), slice(0, 4)),
        (slice(4, 8), slice(6, 8)),
    ]
