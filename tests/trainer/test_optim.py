"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import pytest

from trainer.config import OptimConfig
from trainer.model.config import ModelConfig
from trainer.model.transformer import Transformer
from trainer.optim import build_optimizer, lr_at, parameter_groups


def test_every_parameter_in_exactly_one_group_and_vectors_do_not_decay():
    model = Transformer(ModelConfig(interleave_moe_layer_step=2))
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    ids = [id(p) for group in (decay, no_decay) for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert all(p.ndim >= 2 for p in decay["params"])
    assert model.tok_embeddings.weight in no_decay["params"]
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(build_optimizer(model, OptimConfig()).param_groups) == 2


def test_cosine_schedule():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(1, 110, cfg) == pytest.approx(0.1)
    assert lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.55)  # half-way through the decay
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)
    values = [lr_at(s, 110, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_schedule_is_flat_then_decays_linearly():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2)
    assert lr_at(5, 100, cfg) == pytest.approx(1.0)
    assert lr_at(80, 100, cfg) == pytest.approx(1.0)
    assert lr_at(90, 100, cfg) == pytest.approx(0.5)
    assert lr_at(100, 100, cfg) == pytest.approx(0.0)


def test_constant_schedule_after_warmup():
    cfg = OptimConfig(lr=2.0, warmup_steps=4, schedule="constant")
    assert [lr_at(s, 50, cfg) for s in (2, 4, 50)] == [1.0, 2.0, 2.0]
