"""Grouped-query attention with iRoPE, document masking and chunked local attention.

Shape legend: B batch rows, S sequence length, T = B * S tokens, H query heads, K key/value heads,
D model dim, Dh head dim, N segments in a bucket, P padded segment length.

Every mask this model needs is block-diagonal-causal: a token sees earlier tokens of its own
*segment*, where a segment is a maximal run of tokens of one document (and, on RoPE layers, of one
attention chunk, since positions restart per document and chunk = position // chunk_size). So
instead of materialising a seq x seq mask we cut the token stream into segments, pad segments of
similar length into a batch (length buckets a power of two apart, so padding at most doubles the
work) and run ordinary causal `scaled_dot_product_attention` on each bucket. Memory stays linear
in sequence length, and CPU and CUDA take their flash kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.config import ModelConfig
from trainer.model.numerics import upcast
from trainer.model.rope import apply_rope, rope_rotations


@dataclass(frozen=True)
class SegmentBucket:
    gather_index: torch.Tensor
    """(N * P,) token index of every padded slot; padding points at the extra zero row T."""
    n_segments: int
    length: int


@dataclass(frozen=True)
class SegmentLayout:
    """Where each token goes among the padded, length-bucketed causal segments of a batch."""

    buckets: tuple[SegmentBucket, ...]
    scatter_index: torch.Tensor
    """(T,) the slot of each token in the concatenation of all buckets' padded slots."""
    uniform_length: int | None = None
    """Set when every segment has this length: the stream is then a plain reshape, no gather
    (rows without document boundaries, cut only at attention chunks)."""

    def attend(self, q_THD: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor) -> torch.Tensor:
        return segment_causal_attention(q_THD, k_TKD, v_TKD, self)


class AttentionLayout(Protocol):
    """Computes masked attention over a batch's token stream: a SegmentLayout, or a
    context-parallel layout (parallel/context.py) whose keys also live on other ranks."""

    def attend(
        self, q_THD: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor
    ) -> torch.Tensor: ...


class SequenceSplit(Protocol):
    """Keeps one rank's share of every row: context parallelism (parallel/context.py).

    The model still receives whole rows. It embeds them, then keeps its `shard` of the tokens;
    attention across the shards is the split's `layout`, built from the whole rows' ids.
    """

    def shard(self, x_BS: torch.Tensor) -> torch.Tensor: ...

    def layout(
        self, document_ids_BS: torch.Tensor, positions_BS: torch.Tensor, chunk_size: int | None
    ) -> AttentionLayout: ...


def segment_starts(
    document_ids_BS: torch.Tensor, positions_BS: torch.Tensor, chunk_size: int | None
) -> torch.Tensor:
    """(B, S) bool on the CPU: True where a segment starts (row start, document or chunk change)."""
    # note: host-side bookkeeping on a few int tensors; a CPU-GPU sync point on CUDA.
    doc, pos = document_ids_BS.cpu(), positions_BS.cpu()
    chunk = pos // chunk_size if chunk_size else torch.zeros_like(pos)
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = (doc[:, 1:] != doc[:, :-1]) | (chunk[:, 1:] != chunk[:, :-1])
    return starts


def build_segment_layout(
    document_ids_BS: torch.Tensor, positions_BS: torch.Tensor, chunk_size: int | None
) -> SegmentLayout:
    """Cut the batch into causal segments, starting anew at each row, document or chunk change."""
    starts = segment_starts(document_ids_BS, positions_BS, chunk_size)
    return layout_from_starts(starts.reshape(-1), document_ids_BS.device)


def layout_from_starts(starts_T: torch.Tensor, device: torch.device) -> SegmentLayout:
    """The segment layout of a token stream whose segments begin where `starts_T` is True."""
    n_tokens = starts_T.numel()
    start_T = starts_T.nonzero().squeeze(1)
    length_T = torch.diff(start_T, append=torch.tensor([n_tokens]))
    if bool((length_T == length_T[0]).all()):
        length = int(length_T[0])
        uniform = SegmentBucket(torch.arange(n_tokens, device=device), len(length_T), length)
        return SegmentLayout((uniform,), torch.arange(n_tokens, device=device), length)
    bucket_key = torch.ceil(torch.log2(length_T.double())).long()

    buckets, gathers = [], []
    for key in torch.unique(bucket_key).tolist():
        members = (bucket_key == key).nonzero().squeeze(1)
        length = int(length_T[members].max())
        offsets = torch.arange(length)
        token = start_T[members, None] + offsets
        valid = offsets < length_T[members, None]
        gather = torch.where(valid, token, n_tokens).reshape(-1)
        gathers.append(gather)
        buckets.append(SegmentBucket(gather.to(device), len(members), length))
    all_slots = torch.cat(gathers)
    real = all_slots < n_tokens
    scatter = torch.empty(n_tokens, dtype=torch.long)
    scatter[all_slots[real]] = real.nonzero().squeeze(1)
    return SegmentLayout(tuple(buckets), scatter.to(device))


def segment_causal_attention(
    q_THD: torch.Tensor, k_TKD: torch.Tensor, v_TKD: torch.Tensor, layout: SegmentLayout
) -> torch.Tensor:
    """Causal attention inside each segment of `layout`; tokens of different segments never meet."""
    n_heads, head_dim = q_THD.shape[1:]
    if layout.uniform_length is not None:
        length = layout.uniform_length

        def segments(x: torch.Tensor) -> torch.Tensor:
            return x.view(-1, length, *x.shape[1:]).transpose(1, 2)

        out_NHPD = F.scaled_dot_product_attention(
            segments(q_THD), segments(k_TKD), segments(v_TKD), is_causal=True, enable_gqa=True
        )
        return out_NHPD.transpose(1, 2).reshape(-1, n_heads, head_dim)

    def with_zero_row(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, x.new_zeros(1, *x.shape[1:])])

    q_ext, k_ext, v_ext = with_zero_row(q_THD), with_zero_row(k_TKD), with_zero_row(v_TKD)
    outputs = []
    for bucket in layout.buckets:

        def padded(x: torch.Tensor, b: SegmentBucket = bucket) -> torch.Tensor:
            x_NPhD = x[b.gather_index].view(b.n_segments, b.length, *x.shape[1:])
            return x_NPhD.transpose(1, 2)

        # Padding sits after each segment's last token, so causal masking hides it from real
        # queries; the padded query rows produce values that the scatter below never reads.
        out_NHPD = F.scaled_dot_product_attention(
            padded(q_ext), padded(k_ext), padded(v_ext), is_causal=True, enable_gqa=True
        )
        outputs.append(out_NHPD.transpose(1, 2).reshape(-1, n_heads, head_dim))
    return torch.cat(outputs)[layout.scatter_index]


@dataclass(frozen=True)
class AttentionInputs:
    """Per-batch tensors shared by every attention layer, built once per forward."""

    rotations_BSR: torch.Tensor
    """Complex RoPE rotations for each token's (document-relative) position."""
    temperature_BS: torch.Tensor | None
    """NoPE-layer query scale per token, or None when temperature tuning is off."""
    rope_layout: AttentionLayout
    """Segments of documents cut at attention-chunk boundaries (RoPE layers)."""
    global_layout: AttentionLayout
    """Segments of whole documents (NoPE layers)."""


def build_attention_inputs(
    cfg: ModelConfig,
    inv_freq: torch.Tensor,
    positions_BS: torch.Tensor,
    document_ids_BS: torch.Tensor,
    split: SequenceSplit | None = None,
) -> AttentionInputs:
    """Layouts from the whole rows; rotations and temperatures for this rank's tokens (`split`)."""
    build_layout = build_segment_layout if split is None else split.layout
    global_layout = build_layout(document_ids_BS, positions_BS, None)
    chunk = cfg.attention_chunk_size
    rope_layout = (
        global_layout
        if chunk == 0 or int(positions_BS.max()) < chunk
        else build_layout(document_ids_BS, positions_BS, chunk)
    )
    if split is not None:
        positions_BS = split.shard(positions_BS)
    temperature = None
    if cfg.attn_temperature_tuning:
        steps = torch.floor((upcast(positions_BS) + 1.0) / cfg.floor_scale)
        temperature = torch.log1p(steps) * cfg.attn_scale + 1.0
    return AttentionInputs(
        rotations_BSR=rope_rotations(positions_BS, inv_freq),
        temperature_BS=temperature,
        rope_layout=rope_layout,
        global_layout=global_layout,
    )


def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = upcast(x)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Attention(nn.Module):
    """GQA; RoPE + chunked local attention, or (NoPE layers) global attention with temperature."""

    def __init__(self, cfg: ModelConfig, use_rope: bool):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.use_rope = use_rope
        self.use_qk_norm = cfg.use_qk_norm and use_rope
        self.temperature_tuning = cfg.attn_temperature_tuning and not use_rope
        self.norm_eps = cfg.norm_eps
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)

    def forward(self, x_BSD: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        batch, seq_len, _ = x_BSD.shape
        q = self.wq(x_BSD).view(batch, seq_len, self.n_heads, self.head_dim)
        k = self.wk(x_BSD).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        v = self.wv(x_BSD).view(batch, seq_len, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, inputs.rotations_BSR), apply_rope(k, inputs.rotations_BSR)
            if self.use_qk_norm:
                q, k = weightless_rms_norm(q, self.norm_eps), weightless_rms_norm(k, self.norm_eps)
        elif self.temperature_tuning and inputs.temperature_BS is not None:
            q = (q * inputs.temperature_BS[..., None, None]).to(q.dtype)
        layout = inputs.rope_layout if self.use_rope else inputs.global_layout
        n_tokens = batch * seq_len
        out_THD = layout.attend(
            q.reshape(n_tokens, self.n_heads, self.head_dim),
            k.reshape(n_tokens, self.n_kv_heads, self.head_dim),
            v.reshape(n_tokens, self.n_kv_heads, self.head_dim),
        )
        return self.wo(out_THD.reshape(batch, seq_len, -1))


def depth_scaled_std(std: float, layer: int) -> float:
    """Output projections shrink with depth so the residual stream does not grow with layers."""
    return std / math.sqrt(2 * (layer + 1))
