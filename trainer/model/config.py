"""Architecture hyper-parameters of the Llama-4 text decoder, and its parameter count.

The names follow Llama 4's public configuration where one exists (`attention_chunk_size`,
`interleave_moe_layer_step`, `floor_scale`, `attn_scale`); HF's names are noted where ours differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A configuration value or combination that cannot work; the message names the key."""


@dataclass
class VisionConfig:
    """The Llama 4 vision tower for early fusion (HF `Llama4VisionConfig` names in brackets)."""

    enabled: bool = False
    """Build the vision encoder and projector beside the text decoder."""
    dim: int = 1408
    """ViT width [hidden_size]."""
    n_layers: int = 34
    n_heads: int = 16
    ffn_dim: int = 5632
    """ViT MLP width [intermediate_size]."""
    image_size: int = 336
    """Tile side in pixels."""
    patch_size: int = 14
    n_channels: int = 3
    norm_eps: float = 1e-5
    pixel_shuffle_ratio: float = 0.5
    """Pixel shuffle merges (1 / ratio)^2 neighbouring patches: 576 -> 144 tokens per tile."""
    adapter_dim: int = 4096
    """Hidden width of the adapter MLP after pixel shuffle [projector_input_dim]."""
    output_dim: int = 4096
    """Adapter output width, the projector input [projector_output_dim, vision_output_dim]."""
    rope_theta: float = 10000.0
    """Base of the 2D RoPE over patch (column, row) coordinates [rope_parameters.rope_theta]."""
    image_token_id: int = 200092
    """The `<|patch|>` token whose positions receive image features [Llama4Config
    image_token_index, outside the vision config]."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        positive = (
            "dim", "n_layers", "n_heads", "ffn_dim", "image_size", "patch_size", "n_channels",
            "adapter_dim", "output_dim", "norm_eps", "rope_theta",
        )  # fmt: skip
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.vision.{key} must be positive, got {getattr(self, key)}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 4:
            raise ConfigError(
                f"model.vision.dim ({self.dim}) must be model.vision.n_heads ({self.n_heads}) "
                "times a head width divisible by 4 (the 2D RoPE gives half of each head's "
                "rotary pairs to columns, half to rows)"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.vision.image_size ({self.image_size}) must be a multiple of "
                f"model.vision.patch_size ({self.patch_size})"
            )
        factor = 1 / self.pixel_shuffle_ratio if self.pixel_shuffle_ratio > 0 else 0.0
        if factor < 1 or factor != round(factor) or self.patches_per_side % round(factor):
            raise ConfigError(
                "model.vision.pixel_shuffle_ratio must be 1/k for an integer k dividing "
                f"image_size // patch_size = {self.patches_per_side} (so that the adapter input "
                f"dim / ratio^2 is integral), got {self.pixel_shuffle_ratio}"
            )
        if self.image_token_id < 0:
            raise ConfigError(
                f"model.vision.image_token_id must be >= 0, got {self.image_token_id}"
            )

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def shuffle_factor(self) -> int:
        """Pixel shuffle merges shuffle_factor x shuffle_factor patches into one token."""
        return round(1 / self.pixel_shuffle_ratio)

    @property
    def tokens_per_tile(self) -> int:
        """Text-stream tokens (<|patch|> slots) per tile after pixel shuffle."""
        return int(self.patches_per_side**2 * self.pixel_shuffle_ratio**2)


@dataclass
class ModelConfig:
    vocab_size: int = 320
    """Rows of the embedding and output head; must cover the tokenizer's vocabulary."""
    dim: int = 128
    """Model width (HF `hidden_size`)."""
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    """Grouped-query attention: each KV head serves n_heads / n_kv_heads query heads."""
    head_dim: int = 0
    """0 means dim // n_heads."""
    dense_ffn_dim: int = 512
    """Width of the FFN in dense (non-MoE) layers (HF `intermediate_size_mlp`)."""
    expert_ffn_dim: int = 256
    """Width of each routed expert and of the shared expert (HF `intermediate_size`)."""
    n_experts: int = 8
    """Routed experts per MoE layer (HF `num_local_experts`); 0 makes every layer dense."""
    top_k: int = 1
    """Experts per token (HF `num_experts_per_tok`)."""
    interleave_moe_layer_step: int = 1
    """1: every layer is MoE (Scout); 2: layers 1, 3, 5, ... are MoE (Maverick)."""
    nope_layer_interval: int = 4
    """Layers with (i + 1) % interval == 0 use no RoPE and global attention; 0 disables NoPE."""
    attention_chunk_size: int = 8192
    """RoPE layers attend only within chunks of this many positions (q // C == k // C);
    0 disables chunking (HF `attention_chunk_size = null`)."""
    rope_theta: float = 500000.0
    rope_scaling: str = "none"
    """"none" or "llama3" (frequency-dependent interpolation of the rotary frequencies)."""
    rope_scaling_factor: float = 16.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 1.0
    rope_original_max_position: int = 8192
    use_qk_norm: bool = False
    """Weightless RMS norm of q and k over head_dim on RoPE layers, after RoPE (Scout)."""
    attn_temperature_tuning: bool = True
    """On NoPE layers scale q by log(floor((pos + 1) / floor_scale) + 1) * attn_scale + 1."""
    floor_scale: float = 8192.0
    attn_scale: float = 0.1
    norm_eps: float = 1e-5
    init_std: float = 0.02
    router_aux_loss_coef: float = 0.0
    """Weight of the load-balancing loss E * sum_e f_e * P_e (per micro-batch and rank)."""
    router_z_loss_coef: float = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)^2)."""
    router_bias_update_rate: float = 0.001
    """Aux-loss-free balancing: per-step update of a routing-only expert bias; 0 disables."""
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self) -> None:
        if self.head_dim == 0 and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads
        self.validate()

    def validate(self) -> None:
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads ({self.n_heads}) must be a multiple of "
                f"model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_experts < 0 or (self.n_experts and not 1 <= self.top_k <= self.n_experts):
            raise ConfigError(
                f"model.top_k ({self.top_k}) must lie in [1, model.n_experts={self.n_experts}]"
            )
        if self.interleave_moe_layer_step < 1:
            raise ConfigError("model.interleave_moe_layer_step must be >= 1")
        if self.rope_scaling not in ("none", "llama3"):
            raise ConfigError(
                f'model.rope_scaling must be "none" or "llama3", got {self.rope_scaling!r}'
            )
        if self.attention_chunk_size < 0 or self.floor_scale <= 0:
            raise ConfigError("model.attention_chunk_size must be >= 0, model.floor_scale > 0")

    def is_moe_layer(self, layer: int) -> bool:
        step = self.interleave_moe_layer_step
        return self.n_experts > 0 and layer % step == step - 1

    def uses_rope(self, layer: int) -> bool:
        interval = self.nope_layer_interval
        return interval == 0 or (layer + 1) % interval != 0


@dataclass(frozen=True)
class ParameterCount:
    total: int
    active: int
    """Parameters that touch one token: routed experts count top_k times, not n_experts."""

    def __str__(self) -> str:
        return f"{_human(self.total)} total / {_human(self.active)} active"


def _human(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Parameter count of the text decoder from the config alone, without building weights."""
    d = cfg.dim
    attention = d * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    norms = 2 * d
    swiglu = 3 * d
    total = active = 2 * cfg.vocab_size * d + d  # embedding, untied head, final norm
    for layer in range(cfg.n_layers):
        total += attention + norms
        active += attention + norms
        if cfg.is_moe_layer(layer):
            expert = swiglu * cfg.expert_ffn_dim
            router = d * cfg.n_experts
            total += router + expert * (cfg.n_experts + 1)
            active += router + expert * (cfg.top_k + 1)
        else:
            total += swiglu * cfg.dense_ffn_dim
            active += swiglu * cfg.dense_ffn_dim
    # The vision tower runs on image tiles, not on every token, so it counts in the total only
    # (as in Llama 4's published "109B total / 17B active").
    vision = vision_parameter_count(cfg.vision, cfg.dim) if cfg.vision.enabled else 0
    return ParameterCount(total=total + vision, active=active)


def vision_parameter_count(cfg: VisionConfig, text_dim: int) -> int:
    """ViT (patch embedding, class token, positions, pre/post LayerNorm, blocks with biases),
    pixel-shuffle adapter MLP and the projector into the text width."""
    d = cfg.dim
    patches = cfg.patches_per_side**2
    embedding = cfg.n_channels * cfg.patch_size**2 * d + d + (patches + 1) * d + 4 * d
    block = 4 * (d * d + d) + 2 * d * cfg.ffn_dim + cfg.ffn_dim + d + 4 * d
    shuffled = int(d / cfg.pixel_shuffle_ratio**2)  # channels after pixel shuffle
    adapter = shuffled * cfg.adapter_dim + cfg.adapter_dim * cfg.output_dim
    projector = cfg.output_dim * text_dim
    return embedding + cfg.n_layers * block + adapter + projector


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) for MFU.

    6 * active matmul parameters plus causal attention scores and values; the embedding lookup
    is not a matmul and is left out, as in PaLM's appendix B.
    """
    params = count_parameters(cfg).active - cfg.vocab_size * cfg.dim
    attention = 6 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len  # causal: half of 12
    return 6.0 * params + attention
