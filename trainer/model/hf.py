"""HF Llama 4 checkpoints in and out: `from_hf(path)` and `to_hf(model, config, path)`.

Text-only checkpoints (`Llama4ForCausalLM`: `model.layers.N...`, `lm_head.weight`) and multimodal
ones (`Llama4ForConditionalGeneration`) are read; the multimodal names differ by a prefix, which
is detected from the keys. Safetensors shards are read one at a time, tensor by tensor, straight
into the model's parameters, so a checkpoint is never in memory twice.

HF stores each MoE layer's gate and up projections fused as `gate_up_proj` (E, D, 2F); we keep
them as `w1_EDF` / `w3_EDF` and split / concatenate on the way in / out, which is exact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.model.config import ConfigError, ModelConfig
from trainer.model.hf_vision import (
    HF_PROJECTOR,
    HF_VISION_PREFIX,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_state_from_hf,
    vision_state_to_hf,
)
from trainer.model.transformer import Transformer

# Prefixes of the text decoder's weights, per checkpoint layout: (body, output head). Released
# multimodal checkpoints and transformers' `save_pretrained` both use the second one.
TEXT_LAYOUTS = {
    "causal_lm": ("model.", "lm_head.weight"),
    "multimodal": ("language_model.model.", "language_model.lm_head.weight"),
}
MULTIMODAL_TEXT_PREFIX = "language_model."

# Our name <-> HF name inside the text body; {i} is the layer index.
_TEXT_NAMES = {
    "tok_embeddings.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "layers.{i}.attention_norm.weight": "layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.attention.wq.weight": "layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "layers.{i}.feed_forward.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "layers.{i}.feed_forward.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "layers.{i}.feed_forward.down_proj.weight",
    "layers.{i}.feed_forward.router.gate.weight": "layers.{i}.feed_forward.router.weight",
    "layers.{i}.feed_forward.experts.w2_EFD": "layers.{i}.feed_forward.experts.down_proj",
    "layers.{i}.feed_forward.shared_expert.w1.weight": (
        "layers.{i}.feed_forward.shared_expert.gate_proj.weight"
    ),
    "layers.{i}.feed_forward.shared_expert.w3.weight": (
        "layers.{i}.feed_forward.shared_expert.up_proj.weight"
    ),
    "layers.{i}.feed_forward.shared_expert.w2.weight": (
        "layers.{i}.feed_forward.shared_expert.down_proj.weight"
    ),
}
_FUSED_GATE_UP = "layers.{i}.feed_forward.experts.gate_up_proj"
_OURS_GATE, _OURS_UP = (
    "layers.{i}.feed_forward.experts.w1_EDF",
    "layers.{i}.feed_forward.experts.w3_EDF",
)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(\d+)") + "$")


_HF_TO_OURS = [(_pattern(hf), ours) for ours, hf in _TEXT_NAMES.items()]
_OURS_TO_HF = [(_pattern(ours), hf) for ours, hf in _TEXT_NAMES.items()]
_GATE_UP_PATTERN = _pattern(_FUSED_GATE_UP)

# A destination for (a slice of) an HF tensor: our parameter name and how to cut the tensor.
Placement = tuple[str, Callable[[torch.Tensor], torch.Tensor]]


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


def text_placements(hf_name: str) -> list[Placement]:
    """Where an HF text-body tensor (name relative to the body) goes among our parameters."""
    match = _GATE_UP_PATTERN.match(hf_name)
    if match:
        i = match.group(1)
        return [
            (_OURS_GATE.format(i=i), lambda t: t[..., : t.shape[-1] // 2]),
            (_OURS_UP.format(i=i), lambda t: t[..., t.shape[-1] // 2 :]),
        ]
    for pattern, ours in _HF_TO_OURS:
        match = pattern.match(hf_name)
        if match:
            return [(ours.format(i=match.group(1)) if match.groups() else ours, _whole)]
    raise KeyError(f"unrecognised HF Llama 4 text weight {hf_name!r}")


def text_state_from_hf(hf_body: Mapping[str, torch.Tensor], lm_head: torch.Tensor) -> dict:
    """Our text state dict from HF tensors (body names without prefix) and the output head."""
    state = {"output.weight": lm_head}
    for name, tensor in hf_body.items():
        for ours, cut in text_placements(name):
            state[ours] = cut(tensor)
    return state


def text_state_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF `Llama4ForCausalLM` tensors (`model.*`, `lm_head.weight`) from our text state dict."""
    body_prefix, head_name = TEXT_LAYOUTS["causal_lm"]
    hf = {head_name: state["output.weight"]}
    for name, tensor in state.items():
        if name == "output.weight" or name.endswith(("w3_EDF", "expert_bias")):
            continue
        if name.endswith("w1_EDF"):
            i = name.split(".")[1]
            fused = torch.cat([tensor, state[_OURS_UP.format(i=i)]], dim=-1)
            hf[body_prefix + _FUSED_GATE_UP.format(i=i)] = fused
            continue
        hf[body_prefix + _our_to_hf_name(name)] = tensor
    return hf


def _our_to_hf_name(name: str) -> str:
    for pattern, hf in _OURS_TO_HF:
        match = pattern.match(name)
        if match:
            return hf.format(i=match.group(1)) if match.groups() else hf
    raise KeyError(f"no HF Llama 4 name for our weight {name!r}")


# --------------------------------------------------------------------------- configs


def text_config_from_hf(hf: Mapping) -> ModelConfig:
    """Our ModelConfig from an HF Llama4TextConfig dict (transformers 4.51+ and 5.x spellings)."""
    _require(hf.get("hidden_act", "silu") == "silu", "hidden_act must be silu")
    _require(not hf.get("attention_bias", False), "attention_bias must be false")
    _require(not hf.get("tie_word_embeddings", False), "tied embeddings are not supported")
    rope = _rope_parameters(hf)
    n_layers = hf["num_hidden_layers"]
    cfg = ModelConfig(
        vocab_size=hf["vocab_size"],
        dim=hf["hidden_size"],
        n_layers=n_layers,
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        dense_ffn_dim=hf.get("intermediate_size_mlp", 16384),
        expert_ffn_dim=hf.get("intermediate_size", 8192),
        n_experts=hf.get("num_local_experts", 16),
        top_k=hf.get("num_experts_per_tok", 1),
        interleave_moe_layer_step=hf.get("interleave_moe_layer_step", 1),
        nope_layer_interval=hf.get("no_rope_layer_interval", 4),
        attention_chunk_size=hf.get("attention_chunk_size") or 0,
        rope_theta=float(rope.get("rope_theta", 500000.0)),
        rope_scaling="llama3" if rope.get("rope_type") == "llama3" else "none",
        rope_scaling_factor=float(rope.get("factor", 16.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 1.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        use_qk_norm=hf.get("use_qk_norm", True),
        attn_temperature_tuning=hf.get("attn_temperature_tuning", True),
        floor_scale=float(hf.get("floor_scale", 8192)),
        attn_scale=float(hf.get("attn_scale", 0.1)),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
    )
    _check_layer_lists(hf, cfg)
    return cfg


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ConfigError(f"unsupported HF Llama 4 config: {what}")


def _rope_parameters(hf: Mapping) -> dict:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope.setdefault("rope_theta", hf.get("rope_theta", 500000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    _require(rope_type in ("default", "llama3"), f"rope type {rope_type!r}")
    rope["rope_type"] = rope_type
    return rope


def _check_layer_lists(hf: Mapping, cfg: ModelConfig) -> None:
    """Explicit per-layer lists in the HF config must follow the interval patterns we build."""
    layers = range(cfg.n_layers)
    if hf.get("moe_layers") is not None:
        expected = [i for i in layers if cfg.is_moe_layer(i)]
        _require(list(hf["moe_layers"]) == expected, f"moe_layers {hf['moe_layers']}")
    if hf.get("no_rope_layers"):
        expected = [int(cfg.uses_rope(i)) for i in layers]
        _require(list(hf["no_rope_layers"]) == expected, f"no_rope_layers {hf['no_rope_layers']}")


def text_config_to_hf(cfg: ModelConfig) -> dict:
    """An HF Llama4TextConfig dict (read by transformers 4.51+ and 5.x)."""
    rope_scaling = None
    if cfg.rope_scaling == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position,
        }
    layers = range(cfg.n_layers)
    return {
        "model_type": "llama4_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.expert_ffn_dim,
        "intermediate_size_mlp": cfg.dense_ffn_dim,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "interleave_moe_layer_step": cfg.interleave_moe_layer_step,
        "moe_layers": [i for i in layers if cfg.is_moe_layer(i)],
        "no_rope_layer_interval": cfg.nope_layer_interval,
        "no_rope_layers": [int(cfg.uses_rope(i)) for i in layers],
        "attention_chunk_size": cfg.attention_chunk_size or None,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": {
            "rope_theta": cfg.rope_theta,
            **(rope_scaling or {"rope_type": "default"}),
        },
        "use_qk_norm": cfg.use_qk_norm,
        "attn_temperature_tuning": cfg.attn_temperature_tuning,
        "floor_scale": int(cfg.floor_scale) if cfg.floor_scale.is_integer() else cfg.floor_scale,
        "attn_scale": cfg.attn_scale,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
    }


# --------------------------------------------------------------------------- reading


def safetensors_files(path: Path) -> list[Path]:
    """The shards of a checkpoint directory: from `model.safetensors.index.json` if present."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path}")
    return files


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every shard, loaded one at a time."""
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                yield name, f.get_tensor(name)


def detect_text_layout(names: list[str]) -> tuple[str, str]:
    for body, head in TEXT_LAYOUTS.values():
        if head in names and any(n.startswith(body + "layers.") for n in names):
            return body, head
    raise ValueError("not an HF Llama 4 checkpoint: no known text-decoder key layout found")


def checkpoint_names(path: Path) -> list[str]:
    names = []
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            names.extend(f.keys())
    return names


def from_hf(path: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, Transformer]:
    """Load an HF Llama 4 checkpoint directory into our model (in the stored dtype by default)."""
    path = Path(path)
    cfg = config_from_hf(json.loads((path / "config.json").read_text()))
    body, head = detect_text_layout(checkpoint_names(path))
    model = Transformer(cfg).to(dtype or _stored_dtype(path, head))
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in iter_tensors(path):
            for ours, cut in _placements(name, body, head, cfg.vision.enabled):
                params[ours].copy_(cut(tensor))
                loaded.add(ours)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: weights missing from the checkpoint: {missing[:8]}")
    return cfg, model


def _stored_dtype(path: Path, name: str) -> torch.dtype:
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            if name in f.keys():  # noqa: SIM118
                return f.get_slice(name)[:1].dtype
    raise KeyError(name)


def config_from_hf(hf_config: Mapping) -> ModelConfig:
    """Text-only (`Llama4TextConfig`) or multimodal (`Llama4Config`) config.json contents."""
    if "text_config" not in hf_config:
        return text_config_from_hf(hf_config)
    cfg = text_config_from_hf(hf_config["text_config"])
    if hf_config.get("vision_config"):
        image_token = hf_config.get("image_token_index", cfg.vision.image_token_id)
        cfg.vision = vision_config_from_hf(hf_config["vision_config"], image_token)
    return cfg


def _placements(name: str, body: str, head: str, with_vision: bool) -> list[Placement]:
    if name == head:
        return [("output.weight", _whole)]
    if name.startswith(body):
        return text_placements(name[len(body) :])
    if with_vision and (name == HF_PROJECTOR or name.startswith(HF_VISION_PREFIX)):
        relative = name if name == HF_PROJECTOR else name[len(HF_VISION_PREFIX) :]
        (ours,) = vision_state_from_hf({relative: None})
        return [(ours, _whole)]
    return []  # a tower this model does not build


# --------------------------------------------------------------------------- writing


def to_hf(
    model: Transformer,
    cfg: ModelConfig,
    path: str | Path,
    max_shard_bytes: int = 5 * 2**30,
    drop_expert_bias: bool = False,
) -> None:
    """Write an HF directory (config.json, safetensors shards + index): `Llama4ForCausalLM`,
    or `Llama4ForConditionalGeneration` when the model has a vision tower.

    HF Llama 4 has no aux-loss-free expert bias: a model trained with a non-zero bias routes
    differently without it, so writing one needs `drop_expert_bias=True`.
    """
    state = {k: v.detach() for k, v in model.state_dict().items()}
    biased = [k for k, v in state.items() if k.endswith("expert_bias") and bool(v.any())]
    if biased and not drop_expert_bias:
        raise ValueError(
            f"{len(biased)} MoE layers have a non-zero expert_bias (aux-loss-free balancing) "
            "that HF Llama 4 cannot represent; pass drop_expert_bias=True to write anyway"
        )
    text = {k: v for k, v in state.items() if not k.startswith("vision.")}
    vision = {k: v for k, v in state.items() if k.startswith("vision.")}
    hf_state = text_state_to_hf(text)
    config = {**text_config_to_hf(cfg), "architectures": ["Llama4ForCausalLM"]}
    if cfg.vision.enabled:
        hf_state = {MULTIMODAL_TEXT_PREFIX + k: v for k, v in hf_state.items()}
        for name, tensor in vision_state_to_hf(vision).items():
            hf_state[name if name == HF_PROJECTOR else HF_VISION_PREFIX + name] = tensor
        config = multimodal_config_to_hf(cfg)
    dtype = str(next(iter(hf_state.values())).dtype).removeprefix("torch.")
    config["torch_dtype"] = config["dtype"] = dtype
    write_hf_directory(Path(path), config, hf_state, max_shard_bytes)


def multimodal_config_to_hf(cfg: ModelConfig) -> dict:
    """An HF `Llama4Config` dict; begin/end-of-image ids are Llama 4's (used by HF's processor)."""
    return {
        "architectures": ["Llama4ForConditionalGeneration"],
        "model_type": "llama4",
        "text_config": text_config_to_hf(cfg),
        "vision_config": vision_config_to_hf(cfg.vision),
        "image_token_index": cfg.vision.image_token_id,
        "boi_token_index": 200080,
        "eoi_token_index": 200081,
        "tie_word_embeddings": False,
    }


def write_hf_directory(
    path: Path, config: dict, tensors: Mapping[str, torch.Tensor], max_shard_bytes: int
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shards = _split_into_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(_contiguous(shards[0]), str(path / "model.safetensors"), {"format": "pt"})
        return
    weight_map = {}
    total = 0
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(_contiguous(shard), str(path / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _split_into_shards(
    tensors: Mapping[str, torch.Tensor], max_bytes: int
) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    return shards


def _contiguous(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.contiguous() for name, t in tensors.items()}
