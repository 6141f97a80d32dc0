"""The vision tower's names in HF transformers' Llama 4, both ways: config and weights.

Weights: HF names are taken RELATIVE to the vision model (`patch_embedding.linear.weight`,
`model.layers.0.self_attn.q_proj.weight`, `vision_adapter.mlp.fc1.weight`, ...), except the
projector, which keeps its full checkpoint name `multi_modal_projector.linear_1.weight`. In a
`Llama4ForConditionalGeneration` checkpoint (released, or written by transformers 5.23
`save_pretrained`, which loads back the same names) the vision keys are `HF_VISION_PREFIX` + the
relative name and the projector is `HF_PROJECTOR` as is. Our names are the Transformer's
(`vision.encoder...`, `vision.projector.weight`). Every tensor has the same shape and layout on
both sides, so the mapping is a pure rename and round trips are bit-identical.

Config: HF's `vision_config` dict of a `Llama4Config`. The token id that marks image positions
(`image_token_index`) sits on the top-level `Llama4Config`, so it is passed separately.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from trainer.model.config import ConfigError, VisionConfig

HF_VISION_PREFIX = "vision_model."
HF_PROJECTOR = "multi_modal_projector.linear_1.weight"
OUR_PREFIX = "vision."

# HF builds every vision LayerNorm with torch's default eps and never reads `norm_eps`.
HF_LAYER_NORM_EPS = 1e-5

# Our name <-> HF name inside each encoder block (both carry a weight and a bias).
_BLOCK_NAMES = {
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.fc1",
    "feed_forward.w2": "mlp.fc2",
}
# Our name (after OUR_PREFIX) <-> HF name (relative to the vision model); {i} is the layer index.
_NAMES = {
    "encoder.patch_embedding.weight": "patch_embedding.linear.weight",
    "encoder.class_embedding": "class_embedding",
    "encoder.position_embedding": "positional_embedding_vlm",
    "encoder.norm_pre.weight": "layernorm_pre.weight",
    "encoder.norm_pre.bias": "layernorm_pre.bias",
    **{
        f"encoder.layers.{{i}}.{ours}.{kind}": f"model.layers.{{i}}.{hf}.{kind}"
        for ours, hf in _BLOCK_NAMES.items()
        for kind in ("weight", "bias")
    },
    "encoder.norm_post.weight": "layernorm_post.weight",
    "encoder.norm_post.bias": "layernorm_post.bias",
    "encoder.adapter.w1.weight": "vision_adapter.mlp.fc1.weight",
    "encoder.adapter.w2.weight": "vision_adapter.mlp.fc2.weight",
    "projector.weight": HF_PROJECTOR,
}


def _compile(templates: Mapping[str, str]) -> list[tuple[re.Pattern[str], str]]:
    """Each source template as a full-match pattern (with {i} a layer index) and its target."""
    return [
        (re.compile(re.escape(source).replace(r"\{i\}", r"(?P<i>\d+)")), target)
        for source, target in templates.items()
    ]


_TO_HF = _compile({OUR_PREFIX + ours: hf for ours, hf in _NAMES.items()})
_FROM_HF = _compile({hf: OUR_PREFIX + ours for ours, hf in _NAMES.items()})


def _rename(name: str, table: list[tuple[re.Pattern[str], str]], side: str) -> str:
    for pattern, target in table:
        match = pattern.fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    hint = f"; HF names are relative to {HF_VISION_PREFIX!r}" if side == "HF" else ""
    raise ValueError(f"{name!r} is not a Llama 4 vision weight name ({side} naming){hint}")


def vision_state_from_hf(hf_tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF vision-model-relative names (+ `HF_PROJECTOR`) -> our `vision.*` names; same tensors."""
    return {_rename(name, _FROM_HF, "HF"): t for name, t in hf_tensors.items()}


def vision_state_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our `vision.*` names -> HF vision-model-relative names (+ `HF_PROJECTOR`); same tensors."""
    return {_rename(name, _TO_HF, "our"): t for name, t in state.items()}


def check_hf_expressible(cfg: VisionConfig) -> None:
    """HF's modules tie some widths together that our config keeps apart; refuse the others."""
    shuffled = cfg.dim * cfg.shuffle_factor**2
    if cfg.ffn_dim != shuffled:
        raise ConfigError(
            f"HF Llama 4 sizes the adapter input by intermediate_size: model.vision.ffn_dim "
            f"({cfg.ffn_dim}) must equal model.vision.dim / pixel_shuffle_ratio^2 ({shuffled})"
        )
    if cfg.adapter_dim != cfg.output_dim:
        raise ConfigError(
            f"HF Llama 4's adapter output layer is square: model.vision.adapter_dim "
            f"({cfg.adapter_dim}) must equal model.vision.output_dim ({cfg.output_dim})"
        )
    if cfg.norm_eps != HF_LAYER_NORM_EPS:
        raise ConfigError(
            f"HF Llama 4's vision LayerNorms always use eps {HF_LAYER_NORM_EPS}: "
            f"model.vision.norm_eps is {cfg.norm_eps}"
        )


def vision_config_to_hf(cfg: VisionConfig) -> dict[str, Any]:
    """The `vision_config` dict of an HF `Llama4Config` (as transformers 5.23 writes it)."""
    check_hf_expressible(cfg)
    return {
        "model_type": "llama4_vision_model",
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.ffn_dim,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.n_channels,
        "norm_eps": cfg.norm_eps,
        "pixel_shuffle_ratio": cfg.pixel_shuffle_ratio,
        "projector_input_dim": cfg.adapter_dim,
        "projector_output_dim": cfg.output_dim,
        "vision_output_dim": cfg.output_dim,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "hidden_act": "gelu",
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -1,
        "multi_modal_projector_bias": False,
        "projector_dropout": 0.0,
        "attention_dropout": 0.0,
    }


def vision_config_from_hf(
    hf_vision_cfg: Mapping[str, Any], image_token_id: int = VisionConfig.image_token_id
) -> VisionConfig:
    """An enabled VisionConfig from HF's `vision_config` dict.

    Accepts the released configs' top-level `rope_theta` as well as transformers 5.x's
    `rope_parameters`. `norm_eps` is set to what HF's LayerNorms actually use.
    """
    hf = hf_vision_cfg
    rope = hf.get("rope_parameters") or {"rope_theta": hf.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default" or hf.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(
            "HF vision_config must use rope_type 'default' and hidden_act 'gelu', got "
            f"{rope.get('rope_type')!r} and {hf.get('hidden_act')!r}"
        )
    if hf["vision_output_dim"] != hf["projector_output_dim"]:
        raise ConfigError(
            f"HF vision_config.vision_output_dim ({hf['vision_output_dim']}) must equal "
            f"projector_output_dim ({hf['projector_output_dim']}): the projector reads the adapter"
        )
    cfg = VisionConfig(
        enabled=True,
        dim=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        ffn_dim=hf["intermediate_size"],
        image_size=hf["image_size"],
        patch_size=hf["patch_size"],
        n_channels=hf.get("num_channels", 3),
        norm_eps=HF_LAYER_NORM_EPS,
        pixel_shuffle_ratio=float(hf["pixel_shuffle_ratio"]),
        adapter_dim=hf["projector_input_dim"],
        output_dim=hf["projector_output_dim"],
        rope_theta=float(rope["rope_theta"]),
        image_token_id=image_token_id,
    )
    check_hf_expressible(cfg)
    return cfg
