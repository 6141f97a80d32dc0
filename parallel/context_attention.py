"""Exact attention assembled from blocks, merged by log-sum-exp: context parallelism's kernel.

Shape legend: T local tokens, H query heads, K key/value heads, Dh head dim, N segments, P padded
segment length, L queries and M keys of one block.

Under context parallelism a query's visible keys come in two kinds of blocks
(parallel/context.py): causal segments among the rank's own tokens (`SegmentLayout`, as on one
rank) and, for at most one run of queries per local chunk and row, a *prefix*: keys of the same
segment gathered from earlier chunks, all visible. Each block is one flash-attention call that
also returns the log-sum-exp of its scores; blocks are combined as

    lse = logaddexp(lse_a, lse_b),  out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b,

which is exactly softmax over the union of the keys, without ever forming a score matrix larger
than one block (memory linear in sequence length). Backward calls each block's flash backward
with the MERGED output and log-sum-exp: the block's probabilities exp(s - lse) are then the true
ones over all keys, and rowsum(dout * out) the true correction, so each block's gradients are
exact and simply add up (the ring-attention identity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.model.attention import SegmentLayout
from trainer.model.numerics import upcast


@dataclass(frozen=True)
class PrefixRun:
    """Queries `queries` (local token rows) see all of `keys` (rows of the gathered stream)."""

    queries: slice
    keys: slice


def _flash_forward(
    q_NHLD: torch.Tensor, k_NHMD: torch.Tensor, v_NHMD: torch.Tensor, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (N, H, L, Dh), lse (N, H, L) float32) of softmax attention, causal top-left."""
    if q_NHLD.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_NHLD, k_NHMD, v_NHMD, 0.0, causal
        )
        return out, lse
    if q_NHLD.device.type == "cuda":
        out, lse, *_ = torch.ops.aten._scaled_dot_product_flash_attention(
            q_NHLD, k_NHMD, v_NHMD, 0.0, causal
        )
        return out, lse
    raise NotImplementedError(f"context-parallel attention has no kernel for {q_NHLD.device}")


def _flash_backward(
    dout_NHLD: torch.Tensor,
    q_NHLD: torch.Tensor,
    k_NHMD: torch.Tensor,
    v_NHMD: torch.Tensor,
    out_NHLD: torch.Tensor,
    lse_NHL: torch.Tensor,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if q_NHLD.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout_NHLD, q_NHLD, k_NHMD, v_NHMD, out_NHLD, lse_NHL, 0.0, causal
        )
    # CUDA: no dropout, so the philox state is unused; the cumulative lengths are for varlen.
    n, _, length, _ = q_NHLD.shape
    unused = torch.empty(0, dtype=torch.int64, device=q_NHLD.device)
    grads = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        dout_NHLD, q_NHLD, k_NHMD, v_NHMD, out_NHLD, lse_NHL, unused, unused,
        length, k_NHMD.shape[2], 0.0, causal, unused, unused,
    )  # fmt: skip
    return grads[0], grads[1], grads[2]


def _merge_into(
    out_LHD: torch.Tensor,
    lse_LH: torch.Tensor,
    block_out_LHD: torch.Tensor,
    block_lse_LH: torch.Tensor,
) -> None:
    """Fold one more block's result into (out, lse), in place; out at least float32."""
    lse = torch.logaddexp(lse_LH, block_lse_LH)
    kept = (lse_LH - lse).exp()[..., None]
    added = (block_lse_LH - lse).exp()[..., None]
    out_LHD.copy_(kept * out_LHD + added * upcast(block_out_LHD))
    lse_LH.copy_(lse)


def _heads_first(x_LHD: torch.Tensor) -> torch.Tensor:
    """(L, H, Dh) -> (1, H, L, Dh): one block in the kernels' layout."""
    return x_LHD.transpose(0, 1).unsqueeze(0)


def _tokens_first(x_1HLD: torch.Tensor) -> torch.Tensor:
    return x_1HLD.squeeze(0).transpose(0, 1)


class _Padded:
    """Gathers token rows into a layout's padded segments (N, H, P, Dh) and back.

    Padding slots read an extra row (index T): zeros, or +inf for a log-sum-exp, so that padded
    query rows have zero probabilities in backward and contribute no gradient.
    """

    def __init__(self, layout: SegmentLayout):
        self.layout = layout

    def gather(self, x_T: torch.Tensor, pad_value: float = 0.0) -> list[torch.Tensor]:
        layout = self.layout
        if layout.uniform_length is not None:
            return [x_T.view(-1, layout.uniform_length, *x_T.shape[1:]).transpose(1, 2)]
        extended = torch.cat([x_T, x_T.new_full((1, *x_T.shape[1:]), pad_value)])
        return [
            extended[b.gather_index].view(b.n_segments, b.length, *x_T.shape[1:]).transpose(1, 2)
            for b in layout.buckets
        ]

    def scatter(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """Token rows back from the padded blocks; each token has exactly one slot."""
        flat = torch.cat([b.transpose(1, 2).flatten(0, 1) for b in blocks])
        return flat[self.layout.scatter_index]


def _segments_forward(
    q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, layout: SegmentLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    padded = _Padded(layout)
    outs, lses = [], []
    for q, k, v in zip(
        padded.gather(q_THD), padded.gather(k_THD), padded.gather(v_THD), strict=True
    ):
        out, lse = _flash_forward(q, k, v, causal=True)
        outs.append(out)
        lses.append(lse.unsqueeze(-1))
    return padded.scatter(outs), padded.scatter(lses).squeeze(-1)


def _segments_backward(
    dout_THD: torch.Tensor,
    q_THD: torch.Tensor,
    k_THD: torch.Tensor,
    v_THD: torch.Tensor,
    out_THD: torch.Tensor,
    lse_TH: torch.Tensor,
    layout: SegmentLayout,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    padded = _Padded(layout)
    lse_blocks = padded.gather(lse_TH.unsqueeze(-1), pad_value=float("inf"))
    dqs, dks, dvs = [], [], []
    for dout, q, k, v, out, lse in zip(
        padded.gather(dout_THD),
        padded.gather(q_THD),
        padded.gather(k_THD),
        padded.gather(v_THD),
        padded.gather(out_THD),
        lse_blocks,
        strict=True,
    ):
        dq, dk, dv = _flash_backward(dout, q, k, v, out, lse.squeeze(-1), causal=True)
        dqs.append(dq)
        dks.append(dk)
        dvs.append(dv)
    # Padded key slots get gradients too (from padded queries: zero); each real token's key has
    # exactly one slot, so the scatter is exact.
    return padded.scatter(dqs), padded.scatter(dks), padded.scatter(dvs)


def _repeat_kv(x_TKD: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA: query head h uses key/value head h // groups."""
    return x_TKD.repeat_interleave(groups, dim=1) if groups > 1 else x_TKD


def _sum_kv(grad_THD: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return grad_THD
    return grad_THD.unflatten(1, (-1, groups)).sum(2)


class _SegmentsAndPrefixes(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q_THD: torch.Tensor,
        k_TKD: torch.Tensor,
        v_TKD: torch.Tensor,
        k_all_TKD: torch.Tensor,
        v_all_TKD: torch.Tensor,
        local: SegmentLayout,
        prefixes: tuple[PrefixRun, ...],
    ) -> torch.Tensor:
        groups = q_THD.shape[1] // k_TKD.shape[1]
        k, v = _repeat_kv(k_TKD, groups), _repeat_kv(v_TKD, groups)
        out, lse = _segments_forward(q_THD, k, v, local)
        for run in prefixes:
            block_out, block_lse = _flash_forward(
                _heads_first(q_THD[run.queries]),
                _heads_first(_repeat_kv(k_all_TKD[run.keys], groups)),
                _heads_first(_repeat_kv(v_all_TKD[run.keys], groups)),
                causal=False,
            )
            lse_run = lse[run.queries]
            out_run = upcast(out[run.queries])
            _merge_into(out_run, lse_run, _tokens_first(block_out), block_lse.squeeze(0).T)
            out[run.queries] = out_run.to(out.dtype)
            lse[run.queries] = lse_run
        ctx.save_for_backward(q_THD, k_TKD, v_TKD, k_all_TKD, v_all_TKD, out, lse)
        ctx.local, ctx.prefixes, ctx.groups = local, prefixes, groups
        return out

    @staticmethod
    def backward(ctx, dout_THD: torch.Tensor):
        q, k_TKD, v_TKD, k_all_TKD, v_all_TKD, out, lse = ctx.saved_tensors
        groups = ctx.groups
        dout_THD = dout_THD.contiguous()
        k, v = _repeat_kv(k_TKD, groups), _repeat_kv(v_TKD, groups)
        dq, dk, dv = _segments_backward(dout_THD, q, k, v, out, lse, ctx.local)
        dk_all = torch.zeros_like(_repeat_kv(k_all_TKD, groups))
        dv_all = torch.zeros_like(dk_all)
        for run in ctx.prefixes:
            dq_run, dk_run, dv_run = _flash_backward(
                _heads_first(dout_THD[run.queries]),
                _heads_first(q[run.queries]),
                _heads_first(_repeat_kv(k_all_TKD[run.keys], groups)),
                _heads_first(_repeat_kv(v_all_TKD[run.keys], groups)),
                _heads_first(out[run.queries]),
                lse[run.queries].T.unsqueeze(0),
                causal=False,
            )
            dq[run.queries] += _tokens_first(dq_run)
            dk_all[run.keys] += _tokens_first(dk_run)
            dv_all[run.keys] += _tokens_first(dv_run)
        return (
            dq,
            _sum_kv(dk, groups),
            _sum_kv(dv, groups),
            _sum_kv(dk_all, groups),
            _sum_kv(dv_all, groups),
            None,
            None,
        )


def segments_and_prefixes_attention(
    q_THD: torch.Tensor,
    k_TKD: torch.Tensor,
    v_TKD: torch.Tensor,
    k_all_TKD: torch.Tensor,
    v_all_TKD: torch.Tensor,
    local: SegmentLayout,
    prefixes: tuple[PrefixRun, ...],
) -> torch.Tensor:
    """Attention of the local queries over their causal segments (`local`, among the local
    keys) and their prefix runs (in the gathered keys), exact in forward and backward."""
    return _SegmentsAndPrefixes.apply(q_THD, k_TKD, v_TKD, k_all_TKD, v_all_TKD, local, prefixes)
