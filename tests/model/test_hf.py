"""HF interop: our model is the same function as transformers' Llama4ForCausalLM, and
checkpoints convert both ways bit-exactly."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors_dirs import read_safetensors  # noqa: E402

from trainer.model.hf import from_hf, text_config_from_hf, text_config_to_hf, to_hf  # noqa: E402

SEQ = 24  # > attention_chunk_size (8) and > floor_scale (4): chunking and temperature active

COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=32,
    intermediate_size_mlp=80,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_local_experts=4,
    attention_chunk_size=8,
    floor_scale=4,
    attn_scale=0.1,
)
SCOUT_LIKE = dict(
    COMMON,
    interleave_moe_layer_step=1,
    use_qk_norm=True,
    rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
    },
)  # fmt: skip
MAVERICK_LIKE = dict(COMMON, interleave_moe_layer_step=2, use_qk_norm=False, num_experts_per_tok=1)


def hf_model(config_kwargs: dict):
    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(**config_kwargs)
    model = transformers.Llama4ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms and experts too, so no weight can be mapped wrongly unseen
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.config._attn_implementation = "eager"
    return model


@pytest.fixture(params=[SCOUT_LIKE, MAVERICK_LIKE], ids=["scout_like", "maverick_like"])
def converted(request, tmp_path):
    reference = hf_model(request.param)
    reference.save_pretrained(tmp_path / "hf")
    cfg, ours = from_hf(tmp_path / "hf")
    return reference, ours.eval(), cfg, tmp_path


def test_logits_match_transformers(converted):
    reference, ours, cfg, _ = converted
    tokens = torch.randint(0, 96, (2, SEQ))
    expected = reference(tokens).logits
    actual = ours(tokens).logits_BSV
    assert (actual - expected).abs().max().item() <= 1e-4  # measured: 6.3e-7 / 7.2e-7


def test_input_embedding_gradients_match_transformers(converted):
    reference, ours, _, _ = converted
    embeddings = torch.randn(2, SEQ, 64)
    targets = torch.randint(0, 96, (2, SEQ))

    def grad_of_loss(run) -> torch.Tensor:
        e = embeddings.clone().requires_grad_(True)
        logits = run(e)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
        return e.grad

    expected = grad_of_loss(lambda e: reference(inputs_embeds=e).logits)
    actual = grad_of_loss(lambda e: ours(targets, embeddings_BSD=e).logits_BSV)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_round_trip_is_bit_identical(converted):
    _, ours, cfg, tmp_path = converted
    to_hf(ours, cfg, tmp_path / "back")
    original, back = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "back")
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert tensor.dtype == back[name].dtype and torch.equal(tensor, back[name]), name
    reloaded = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "back")
    assert text_config_from_hf(reloaded.config.to_dict()) == cfg


def test_sharded_checkpoint_reads_shard_by_shard(converted):
    _, ours, cfg, tmp_path = converted
    to_hf(ours, cfg, tmp_path / "sharded", max_shard_bytes=64 * 1024)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    _, again = from_hf(tmp_path / "sharded")
    for (name, a), (_, b) in zip(
        ours.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_bf16_checkpoint_loads_in_bf16_and_round_trips(tmp_path):
    reference = hf_model(MAVERICK_LIKE).to(torch.bfloat16)
    reference.save_pretrained(tmp_path / "hf")
    cfg, ours = from_hf(tmp_path / "hf")
    assert ours.output.weight.dtype == torch.bfloat16
    to_hf(ours, cfg, tmp_path / "back")
    original, back = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "back")
    assert all(torch.equal(t, back[n]) for n, t in original.items())


def test_config_round_trip_and_unsupported_configs():
    cfg = text_config_from_hf(transformers.Llama4TextConfig(**SCOUT_LIKE).to_dict())
    assert cfg.rope_scaling == "llama3" and cfg.use_qk_norm and cfg.attention_chunk_size == 8
    assert text_config_from_hf(text_config_to_hf(cfg)) == cfg
    bad = dict(text_config_to_hf(cfg), moe_layers=[0, 2])
    with pytest.raises(ValueError, match=r"moe_layers \[0, 2\]"):
        text_config_from_hf(bad)


def test_nonzero_expert_bias_refuses_silent_export(converted):
    _, ours, cfg, tmp_path = converted
    next(iter(ours.moe_layers().values())).router.expert_bias[0] = 0.5
    with pytest.raises(ValueError, match="drop_expert_bias"):
        to_hf(ours, cfg, tmp_path / "biased")
    to_hf(ours, cfg, tmp_path / "biased", drop_expert_bias=True)


def test_multimodal_checkpoint_loads_matches_and_round_trips(tmp_path):
    """A transformers Llama4ForConditionalGeneration (released layout) -> ours -> HF."""
    image_token, tile = 90, 56
    config = transformers.Llama4Config(
        text_config=dict(MAVERICK_LIKE, num_hidden_layers=2, no_rope_layer_interval=2),
        vision_config=dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            image_size=tile, patch_size=14, projector_input_dim=48, projector_output_dim=48,
            vision_output_dim=48, pixel_shuffle_ratio=0.5,
        ),
        image_token_index=image_token, boi_token_index=88, eoi_token_index=89,
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.Llama4ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    reference.save_pretrained(tmp_path / "hf")
    cfg, ours = from_hf(tmp_path / "hf")
    assert cfg.vision.enabled and cfg.vision.image_token_id == image_token

    patches = cfg.vision.tokens_per_tile
    tokens = torch.tensor([[5, 6, 88, 89, *[image_token] * patches, 89, 7, 8]])
    pixels = torch.randn(1, 3, tile, tile)
    expected = reference(input_ids=tokens, pixel_values=pixels).logits
    actual = ours.eval()(tokens, pixel_values=pixels).logits_BSV
    assert (actual - expected).abs().max().item() <= 1e-4

    to_hf(ours, cfg, tmp_path / "back")
    original, back = read_safetensors(tmp_path / "hf"), read_safetensors(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(torch.equal(t, back[n]) for n, t in original.items())
    transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path / "back")
