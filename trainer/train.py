"""The training program: `python -m trainer.train --config configs/X.toml [--section.key=value]`.

Runs alone (a one-rank group) or under torchrun; parameters are sharded with FSDP2 over all
ranks, each rank reads its share of every global batch, and the run resumes from the newest
complete checkpoint in `training.run_dir`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.stateful import Stateful

from data.loader import BackgroundLoader, Batch, DataSpec, GlobalBatchLoader, RankSlice
from data.media import MediaConfig
from data.packing import IGNORE_INDEX
from data.tokenizer import build_tokenizer
from parallel import expert as expert_parallel
from parallel.context import ContextParallel
from parallel.fsdp import parallelize_model
from parallel.mesh import DistributedContext, ParallelDims, all_reduce_sum, init_distributed
from trainer.checkpoint import (
    CheckpointManager,
    ModelState,
    OptimizerState,
    load_model_weights,
)
from trainer.config import Config, ConfigError, load_config, split_cli, to_toml
from trainer.metrics import MetricsLogger, collect_expert_loads, expert_load_metrics, format_console
from trainer.model.config import count_parameters, flops_per_token
from trainer.model.transformer import Transformer
from trainer.optim import build_optimizer, lr_at, set_lr


class TrainState(Stateful):
    """Everything besides model and optimizer that an exact resume needs."""

    def __init__(self, loader: GlobalBatchLoader | BackgroundLoader):
        self.step = 0
        self.loader = loader

    def state_dict(self) -> dict[str, Any]:
        # The loader's state is nested and its shape varies (e.g. mid-document or not); DCP
        # needs the same keys at save and load, so it travels as one JSON string.
        loader = json.dumps(self.loader.state_dict(), sort_keys=True)
        return {"step": self.step, "loader": loader, "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.loader.load_state_dict(json.loads(state["loader"]))
        torch.set_rng_state(state["rng"])


@dataclass
class StepResult:
    loss: float
    router_loss: float
    grad_norm: float
    valid_tokens: int


@dataclass
class Trainer:
    cfg: Config
    ctx: DistributedContext
    model: Transformer
    optimizer: torch.optim.Optimizer
    loader: GlobalBatchLoader | BackgroundLoader
    state: TrainState
    checkpoints: CheckpointManager
    metrics: MetricsLogger
    micro_batches: int
    sequence_split: ContextParallel | None = None
    """With parallel.cp > 1: this rank's share of each row, for the labels."""

    def checkpoint_state(self) -> dict[str, Stateful]:
        return {
            "train": self.state,
            "model": ModelState(self.model),
            "optim": OptimizerState(self.model, self.optimizer),
        }


def resolve_device_type(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device = cuda, but CUDA is not available")
    return device


def build_trainer(cfg: Config, ctx: DistributedContext) -> Trainer:
    t = cfg.training
    p = cfg.parallel
    try:
        dims = ParallelDims(p.dp_replicate, p.dp_shard, p.ep, p.cp, ctx.world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    per_rank = t.global_batch_size // dims.dp_size
    micro = t.micro_batch_size or per_rank
    if t.global_batch_size % dims.dp_size or per_rank % micro:
        raise ConfigError(
            f"training.global_batch_size ({t.global_batch_size}) must split evenly over "
            f"{dims.dp_size} data-parallel ranks and into micro-batches of "
            f"training.micro_batch_size ({micro}) rows"
        )
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the {cfg.data.tokenizer!r} "
            f"tokenizer's vocabulary ({tokenizer.vocab_size})"
        )
    torch.manual_seed(t.seed)  # identical initial weights on every rank, for any world size
    model = Transformer(cfg.model).to(ctx.device)
    model.init_weights()
    dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    meshes = dims.build_mesh(ctx.device.type)
    sequence_split = parallelize_model(model, meshes, dtype, p.checkpoint_every)
    # The data rank, not the global rank: the cp ranks of one group read the same rows.
    loader = build_loader(cfg, RankSlice(meshes.dp.get_local_rank(), dims.dp_size))
    return Trainer(
        cfg=cfg,
        ctx=ctx,
        model=model,
        optimizer=build_optimizer(model, cfg.optim),
        loader=loader,
        state=TrainState(loader),
        checkpoints=CheckpointManager(t.run_dir, cfg.checkpoint.keep, ctx.rank),
        metrics=MetricsLogger(t.run_dir, ctx.rank == 0, cfg.metrics.tensorboard),
        micro_batches=per_rank // micro,
        sequence_split=sequence_split,
    )


def data_spec(cfg: Config) -> DataSpec:
    d, t, vision = cfg.data, cfg.training, cfg.model.vision
    if d.passkey_tokens > t.seq_len:
        raise ConfigError(
            f"data.passkey_tokens ({d.passkey_tokens}) must be at most training.seq_len "
            f"({t.seq_len}): a passkey document is never cut over rows"
        )
    return DataSpec(
        sources=tuple(d.sources),
        tokenizer=d.tokenizer,
        seq_len=t.seq_len,
        global_batch_size=t.global_batch_size,
        seed=t.seed,
        mixture=d.mixture,
        temperature=d.mixture_temperature,
        unimax_max_epochs=d.unimax_max_epochs,
        budget_tokens=t.steps * t.global_batch_size * t.seq_len,
        on_error=d.on_error,
        manifest=d.manifest,
        passkey_fraction=d.passkey_fraction,
        passkey_tokens=d.passkey_tokens,
        min_document_tokens=d.min_document_tokens,
        whole_long_documents=d.whole_long_documents,
        media=MediaConfig(
            tile_size=vision.image_size,
            patch_size=vision.patch_size,
            pixel_shuffle_ratio=vision.pixel_shuffle_ratio,
            max_tiles=d.max_tiles,
            video_fps=d.video_fps,
            max_frames=d.max_frames,
        ),
    )


def build_loader(cfg: Config, shard: RankSlice) -> GlobalBatchLoader | BackgroundLoader:
    spec = data_spec(cfg)
    if cfg.data.num_workers:
        return BackgroundLoader(spec, shard, cfg.data.num_workers, cfg.data.prefetch)
    return GlobalBatchLoader(spec, shard)


def to_device(batch: Batch, device: torch.device, with_vision: bool) -> dict[str, torch.Tensor]:
    names = ("tokens", "document_ids", "positions", "labels")
    tensors = {name: torch.from_numpy(getattr(batch, name)).to(device) for name in names}
    tensors["pixel_values"] = None
    if batch.pixel_values is not None:
        if not with_vision:
            raise ValueError(
                "the data has images or video but model.vision.enabled is false: enable the "
                "vision tower or leave media shards out of data.sources"
            )
        tensors["pixel_values"] = torch.from_numpy(batch.pixel_values).to(device)
    return tensors


def train_step(trainer: Trainer, rows: Batch) -> StepResult:
    """Forward/backward over the micro-batches of this rank's rows, then one optimizer step.

    The cross-entropy is summed and divided by the GLOBAL number of valid labels; FSDP averages
    gradients over the W data-parallel ranks, so each rank's loss is scaled by W. The update then
    equals one process on the whole global batch however the batch is split over ranks and
    micro-batches. With expert parallelism the expert gradients are rescaled inside the model's
    backward (parallel.fsdp._expert_grad_factor) and the norm is taken over both meshes.
    """
    model, device = trainer.model, trainer.ctx.device
    n_micro = trainer.micro_batches
    size = len(rows) // n_micro
    with_vision = trainer.cfg.model.vision.enabled
    micro = [
        to_device(rows.select(slice(i * size, (i + 1) * size)), device, with_vision)
        for i in range(n_micro)
    ]
    if trainer.sequence_split is not None:  # the model's logits are for this rank's share
        for batch in micro:
            batch["labels"] = trainer.sequence_split.shard(batch["labels"])
    valid = torch.tensor(float(sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in micro)))
    global_valid = all_reduce_sum(valid.to(device))  # note: a host sync before the first forward
    ce_total = torch.zeros((), device=device)
    router_total = torch.zeros((), device=device)
    dp_size = trainer.ctx.world_size
    router_weight = 1.0 / n_micro
    for batch in micro:
        out = model(
            batch["tokens"],
            batch["positions"],
            batch["document_ids"],
            pixel_values=batch["pixel_values"],
        )
        ce_sum = F.cross_entropy(
            out.logits_BSV.float().flatten(0, 1),
            batch["labels"].flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        loss = ce_sum * dp_size / global_valid + out.router_loss * router_weight
        loss.backward()
        ce_total += ce_sum.detach()
        router_total += out.router_loss.detach() * router_weight / dp_size
    max_norm = trainer.cfg.training.max_grad_norm or float("inf")
    if trainer.cfg.parallel.ep > 1:
        grad_norm = expert_parallel.clip_grad_norm_(model, max_norm)  # experts on their own mesh
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    totals = all_reduce_sum(torch.stack([ce_total, router_total]))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    return StepResult(
        loss=float(totals[0] / global_valid),  # note: host sync, once per step
        router_loss=float(totals[1]),
        grad_norm=float(grad_norm),
        valid_tokens=int(global_valid),
    )


def balance_experts(trainer: Trainer) -> dict[int, torch.Tensor]:
    """Sum each MoE layer's expert load over ranks, step the balancing bias, return the loads."""
    moe_layers = trainer.model.moe_layers()
    loads = collect_expert_loads(moe_layers)
    if loads:
        stacked = all_reduce_sum(torch.stack(list(loads.values())))
        loads = dict(zip(loads.keys(), stacked, strict=True))
    rate = trainer.cfg.model.router_bias_update_rate
    if rate:
        for layer, moe in moe_layers.items():
            moe.update_expert_bias(loads[layer], rate)
    return loads


def resume(trainer: Trainer) -> None:
    """Continue from the newest complete checkpoint, else start from `checkpoint.init_from`."""
    step = trainer.checkpoints.latest_step() if trainer.cfg.checkpoint.resume else None
    if step is not None:
        trainer.checkpoints.load(step, trainer.checkpoint_state())
        message = f"resumed from {trainer.checkpoints.step_dir(step)}"
    elif trainer.cfg.checkpoint.init_from:
        load_model_weights(trainer.cfg.checkpoint.init_from, trainer.model)
        message = f"initial weights from {trainer.cfg.checkpoint.init_from}"
    else:
        return
    if trainer.ctx.rank == 0:
        print(message, flush=True)


def should_save(trainer: Trainer, step: int, last_step: int) -> bool:
    interval = trainer.cfg.checkpoint.interval
    return interval > 0 and (step % interval == 0 or step == last_step)


def train_loop(trainer: Trainer) -> None:
    cfg = trainer.cfg
    t = cfg.training
    last_step = t.steps
    if t.stop_after_steps:
        last_step = min(t.steps, trainer.state.step + t.stop_after_steps)
    tokens_per_step = t.global_batch_size * t.seq_len
    flops_per_step = flops_per_token(cfg.model, t.seq_len) * tokens_per_step
    # Since the last log: training time (checkpoints excluded), steps and summed losses.
    window_time, window_steps, window_loss = 0.0, 0, 0.0
    for step in range(trainer.state.step + 1, last_step + 1):
        step_start = time.perf_counter()
        lr = lr_at(step, t.steps, cfg.optim)
        set_lr(trainer.optimizer, lr)
        result = train_step(trainer, trainer.loader.next_batch())
        loads = balance_experts(trainer)
        trainer.state.step = step
        window_time += time.perf_counter() - step_start
        window_steps += 1
        window_loss += result.loss
        if step % cfg.metrics.log_interval == 0 or step == last_step:
            elapsed = window_time
            scalars = {
                "loss": window_loss / window_steps,
                "lr": lr,
                "grad_norm": result.grad_norm,
                "router_loss": result.router_loss,
                "tokens_per_s": tokens_per_step * window_steps / elapsed,
                **expert_load_metrics(loads),
                **trainer.loader.metrics(),
            }
            if cfg.metrics.peak_flops_per_device:
                peak = cfg.metrics.peak_flops_per_device * trainer.ctx.world_size
                scalars["mfu"] = flops_per_step * window_steps / elapsed / peak
            trainer.metrics.log(step, scalars, format_console(step, t.steps, scalars))
            window_time, window_steps, window_loss = 0.0, 0, 0.0
        if should_save(trainer, step, last_step):
            trainer.checkpoints.save(step, trainer.checkpoint_state())


def announce(trainer: Trainer) -> None:
    """Print the resolved config and model size, and save the config in the run directory."""
    if trainer.ctx.rank != 0:
        return
    text = to_toml(trainer.cfg)
    run_dir = trainer.cfg.training.run_dir.rstrip("/")
    fs, path = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/config.toml", "w") as f:
        f.write(text)
    params = count_parameters(trainer.cfg.model)
    print(text + f"# parameters: {params}\n# world size: {trainer.ctx.world_size}", flush=True)
    trainer.metrics.log_text("config", text)


def train(cfg: Config) -> None:
    ctx = init_distributed(resolve_device_type(cfg.training.device))
    try:
        trainer = build_trainer(cfg, ctx)
        announce(trainer)
        resume(trainer)
        try:
            train_loop(trainer)
        finally:
            trainer.metrics.close()
            if isinstance(trainer.loader, BackgroundLoader):
                trainer.loader.close()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    path, overrides = split_cli(list(sys.argv[1:] if argv is None else argv))
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    train(cfg)


if __name__ == "__main__":
    main()
