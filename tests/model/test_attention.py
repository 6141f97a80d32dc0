"""Attention masks: causality, document isolation, chunked local attention, NoPE reach."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.model.attention import (
    Attention,
    build_attention_inputs,
    build_segment_layout,
    segment_causal_attention,
)
from trainer.model.config import ModelConfig
from trainer.model.rope import rope_inverse_frequencies
from trainer.model.transformer import Transformer


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=64,
        dim=32,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        dense_ffn_dim=64,
        expert_ffn_dim=32,
        n_experts=4,
        interleave_moe_layer_step=2,
        attention_chunk_size=8,
        floor_scale=4.0,
        use_qk_norm=True,
    )
    return ModelConfig(**{**base, **overrides})


def build_model(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    return model.double()


def packed_rows(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """document ids and positions (1, sum(lengths)) of documents of the given lengths."""
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    pos = torch.cat([torch.arange(n) for n in lengths])
    return doc[None], pos[None]


def reference_attention(q, k, v, doc, pos, chunk):
    """Dense float64 masked attention: the definition the segment kernel must match."""
    n_rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(q.shape[-1])
    t = torch.arange(len(doc))
    allowed = (t[:, None] >= t[None]) & (doc[:, None] == doc[None])
    if chunk:
        allowed &= (pos[:, None] // chunk) == (pos[None] // chunk)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("chunk", [None, 4, 7])
@pytest.mark.parametrize("lengths", [[40], [1, 5, 17, 2, 9, 6], [3, 3, 3, 31]])
def test_segment_attention_matches_dense_masked_reference(chunk, lengths):
    torch.manual_seed(1)
    doc, pos = packed_rows(lengths)
    t = doc.shape[1]
    q = torch.randn(t, 4, 8, dtype=torch.float64)
    k, v = torch.randn(t, 2, 8, dtype=torch.float64), torch.randn(t, 2, 8, dtype=torch.float64)
    layout = build_segment_layout(doc, pos, chunk)
    out = segment_causal_attention(q, k, v, layout)
    torch.testing.assert_close(out, reference_attention(q, k, v, doc[0], pos[0], chunk))


def test_segments_never_cross_rows():
    doc = torch.zeros(2, 6, dtype=torch.long)  # same document id in both rows
    pos = torch.arange(6).expand(2, 6)
    layout = build_segment_layout(doc, pos, None)
    assert sorted(b.n_segments for b in layout.buckets) == [2]


def test_layout_memory_is_linear_in_sequence_length():
    doc, pos = packed_rows([1] * 1000 + [7000] + [3] * 3000 + [64536 - 8000 - 1000])
    layout = build_segment_layout(doc, pos, 8192)
    padded = sum(b.n_segments * b.length for b in layout.buckets)
    assert padded <= 2 * doc.numel()
    assert layout.scatter_index.numel() == doc.numel()


def logits(model, tokens, doc=None, pos=None):
    return model(tokens, pos, doc).logits_BSV


def test_causality_change_at_t_changes_no_earlier_logit():
    model = build_model(tiny_config())
    tokens = torch.randint(0, 64, (1, 32))
    base = logits(model, tokens)
    for t in (0, 9, 20, 31):
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 1) % 64
        out = logits(model, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=0)
        assert not torch.equal(out[:, t:], base[:, t:])


def test_document_isolation_in_a_packed_row():
    model = build_model(tiny_config())
    doc, pos = packed_rows([11, 13, 8])
    tokens = torch.randint(0, 64, (1, 32))
    base = logits(model, tokens, doc, pos)
    changed = tokens.clone()
    changed[0, 11:24] = (changed[0, 11:24] + 3) % 64  # all of document 1
    out = logits(model, changed, doc, pos)
    torch.testing.assert_close(out[:, :11], base[:, :11], rtol=0, atol=0)
    torch.testing.assert_close(out[:, 24:], base[:, 24:], rtol=0, atol=0)
    # The later document sees exactly what it would see alone.
    alone = logits(model, tokens[:, 24:])
    torch.testing.assert_close(base[:, 24:], alone, rtol=1e-10, atol=1e-10)


def single_layer_output(use_rope: bool, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    torch.manual_seed(0)
    layer = Attention(cfg, use_rope=use_rope).double()
    layer.init_weights(0.2, 0.2)
    doc, pos = packed_rows([x.shape[1]])
    inputs = build_attention_inputs(cfg, rope_inverse_frequencies(cfg), pos, doc)
    return layer(x, inputs)


@pytest.mark.parametrize("use_rope", [True, False])
def test_chunked_attention_on_rope_layers_global_on_nope_layers(use_rope):
    cfg = tiny_config(attention_chunk_size=8)
    x = torch.randn(1, 24, cfg.dim, dtype=torch.float64)
    base = single_layer_output(use_rope, x, cfg)
    changed = x.clone()
    changed[0, 3] += 1.0  # a token of chunk 0
    out = single_layer_output(use_rope, changed, cfg)
    later_chunks_changed = not torch.equal(out[0, 8:], base[0, 8:])
    assert later_chunks_changed is (not use_rope)
    assert not torch.equal(out[0, 3:8], base[0, 3:8])  # its own chunk always sees it


def test_temperature_tuning_scales_nope_queries():
    cfg = tiny_config(floor_scale=4.0, attn_scale=0.1)
    doc, pos = packed_rows([20])
    inputs = build_attention_inputs(cfg, rope_inverse_frequencies(cfg), pos, doc)
    expected = [math.log(math.floor((p + 1) / 4.0) + 1) * 0.1 + 1 for p in range(20)]
    torch.testing.assert_close(inputs.temperature_BS[0].double(), torch.tensor(expected).double())
    off = build_attention_inputs(
        tiny_config(attn_temperature_tuning=False), rope_inverse_frequencies(cfg), pos, doc
    )
    assert off.temperature_BS is None


def test_nope_layers_follow_the_irope_pattern():
    cfg = tiny_config(n_layers=12)
    model = Transformer(cfg)
    nope = [i for i, block in model.layers.items() if not block.attention.use_rope]
    assert nope == ["3", "7", "11"]
    qk_norm = [block.attention.use_qk_norm for block in model.layers.values()]
    assert qk_norm == [cfg.uses_rope(i) for i in range(12)]
