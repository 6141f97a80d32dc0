"""Context parallelism: every row split over the `cp` ranks, attention exact across them.

Shape legend: B rows, S row length, C = S / (2 cp) chunk length, T = B * S / cp local tokens,
H query heads, K key/value heads, Dh head dim.

Load balance. Under a causal mask a late token attends to more keys than an early one, so the
rows are not cut into cp contiguous pieces: each row is cut into 2 cp chunks of C tokens and
rank r keeps chunks r and 2 cp - 1 - r (one early, one late; Megatron-Core and torchtitan do
the same), so every rank has about the same attention work.

Attention (all-gather of keys and values, as Llama 3 did for its long-context stage, because it
handles document masks simply): each rank projects q, k, v for its own tokens, gathers every
rank's k and v (backward returns their gradients to their owners), and attends each query to
the keys it may see: the earlier tokens of its segment (a document and, on RoPE layers, an
attention chunk). Those keys are
- among the rank's own tokens of the same local chunk: the usual causal segments of one rank
  (trainer.model.attention), cut also where the rank's two chunks meet, and
- for the first run of queries of a local chunk whose segment began before that chunk, the
  segment's earlier keys, all visible (a *prefix*, taken from the gathered keys).
parallel/context_attention.py merges the two exactly; no score matrix beyond one block is formed.

Everything else is per token and works on the local tokens unchanged: embeddings, norms, FFN and
MoE, RoPE rotations and the NoPE temperature (both from each token's document position, which
the loader provides, so they are the global positions). The model receives the FULL rows (the cp
ranks of a group read the same rows), embeds them and fuses image features, then keeps its
share (`Transformer.sequence_split`); its logits are that share's, and the trainer keeps the
same share of the labels. The embedding lookup and vision tower therefore run on every cp rank
of the group: small next to the blocks, and it keeps early fusion independent of the split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from parallel.context_attention import PrefixRun, segments_and_prefixes_attention
from trainer.model.attention import SegmentLayout, layout_from_starts, segment_starts


def local_token_index(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions in a row of the tokens rank `cp_rank` keeps: chunks r and 2 cp - 1 - r."""
    if seq_len % (2 * cp_size):
        raise ValueError(
            f"context parallelism cuts each row into 2 x parallel.cp = {2 * cp_size} equal "
            f"chunks, but the row length {seq_len} is not divisible by {2 * cp_size}"
        )
    chunk = seq_len // (2 * cp_size)
    late = 2 * cp_size - 1 - cp_rank
    return torch.cat(
        [
            torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
            torch.arange(late * chunk, (late + 1) * chunk),
        ]
    )


@dataclass(frozen=True)
class ContextParallel:
    """This rank's share of every row, and attention across the shares (a `SequenceSplit`)."""

    group: dist.ProcessGroup
    size: int
    rank: int

    def chunk_starts(self, seq_len: int) -> tuple[int, int]:
        chunk = seq_len // (2 * self.size)
        return self.rank * chunk, (2 * self.size - 1 - self.rank) * chunk

    def shard(self, x_BS: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of every row (dim 1), in row order."""
        index = local_token_index(x_BS.shape[1], self.size, self.rank).to(x_BS.device)
        return x_BS.index_select(1, index)

    def row_order(self, seq_len: int) -> torch.Tensor:
        """For each position of a row, its place among the gathered tokens of the row (which
        come in rank order: rank 0's share, then rank 1's, ...)."""
        rank_order = torch.cat([local_token_index(seq_len, self.size, r) for r in range(self.size)])
        return torch.argsort(rank_order)

    def gather(self, x_TKD: torch.Tensor, n_rows: int, row_order: torch.Tensor) -> torch.Tensor:
        """Every rank's tokens of the rows, in row order (`row_order`), flattened: (B*S, K, Dh)."""
        # Backward: the gathered gradients are reduce-scattered back to the ranks they came from.
        gathered = funcol.all_gather_tensor_autograd(x_TKD.contiguous(), 0, self.group)
        local_len = x_TKD.shape[0] // n_rows
        by_rank = gathered.unflatten(0, (self.size, n_rows, local_len)).transpose(0, 1)
        rows = by_rank.flatten(1, 2).index_select(1, row_order)
        return rows.flatten(0, 1)

    def layout(
        self, document_ids_BS: torch.Tensor, positions_BS: torch.Tensor, chunk_size: int | None
    ) -> ContextParallelLayout:
        """The local causal segments and prefix runs of this rank, from the WHOLE rows' ids."""
        n_rows, seq_len = document_ids_BS.shape
        starts_BS = segment_starts(document_ids_BS, positions_BS, chunk_size)
        local_starts = self.shard(starts_BS)
        chunk = seq_len // (2 * self.size)
        # Each local chunk starts a segment: the tokens before it in the row are elsewhere.
        local_starts[:, [0, chunk]] = True
        local = layout_from_starts(local_starts.reshape(-1), document_ids_BS.device)

        columns = torch.arange(seq_len).expand(n_rows, seq_len)
        segment_start_BS = torch.where(starts_BS, columns, 0).cummax(dim=1).values
        prefixes = []
        for row in range(n_rows):
            for i, first in enumerate(self.chunk_starts(seq_len)):
                begin = int(segment_start_BS[row, first])
                if begin == first:
                    continue
                later = local_starts[row, i * chunk + 1 : (i + 1) * chunk].nonzero()
                run_length = 1 + int(later[0]) if len(later) else chunk
                query = row * 2 * chunk + i * chunk
                prefixes.append(
                    PrefixRun(
                        queries=slice(query, query + run_length),
                        keys=slice(row * seq_len + begin, row * seq_len + first),
                    )
                )
        row_order = self.row_order(seq_len).to(document_ids_BS.device)
        return ContextParallelLayout(self, local, tuple(prefixes), n_rows, row_order)


@dataclass(frozen=True)
class ContextParallelLayout:
    """One forward's attention plan on one rank (an `AttentionLayout`)."""

    split: ContextParallel
    local: SegmentLayout
    prefixes: tuple[PrefixRun, ...]
    n_rows: int
    row_order: torch.Tensor
    """`ContextParallel.row_order` of this batch's rows, computed once for every layer."""

    def attend(self, q_THD: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor) -> torch.Tensor:
        # Every rank joins the gather, prefixes or not: the others may need its keys. Keys and
        # values travel together, one collective per layer.
        kv_all = self.split.gather(torch.cat([k_TKD, v_TKD], dim=-1), self.n_rows, self.row_order)
        k_all, v_all = kv_all.chunk(2, dim=-1)
        return segments_and_prefixes_attention(
            q_THD, k_TKD, v_TKD, k_all, v_all, self.local, self.prefixes
        )


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh) -> ContextParallel:
    """Make `model` keep this rank's share of every row; return the split for the labels."""
    split = ContextParallel(cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank())
    model.sequence_split = split
    return split
