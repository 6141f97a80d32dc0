"""The training CLI, plus each step's full gradients saved by rank 0 (layout equivalence tests).

    torchrun ... -m tests.record_gradients --config X [--section.key=value ...]

Runs `trainer.train` exactly, with one addition: just before each optimizer step, every gradient
is rebuilt whole (a DTensor's shards gathered; an expert-parallel weight's slices gathered over
its ep group, in expert order) and rank 0 writes them to `run_dir/gradients/step-N.pt` as
{parameter name: float64 tensor}. Gradients are read after clipping: run with
`--training.max_grad_norm=0` to compare raw gradients.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.expert import sharded_expert_names
from trainer import train as training
from trainer.config import load_config, split_cli


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, whole; a collective (every rank must call it)."""
    experts = sharded_expert_names(model)
    grads = {}
    for name, param in model.named_parameters():
        grad = torch.zeros_like(param) if param.grad is None else param.grad
        grad = grad.full_tensor() if isinstance(grad, DTensor) else grad
        if name in experts:
            group = experts[name].group
            pieces = [torch.empty_like(grad) for _ in range(group.size())]
            dist.all_gather(pieces, grad.contiguous(), group=group)
            grad = torch.cat(pieces)
        grads[name] = grad.detach().double().cpu()
    return grads


def record_gradients(trainer: training.Trainer) -> None:
    directory = f"{trainer.cfg.training.run_dir}/gradients"

    def save(optimizer, args, kwargs) -> None:
        grads = full_gradients(trainer.model)
        if trainer.ctx.rank == 0:
            torch.save(grads, f"{directory}/step-{trainer.state.step + 1}.pt")

    if trainer.ctx.rank == 0:
        os.makedirs(directory, exist_ok=True)
    trainer.optimizer.register_step_pre_hook(save)


def main() -> None:
    path, overrides = split_cli(sys.argv[1:])
    cfg = load_config(path, overrides)
    build = training.build_trainer

    def build_recording(*args):
        trainer = build(*args)
        record_gradients(trainer)
        return trainer

    # train() looks build_trainer up at call time: the run is the CLI's, plus the hook.
    training.build_trainer = build_recording
    training.train(cfg)


if __name__ == "__main__":
    main()
