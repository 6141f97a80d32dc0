"""AdamW with its parameter groups, and the learning-rate schedules.

Standard parametrisation: two groups, decay and no-decay, one lr. MetaP
(trainer/parametrization.py): one group per kind of parameter, each with an lr multiplier
(`group["lr_mult"]`) that `set_lr` applies and a weight decay of its own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.parametrization import STANDARD, Parametrization, metap_groups


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


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, parametrization: Parametrization | None = None
) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`, or over MetaP's groups when `parametrization` is MetaP."""
    if parametrization is None or parametrization.kind == STANDARD:
        groups = parameter_groups(model, cfg.weight_decay)
    else:
        groups = metap_groups(model, parametrization, cfg.weight_decay)
        for group in groups:
            group["lr"] = cfg.lr * group["lr_mult"]
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        foreach=True,
    )
    if parametrization is not None and parametrization.kind != STANDARD:
        keep_group_settings(optimizer, ("lr_mult", "weight_decay"))
    return optimizer


def keep_group_settings(optimizer: torch.optim.Optimizer, keys: tuple[str, ...]) -> None:
    """After a checkpoint load, groups keep these values of this run, not the checkpoint's.

    `Optimizer.load_state_dict` restores every group setting that was saved; MetaP's are derived
    from the config (a later stage may, e.g., change the batch size and with it the multipliers).
    """
    settings = [{key: group[key] for key in keys} for group in optimizer.param_groups]

    def restore(optimizer: torch.optim.Optimizer) -> None:
        for group, kept in zip(optimizer.param_groups, settings, strict=True):
            group.update(kept)

    optimizer.register_load_state_dict_post_hook(restore)


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
    """The schedule's lr times each group's MetaP multiplier (standard groups have none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"] if "lr_mult" in group else lr
