"""Vision tower: parity with transformers' Llama4VisionModel, pixel shuffle, fusion, HF names."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from trainer.model.config import (
    ConfigError,
    ModelConfig,
    VisionConfig,
    count_parameters,
    vision_parameter_count,
)
from trainer.model.hf_vision import (
    HF_PROJECTOR,
    HF_VISION_PREFIX,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_state_from_hf,
    vision_state_to_hf,
)
from trainer.model.transformer import Transformer
from trainer.model.vision import VisionTower, fuse_image_features, pixel_shuffle

IMAGE_TOKEN = 60


def tiny_vision(**overrides) -> VisionConfig:
    """56px tiles of 14px patches: 16 patches -> 4 tokens per tile; HF-expressible widths."""
    base = dict(
        enabled=True, dim=32, n_layers=2, n_heads=4, ffn_dim=128, image_size=56, patch_size=14,
        adapter_dim=48, output_dim=48, image_token_id=IMAGE_TOKEN,
    )  # fmt: skip
    return VisionConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


def perturb(module: torch.nn.Module) -> None:
    """Random norms and biases too, so no weight can be mapped wrongly unseen."""
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.1)


def hf_vision_reference(hf, cfg: VisionConfig, text_dim: int):
    """HF Llama4VisionModel + Llama4MultiModalProjector, eager attention, random weights."""
    torch.manual_seed(0)
    full = hf.Llama4Config(
        vision_config=vision_config_to_hf(cfg), text_config={"hidden_size": text_dim}
    )
    full.vision_config._attn_implementation = "eager"
    vision = hf.Llama4VisionModel(full.vision_config).eval()
    projector = hf.models.llama4.modeling_llama4.Llama4MultiModalProjector(full).eval()
    perturb(vision)
    perturb(projector)
    return vision, projector


def hf_vision_tensors(vision, projector) -> dict[str, torch.Tensor]:
    """Names as `vision_state_from_hf` takes them: relative to the vision model + HF_PROJECTOR."""
    return {**vision.state_dict(), HF_PROJECTOR: projector.linear_1.weight}


def tower_from_hf(cfg: VisionConfig, text_dim: int, vision, projector) -> VisionTower:
    with torch.device("meta"):
        tower = VisionTower(cfg, text_dim)
    tower.to_empty(device="cpu")
    state = vision_state_from_hf(hf_vision_tensors(vision, projector))
    tower.load_state_dict({name.removeprefix("vision."): t for name, t in state.items()})
    return tower.eval()


@torch.no_grad()
def test_vision_tower_matches_transformers(hf):
    cfg = tiny_vision()
    vision, projector = hf_vision_reference(hf, cfg, text_dim=40)
    tower = tower_from_hf(cfg, 40, vision, projector)
    pixels = torch.randn(3, 3, 56, 56)

    adapter_out = tower.encoder(pixels)
    expected = vision(pixels).last_hidden_state
    assert adapter_out.shape == expected.shape == (3, cfg.tokens_per_tile, cfg.output_dim)
    # Measured max abs diff: 7.2e-7 (float32, CPU; 4e-7 to 8e-7 over other seeds).
    assert (adapter_out - expected).abs().max() <= 1e-5

    features = tower(pixels)
    expected_features = projector(expected.reshape(-1, cfg.output_dim))
    assert features.shape == (3 * cfg.tokens_per_tile, 40)
    assert (features - expected_features).abs().max() <= 1e-5  # measured 3.6e-7


def test_pixel_shuffle_matches_transformers(hf):
    from transformers.models.llama4.modeling_llama4 import pixel_shuffle as hf_pixel_shuffle

    x = torch.randn(2, 576, 6)
    ours = pixel_shuffle(x, 0.5)
    assert ours.shape == (2, 144, 24)
    assert torch.equal(ours, hf_pixel_shuffle(x, 0.5))


def test_pixel_shuffle_merges_row_major_blocks():
    x = torch.arange(16.0).reshape(1, 16, 1)  # a 4 x 4 grid of patches numbered row-major
    merged = pixel_shuffle(x, 0.5)[0]
    assert merged.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def image_tokens() -> torch.Tensor:
    tokens = torch.randint(0, IMAGE_TOKEN, (2, 7))
    tokens[0, [1, 2, 5]] = IMAGE_TOKEN
    tokens[1, [0, 6]] = IMAGE_TOKEN
    return tokens


def test_fusion_places_features_in_order():
    tokens = image_tokens()
    embeddings = torch.randn(2, 7, 4)
    features = torch.randn(5, 4)
    fused = fuse_image_features(embeddings, tokens, features, IMAGE_TOKEN)
    slots = [(0, 1), (0, 2), (0, 5), (1, 0), (1, 6)]
    for row, (b, s) in enumerate(slots):
        assert torch.equal(fused[b, s], features[row])
    text = tokens != IMAGE_TOKEN
    assert torch.equal(fused[text], embeddings[text])


def test_fusion_refuses_a_count_mismatch():
    with pytest.raises(ValueError, match="5 image tokens .* but 4 image feature rows"):
        fuse_image_features(torch.randn(2, 7, 4), image_tokens(), torch.randn(4, 4), IMAGE_TOKEN)


def test_fusion_gradients_reach_embeddings_and_features():
    tokens = image_tokens()
    embeddings = torch.randn(2, 7, 4, requires_grad=True)
    features = torch.randn(5, 4, requires_grad=True)
    weights = torch.randn(2, 7, 4)
    (fuse_image_features(embeddings, tokens, features, IMAGE_TOKEN) * weights).sum().backward()
    image = tokens == IMAGE_TOKEN
    assert torch.equal(features.grad, weights[image])
    assert torch.equal(embeddings.grad[~image], weights[~image])
    assert not embeddings.grad[image].any()


def test_transformer_fuses_images_and_trains_the_tower():
    cfg = ModelConfig(vocab_size=64, dim=48, n_layers=2, vision=tiny_vision())
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    tokens = torch.randint(0, IMAGE_TOKEN, (1, 12))
    tokens[0, 3 : 3 + 2 * cfg.vision.tokens_per_tile] = IMAGE_TOKEN
    out = model(tokens, pixel_values=torch.randn(2, 3, 56, 56))
    out.logits_BSV.sum().backward()
    assert model.vision.encoder.patch_embedding.weight.grad.abs().sum() > 0
    text_only = Transformer(dataclasses.replace(cfg, vision=VisionConfig()))
    with pytest.raises(ValueError, match="model.vision.enabled is false"):
        text_only(tokens, pixel_values=torch.randn(2, 3, 56, 56))


def test_parameter_count_matches_the_built_tower():
    for cfg, text_dim in ((tiny_vision(), 40), (VisionConfig(enabled=True), 5120)):
        with torch.device("meta"):
            tower = VisionTower(cfg, text_dim)
        built = sum(p.numel() for p in tower.parameters())
        assert vision_parameter_count(cfg, text_dim) == built
    model_cfg = ModelConfig(vocab_size=64, dim=48, n_layers=2, vision=tiny_vision())
    with torch.device("meta"):
        model = Transformer(model_cfg)
    assert count_parameters(model_cfg).total == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dim=30), "model.vision.dim"),
        (dict(image_size=50), "model.vision.image_size"),
        (dict(pixel_shuffle_ratio=0.3), "model.vision.pixel_shuffle_ratio"),
        (dict(image_size=42), "model.vision.pixel_shuffle_ratio"),  # 3 x 3 patches, k = 2
        (dict(n_layers=0), "model.vision.n_layers"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny_vision(**overrides)


def test_config_round_trips_through_transformers(hf):
    cfg = tiny_vision(rope_theta=5000.0)
    hf_dict = hf.Llama4VisionConfig(**vision_config_to_hf(cfg)).to_dict()
    assert hf_dict["rope_parameters"] == {"rope_theta": 5000.0, "rope_type": "default"}
    assert vision_config_from_hf(hf_dict, image_token_id=IMAGE_TOKEN) == cfg
    released = {**hf_dict, "rope_theta": 5000.0}  # released configs spell it at the top level
    del released["rope_parameters"]
    assert vision_config_from_hf(released, image_token_id=IMAGE_TOKEN) == cfg
    assert vision_config_from_hf(vision_config_to_hf(VisionConfig())) == dataclasses.replace(
        VisionConfig(), enabled=True
    )
    with pytest.raises(ConfigError, match="model.vision.ffn_dim"):
        vision_config_to_hf(tiny_vision(ffn_dim=64))
    with pytest.raises(ConfigError, match="model.vision.adapter_dim"):
        vision_config_to_hf(tiny_vision(adapter_dim=64))


def test_state_round_trips_bit_identically(hf):
    cfg = tiny_vision()
    vision, projector = hf_vision_reference(hf, cfg, text_dim=40)
    hf_tensors = hf_vision_tensors(vision, projector)
    ours = vision_state_from_hf(hf_tensors)
    tower = VisionTower(cfg, 40)
    assert set(ours) == {f"vision.{name}" for name in tower.state_dict()}
    back = vision_state_to_hf(ours)
    assert back.keys() == hf_tensors.keys()
    assert all(torch.equal(back[name], t) for name, t in hf_tensors.items())
    with pytest.raises(ValueError, match="not a Llama 4 vision weight"):
        vision_state_from_hf({"vision_model.class_embedding": torch.zeros(1)})


def hf_multimodal_reference(hf, ours: Transformer):
    """HF Llama4ForConditionalGeneration holding our weights, under checkpoint names."""
    from trainer.model.hf import text_config_to_hf, text_state_to_hf

    cfg = ours.cfg
    vocab = cfg.vocab_size
    hf_cfg = hf.Llama4Config(
        text_config=text_config_to_hf(cfg),
        vision_config=vision_config_to_hf(cfg.vision),
        image_token_index=cfg.vision.image_token_id,
        boi_token_index=vocab - 3,
        eoi_token_index=vocab - 2,
    )
    hf_cfg._attn_implementation = "eager"
    hf_cfg.text_config._attn_implementation = "eager"
    hf_cfg.vision_config._attn_implementation = "eager"
    reference = hf.Llama4ForConditionalGeneration(hf_cfg).eval()
    state = ours.state_dict()
    text = text_state_to_hf({k: v for k, v in state.items() if not k.startswith("vision.")})
    vision = vision_state_to_hf({k: v for k, v in state.items() if k.startswith("vision.")})
    checkpoint = {
        **{f"language_model.{name}": t for name, t in text.items()},
        **{(name if name == HF_PROJECTOR else HF_VISION_PREFIX + name): t
           for name, t in vision.items()},
    }  # fmt: skip
    reference.load_state_dict(checkpoint, strict=True)
    return reference


@pytest.mark.skipif(
    importlib.util.find_spec("trainer.model.hf") is None,
    reason="trainer/model/hf.py (text HF mapping) is not written yet",
)
@torch.no_grad()
def test_multimodal_logits_match_transformers(hf):
    cfg = ModelConfig(
        vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, dense_ffn_dim=96,
        expert_ffn_dim=32, n_experts=4, interleave_moe_layer_step=2, nope_layer_interval=2,
        use_qk_norm=True, vision=tiny_vision(),
    )  # fmt: skip
    torch.manual_seed(0)
    ours = Transformer(cfg)
    ours.init_weights()
    ours.eval()
    reference = hf_multimodal_reference(hf, ours)
    # One tile in the stream: <|image_start|> <|image|> <|patch|> x tokens_per_tile <|image_end|>.
    image = [cfg.vocab_size - 3, cfg.vocab_size - 1, *[IMAGE_TOKEN] * cfg.vision.tokens_per_tile]
    prompt = torch.randint(0, IMAGE_TOKEN, (8,)).tolist()
    tokens = torch.tensor([prompt[:3] + image + [cfg.vocab_size - 2] + prompt[3:]])
    pixels = torch.randn(1, 3, 56, 56)

    logits = ours(tokens, pixel_values=pixels).logits_BSV
    expected = reference(input_ids=tokens, pixel_values=pixels).logits
    # Measured max abs diff: 8.3e-7 (float32, CPU) on logits of magnitude up to ~3.
    assert (logits - expected).abs().max() <= 1e-4
