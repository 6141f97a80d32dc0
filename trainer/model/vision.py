"""The Llama-4 vision tower for early fusion: a ViT encoder, a pixel-shuffle adapter, a projector.

Shape legend: N tiles, P patches per tile ((image_size / patch_size)^2), S = P + 1 tokens through
the ViT (the patches, then the class token), D ViT width, H heads, K head dim, R = K / 2 rotary
pairs, L tokens per tile after pixel shuffle, C channels after pixel shuffle, E text width.
`pixels_NCHW` is the usual image layout (tiles, channels, pixel rows, pixel columns).

Llama 4 semantics (checked against HF transformers' `Llama4VisionModel`): the class token is
appended AFTER the patches (its learned position is the last row) and is dropped after the
post-norm; every block is pre-LayerNorm with biases, bidirectional attention with a 2D RoPE on
the patch coordinates, and a GELU MLP; the adapter applies GELU after both of its layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.model.attention import depth_scaled_std
from trainer.model.config import VisionConfig
from trainer.model.rope import apply_rope


def patchify(pixels_NCHW: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, channels, rows, cols) -> (N, P, channels * patch_size^2), patches in row-major order,
    each flattened channel-major: the layout of `nn.Unfold`, which the released weights expect."""
    n, channels, height, width = pixels_NCHW.shape
    p = patch_size
    blocks = pixels_NCHW.reshape(n, channels, height // p, p, width // p, p)
    return blocks.permute(0, 2, 4, 1, 3, 5).reshape(n, (height // p) * (width // p), -1)


def vision_rope_rotations(cfg: VisionConfig, device: torch.device) -> torch.Tensor:
    """(S, R) unit complex rotations of the 2D RoPE, float32.

    The first half of each head's pairs turns with the patch column, the second half with its
    row, both counted from 1; the class token (last) is not rotated.
    """
    head_dim = cfg.dim // cfg.n_heads
    exponents = torch.arange(head_dim // 4, device=device) * 4 / head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    patch = torch.arange(cfg.patches_per_side**2, device=device)
    column = patch % cfg.patches_per_side + 1
    row = patch // cfg.patches_per_side + 1
    angles_PR = torch.cat([column[:, None] * inv_freq, row[:, None] * inv_freq], dim=-1)
    angles_SR = torch.cat([angles_PR, angles_PR.new_zeros(1, angles_PR.shape[1])])
    return torch.polar(torch.ones_like(angles_SR), angles_SR)


def pixel_shuffle(x_NPD: torch.Tensor, ratio: float) -> torch.Tensor:
    """Merge each k x k block of neighbouring patches (k = 1 / ratio) into one token.

    (N, P, D) -> (N, P / k^2, k^2 * D); tokens stay in row-major order and a token's channels are
    its block's patches, row-major, each D wide.
    """
    n, n_patches, dim = x_NPD.shape
    k = round(1 / ratio)
    side = round(n_patches**0.5)
    blocks = x_NPD.reshape(n, side // k, k, side // k, k, dim)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(n, n_patches // k**2, k * k * dim)


def init_layer_norm(norm: nn.LayerNorm) -> None:
    nn.init.ones_(norm.weight)
    nn.init.zeros_(norm.bias)


def init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


class VisionAttention(nn.Module):
    """Full bidirectional multi-head attention with biases and the 2D RoPE."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=True)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=True)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=True)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            init_linear(linear, std)
        init_linear(self.wo, out_std)

    def forward(self, x_NSD: torch.Tensor, rotations_SR: torch.Tensor) -> torch.Tensor:
        n, seq_len, _ = x_NSD.shape
        q, k, v = (
            w(x_NSD).view(n, seq_len, self.n_heads, self.head_dim)
            for w in (self.wq, self.wk, self.wv)
        )
        q, k = apply_rope(q, rotations_SR), apply_rope(k, rotations_SR)
        out_NHSK = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        )
        return self.wo(out_NHSK.transpose(1, 2).reshape(n, seq_len, -1))


class VisionMLP(nn.Module):
    """w2(gelu(w1 x)) with biases."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=True)
        self.w2 = nn.Linear(hidden_dim, dim, bias=True)

    def init_weights(self, std: float, out_std: float) -> None:
        init_linear(self.w1, std)
        init_linear(self.w2, out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = VisionAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = VisionMLP(cfg.dim, cfg.ffn_dim)

    def init_weights(self, std: float) -> None:
        out_std = depth_scaled_std(std, self.layer)
        init_layer_norm(self.attention_norm)
        init_layer_norm(self.ffn_norm)
        self.attention.init_weights(std, out_std)
        self.feed_forward.init_weights(std, out_std)

    def forward(self, x_NSD: torch.Tensor, rotations_SR: torch.Tensor) -> torch.Tensor:
        h = x_NSD + self.attention(self.attention_norm(x_NSD), rotations_SR)
        return h + self.feed_forward(self.ffn_norm(h))


class VisionAdapter(nn.Module):
    """Pixel shuffle, then gelu(w2 gelu(w1 x)): GELU follows BOTH layers; no biases."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.w1 = nn.Linear(cfg.dim * cfg.shuffle_factor**2, cfg.adapter_dim, bias=False)
        self.w2 = nn.Linear(cfg.adapter_dim, cfg.output_dim, bias=False)

    def init_weights(self, std: float) -> None:
        init_linear(self.w1, std)
        init_linear(self.w2, std)

    def forward(self, x_NPD: torch.Tensor) -> torch.Tensor:
        x_NLC = pixel_shuffle(x_NPD, self.ratio)
        return F.gelu(self.w2(F.gelu(self.w1(x_NLC))))


class VisionEncoder(nn.Module):
    """Tiles -> (N, L, output_dim) adapter features."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        patch_pixels = cfg.n_channels * cfg.patch_size**2
        self.patch_embedding = nn.Linear(patch_pixels, cfg.dim, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(cfg.dim))
        self.position_embedding = nn.Parameter(torch.empty(cfg.patches_per_side**2 + 1, cfg.dim))
        self.norm_pre = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        # Keys are str(i) so parameter names stay stable whatever wraps the blocks.
        self.layers = nn.ModuleDict({str(i): VisionBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm_post = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.adapter = VisionAdapter(cfg)

    def init_weights(self, std: float) -> None:
        init_linear(self.patch_embedding, std)
        # Class token and positions start at the width's natural scale, as in the release.
        nn.init.normal_(self.class_embedding, std=self.cfg.dim**-0.5)
        nn.init.normal_(self.position_embedding, std=self.cfg.dim**-0.5)
        init_layer_norm(self.norm_pre)
        for block in self.layers.values():
            block.init_weights(std)
        init_layer_norm(self.norm_post)
        self.adapter.init_weights(std)

    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        # Pixels come from the data pipeline in float32; the tower may run in another dtype.
        patches = patchify(pixels_NCHW.to(self.patch_embedding.weight.dtype), self.cfg.patch_size)
        x_NPD = self.patch_embedding(patches)
        class_N1D = self.class_embedding.to(x_NPD.dtype).expand(x_NPD.shape[0], 1, -1)
        x_NSD = torch.cat([x_NPD, class_N1D], dim=1) + self.position_embedding.to(x_NPD.dtype)
        x_NSD = self.norm_pre(x_NSD)
        rotations_SR = vision_rope_rotations(self.cfg, x_NSD.device)
        for block in self.layers.values():
            x_NSD = block(x_NSD, rotations_SR)
        patches_NPD = self.norm_post(x_NSD)[:, :-1]  # the class token is not an image feature
        return self.adapter(patches_NPD)


class VisionProjector(nn.Module):
    """Linear map of adapter features into the text width, without bias."""

    def __init__(self, output_dim: int, text_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(text_dim, output_dim))

    def init_weights(self, std: float) -> None:
        nn.init.trunc_normal_(self.weight, std=std, a=-3 * std, b=3 * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class VisionTower(nn.Module):
    """Encoder + projector: (N, channels, image_size, image_size) tiles -> (N * L, E) features,
    tile after tile, each tile's tokens in row-major order (the order of its <|patch|> slots)."""

    def __init__(self, cfg: VisionConfig, text_dim: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = VisionEncoder(cfg)
        self.projector = VisionProjector(cfg.output_dim, text_dim)

    def init_weights(self, std: float) -> None:
        """Initialise every parameter; call after `to_empty` when built on meta."""
        self.encoder.init_weights(std)
        self.projector.init_weights(std)

    def forward(self, pixels_NCHW: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        expected = (cfg.n_channels, cfg.image_size, cfg.image_size)
        if pixels_NCHW.ndim != 4 or tuple(pixels_NCHW.shape[1:]) != expected:
            raise ValueError(
                f"pixel values must be tiles of shape (N, {', '.join(map(str, expected))}), "
                f"got {tuple(pixels_NCHW.shape)}"
            )
        features_NLE = self.projector(self.encoder(pixels_NCHW))
        return features_NLE.reshape(-1, features_NLE.shape[-1])


def fuse_image_features(
    embeddings_BSD: torch.Tensor,
    tokens_BS: torch.Tensor,
    features_PD: torch.Tensor,
    image_token_id: int,
) -> torch.Tensor:
    """Token embeddings with the P image-token positions replaced, in order, by feature rows.

    Here the letters are the text decoder's: B rows, S sequence, D text width, P image tokens.
    Out of place, so gradients reach both `embeddings_BSD` (elsewhere) and `features_PD`.
    """
    # note: nonzero sizes its output from the data; a CPU-GPU sync point on CUDA.
    slots = (tokens_BS.reshape(-1) == image_token_id).nonzero().squeeze(1)
    if slots.numel() != features_PD.shape[0]:
        raise ValueError(
            f"{slots.numel()} image tokens (id {image_token_id}) in the batch but "
            f"{features_PD.shape[0]} image feature rows"
        )
    flat_TD = embeddings_BSD.reshape(-1, embeddings_BSD.shape[-1])
    fused_TD = flat_TD.index_copy(0, slots, features_PD.to(flat_TD.dtype))
    return fused_TD.view_as(embeddings_BSD)
