"""The Llama-4 text decoder: embeddings, pre-norm blocks (attention + dense FFN or MoE), head.

The model knows nothing of devices or parallelism. Build it on any device (or "meta"), then
call `init_weights()`: modules are created with uninitialised storage on purpose, so a model
materialised with `to_empty` after sharding is initialised exactly once, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from trainer.model.attention import (
    Attention,
    AttentionInputs,
    SequenceSplit,
    build_attention_inputs,
    depth_scaled_std,
)
from trainer.model.config import ModelConfig
from trainer.model.moe import FeedForward, MoE
from trainer.model.numerics import upcast
from trainer.model.rope import rope_inverse_frequencies
from trainer.model.vision import VisionTower, fuse_image_features


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = upcast(x)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, use_rope=cfg.uses_rope(layer))
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer)
        self.feed_forward: MoE | FeedForward = (
            MoE(cfg) if self.is_moe else FeedForward(cfg.dim, cfg.dense_ffn_dim)
        )

    def init_weights(self, std: float) -> None:
        out_std = depth_scaled_std(std, self.layer)
        self.attention_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)

    def forward(
        self, x_BSD: torch.Tensor, inputs: AttentionInputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = x_BSD + self.attention(self.attention_norm(x_BSD), inputs)
        normed = self.ffn_norm(h)
        if isinstance(self.feed_forward, MoE):
            ffn_out, router_loss = self.feed_forward(normed)
        else:
            ffn_out, router_loss = self.feed_forward(normed), h.new_zeros((), dtype=torch.float32)
        return h + ffn_out, router_loss


@dataclass
class ModelOutput:
    logits_BSV: torch.Tensor
    router_loss: torch.Tensor
    """Sum over MoE layers of the weighted aux and z losses of this forward (scalar, float32)."""


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # Keys are str(i) so parameter names stay stable whatever wraps the blocks.
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Early fusion: image features replace the embeddings at <|patch|> positions.
        self.vision = VisionTower(cfg.vision, cfg.dim) if cfg.vision.enabled else None
        # Context parallelism sets this (parallel/context.py): the blocks then see only this
        # rank's share of each row, and the logits are that share's.
        self.sequence_split: SequenceSplit | None = None

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer; call after `to_empty` when built on meta."""
        std = self.cfg.init_std
        nn.init.normal_(self.tok_embeddings.weight, std=1.0)
        for block in self.layers.values():
            block.init_weights(std)
        self.norm.init_weights()
        head_std = self.cfg.dim**-0.5
        nn.init.trunc_normal_(self.output.weight, std=head_std, a=-3 * head_std, b=3 * head_std)
        if self.vision is not None:
            self.vision.init_weights(std)

    def moe_layers(self) -> dict[int, MoE]:
        return {
            int(i): block.feed_forward
            for i, block in self.layers.items()
            if isinstance(block.feed_forward, MoE)
        }

    def fuse_images(
        self, embeddings_BSD: torch.Tensor, tokens_BS: torch.Tensor, pixel_values: torch.Tensor
    ) -> torch.Tensor:
        if self.vision is None:
            raise ValueError("pixel_values were given but model.vision.enabled is false")
        features = self.vision(pixel_values)
        return fuse_image_features(
            embeddings_BSD, tokens_BS, features, self.cfg.vision.image_token_id
        )

    def idle_vision_term(self, like: torch.Tensor) -> torch.Tensor:
        """Zero that depends on every vision parameter, for a batch without images.

        When some data-parallel ranks have images in a micro-batch and others do not, every
        rank must still run the tower: sharded data parallelism gathers and reduces its
        parameters collectively, and a rank that skipped it would leave the others waiting.
        """
        cfg = self.cfg.vision
        blank = like.new_zeros(1, cfg.n_channels, cfg.image_size, cfg.image_size)
        return self.vision(blank).sum() * 0.0

    def forward(
        self,
        tokens_BS: torch.Tensor,
        positions_BS: torch.Tensor | None = None,
        document_ids_BS: torch.Tensor | None = None,
        embeddings_BSD: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for every position (of this rank's share under context parallelism).

        Without positions/document ids each row is one document.

        `embeddings_BSD`, when given, replaces the token embedding lookup (tests differentiate
        through it). `pixel_values`, (tiles, channels, image_size, image_size) float, are encoded
        and their features written, tile after tile, at the image-token positions of `tokens_BS`.
        """
        if positions_BS is None:
            positions_BS = torch.arange(tokens_BS.shape[1], device=tokens_BS.device).expand_as(
                tokens_BS
            )
        if document_ids_BS is None:
            document_ids_BS = torch.zeros_like(tokens_BS)
        # Recomputed per forward (head_dim / 2 values) so it stays float32 whatever dtype the
        # module is cast to, as in the reference implementation.
        inv_freq = rope_inverse_frequencies(self.cfg).to(tokens_BS.device)
        inputs = build_attention_inputs(
            self.cfg, inv_freq, positions_BS, document_ids_BS, self.sequence_split
        )
        h = self.tok_embeddings(tokens_BS) if embeddings_BSD is None else embeddings_BSD
        if pixel_values is not None:
            h = self.fuse_images(h, tokens_BS, pixel_values)
        elif self.vision is not None and self.training:
            h = h + self.idle_vision_term(h)
        if self.sequence_split is not None:
            h = self.sequence_split.shard(h)
        router_loss = h.new_zeros((), dtype=torch.float32)
        for block in self.layers.values():
            h, block_router_loss = block(h, inputs)
            router_loss = router_loss + block_router_loss
        return ModelOutput(self.output(self.norm(h)), router_loss)
