"""AdamW with decay / no-decay parameter groups, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (norm gains) and the embedding table do not.

    Every trainable parameter lands in exactly one group (asserted), so nothing is silently
    left out of the optimizer.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = name.endswith("tok_embeddings.weight")
        (no_decay if param.ndim < 2 or is_embedding else decay).append(param)
    n_grouped = len(decay) + len(no_decay)
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert n_grouped == n_trainable, f"{n_trainable} trainable parameters, {n_grouped} grouped"
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        parameter_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        foreach=True,
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warmup, then the schedule.

    A pure function of the step, so resuming needs no scheduler state.
    """
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return min_lr + (cfg.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_steps = max(1, round(cfg.decay_fraction * total_steps))
    decay_start = total_steps - decay_steps
    if step <= decay_start:
        return cfg.lr
    return cfg.lr - (cfg.lr - min_lr) * min(1.0, (step - decay_start) / decay_steps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
