"""The training program: `python -m trainer.train --config configs/X.toml [--section.key=value]`.

Runs alone (a one-rank group) or under torchrun; parameters are sharded with FSDP2 over all
ranks, each rank reads its share of every global batch, and the run resumes from the newest
complete checkpoint in `training.run_dir`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.stateful import Stateful

from data.loader import BackgroundLoader, Batch, DataSpec, GlobalBatchLoader, RankSlice
from data.media import MediaConfig
from data.packing import IGNORE_INDEX
from data.passkey import FillerPool
from data.tokenizer import build_tokenizer
from parallel import expert as expert_parallel
from parallel.fsdp import parallelize_model
from parallel.mesh import DistributedContext, ParallelDims, all_reduce_sum, init_distributed
from trainer.checkpoint import (
    CheckpointManager,
    ModelState,
    OptimizerState,
    load_model_weights,
)
from trainer.config import Config, ConfigError, load_config, split_cli, to_toml
from trainer.eval import evaluate_long_context, format_table, longctx_scalars
from trainer.health import APPLY, ROLLBACK, TrainingHealth
from trainer.metrics import (
    MetricsLogger,
    collect_expert_loads,
    expert_load_metrics,
    format_console,
    rank_spread,
)
from trainer.model.config import count_parameters, flops_per_token
from trainer.model.transformer import Transformer
from trainer.optim import build_optimizer, lr_at, set_lr
from trainer.parametrization import (
    Parametrization,
    build_parametrization,
    refuse_other_parametrization,
)
from trainer.parametrization import describe as describe_parametrization
from trainer.parametrization import init_weights as init_metap_weights
from trainer.precision.apply import (
    Fp8Summary,
    apply_fp8,
    fp8_metrics,
    fp8_scalars,
    update_fp8_scales,
)
from trainer.preemption import Preemption
from trainer.stages import Stage, stage_configs


class TrainState(Stateful):
    """Everything besides model and optimizer that an exact resume needs."""

    def __init__(self, loader: GlobalBatchLoader | BackgroundLoader, stage: int = 0):
        self.step = 0
        self.loader = loader
        self.stage = stage
        """Index of the stage being trained: its loader is the one whose position is saved."""
        self.batches = 0
        """Batches this stage has drawn from its loader, skipped ones included."""
        self.skip_batches: list[int] = []
        """Batch numbers (1-based, this stage) a rollback marked as offending: never trained."""
        self._fresh_loader = json.dumps(loader.state_dict(), sort_keys=True)

    def state_dict(self) -> dict[str, Any]:
        # The loader's state is nested and its shape varies (e.g. mid-document or not); DCP
        # needs the same keys at save and load, so it travels as one JSON string.
        loader = json.dumps(self.loader.state_dict(), sort_keys=True)
        return {
            "step": self.step,
            "loader": loader,
            "rng": torch.get_rng_state(),
            "stage": self.stage,
            "batches": self.batches,
            "skip_batches": json.dumps(self.skip_batches),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"])
        if int(state["stage"]) == self.stage:
            self.loader.load_state_dict(json.loads(state["loader"]))
            self.batches = int(state["batches"])
            self.skip_batches = json.loads(state["skip_batches"])
        else:  # the end of the previous stage: this stage's data starts from the beginning
            self.loader.load_state_dict(json.loads(self._fresh_loader))
            self.batches, self.skip_batches = 0, []

    def next_rows(self) -> Batch:
        """The next batch to train on, passing over the batches a rollback marked."""
        while self.batches + 1 in self.skip_batches:
            self.loader.next_batch()
            self.batches += 1
        self.batches += 1
        return self.loader.next_batch()


@dataclass
class StepResult:
    loss: float
    router_loss: float
    grad_norm: float
    valid_tokens: int
    verdict: str
    """trainer.health: "apply" (the update was made), "skip" or "rollback" (it was not)."""
    seconds: dict[str, float]
    """Host time of the step's phases: forward, backward, optimizer."""


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
    stage: Stage | None = None
    """The stage being trained (trainer/stages.py); `cfg` is its resolved config."""
    health: TrainingHealth | None = None
    fp8: Fp8Summary | None = None
    """Which layers run in FP8 (precision.fp8; backend "off": none)."""
    parametrization: Parametrization | None = None
    """Per-parameter init and lr rules (optim.parametrization), as the optimizer uses them."""

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


def build_trainer(cfg: Config, ctx: DistributedContext, stage: Stage | None = None) -> Trainer:
    """Everything one stage trains with; `cfg` is the stage's resolved config (or the run's)."""
    stage = stage or stage_configs(cfg)[0]
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
    parametrization = build_parametrization(model, cfg.model, cfg.optim, t.global_batch_size)
    init_metap_weights(model, parametrization)  # standard: nothing (not even an RNG draw)
    checkpoints = CheckpointManager(
        t.run_dir, cfg.checkpoint.keep, ctx.rank, cfg.checkpoint.async_save
    )
    resume_step = checkpoints.latest_step() if cfg.checkpoint.resume else None
    if resume_step is not None:  # before anything is read: other groups would not load
        refuse_other_parametrization(checkpoints.step_dir(resume_step), parametrization)
    # FP8 swaps modules in place (names kept) before EP and FSDP wrap them. Every rank sees other
    # tokens or experts, so the delayed-scaling amaxes are reduced over all of them.
    fp8 = apply_fp8(
        model, cfg.precision.fp8, dist.group.WORLD if ctx.world_size > 1 else None, p.ep
    )
    dtype = torch.bfloat16 if t.dtype == "bfloat16" else torch.float32
    meshes = dims.build_mesh(ctx.device.type)
    parallelize_model(model, meshes, dtype, p.checkpoint_every)
    # The data rank, not the global rank: the cp ranks of one group read the same rows.
    loader = build_loader(cfg, RankSlice(meshes.dp.get_local_rank(), dims.dp_size))
    return Trainer(
        cfg=cfg,
        ctx=ctx,
        model=model,
        optimizer=build_optimizer(model, cfg.optim, parametrization),
        loader=loader,
        state=TrainState(loader, stage.index),
        checkpoints=checkpoints,
        metrics=MetricsLogger(t.run_dir, ctx.rank == 0, cfg.metrics.tensorboard),
        micro_batches=per_rank // micro,
        parametrization=parametrization,
        stage=stage,
        fp8=fp8,
        health=TrainingHealth(t.max_nonfinite_steps, t.loss_spike_factor, t.loss_spike_window),
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
    split = model.sequence_split  # context parallelism: the logits are for this rank's share
    if split is not None:
        for batch in micro:
            batch["labels"] = split.shard(batch["labels"])
    valid = torch.tensor(float(sum(int((m["labels"] != IGNORE_INDEX).sum()) for m in micro)))
    global_valid = all_reduce_sum(valid.to(device))  # note: a host sync before the first forward
    ce_total = torch.zeros((), device=device)
    router_total = torch.zeros((), device=device)
    dp_size = trainer.ctx.world_size
    router_weight = 1.0 / n_micro
    seconds = {"forward": 0.0, "backward": 0.0}
    for batch in micro:
        start = _now(device)
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
        middle = _now(device)
        loss.backward()
        seconds["forward"] += middle - start
        seconds["backward"] += _now(device) - middle
        ce_total += ce_sum.detach()
        router_total += out.router_loss.detach() * router_weight / dp_size
    start = _now(device)
    update_fp8_scales(model)  # delayed scaling: this step's amaxes, reduced over all ranks
    max_norm = trainer.cfg.training.max_grad_norm or float("inf")
    if trainer.cfg.parallel.ep > 1:
        grad_norm = expert_parallel.clip_grad_norm_(model, max_norm)  # experts on their own mesh
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    totals = all_reduce_sum(torch.stack([ce_total, router_total]))
    step_loss = float(totals[0] / global_valid)  # note: host sync, once per step
    verdict = trainer.health.verdict(step_loss, float(grad_norm), trainer.state.batches)
    if verdict == APPLY:
        trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    seconds["optimizer"] = _now(device) - start
    return StepResult(
        loss=step_loss,
        router_loss=float(totals[1]),
        grad_norm=float(grad_norm),
        valid_tokens=int(global_valid),
        verdict=verdict,
        seconds=seconds,
    )


def _now(device: torch.device) -> float:
    """Host time after the device's queued work: phases are then timed, not just launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def balance_experts(trainer: Trainer, update: bool = True) -> dict[int, torch.Tensor]:
    """Sum each MoE layer's expert load over ranks, step the balancing bias, return the loads.

    A step whose update was not applied (trainer.health) leaves the bias alone too.
    """
    moe_layers = trainer.model.moe_layers()
    loads = collect_expert_loads(moe_layers)
    if loads:
        stacked = all_reduce_sum(torch.stack(list(loads.values())))
        loads = dict(zip(loads.keys(), stacked, strict=True))
    rate = trainer.cfg.model.router_bias_update_rate
    if rate and update:
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
    """At the interval and the invocation's last step; always where a stage hands over."""
    stage = trainer.stage
    if step == stage.last_step and not stage.final:
        return True  # the next stage starts from this checkpoint (its model is rebuilt)
    interval = trainer.cfg.checkpoint.interval
    return interval > 0 and (step % interval == 0 or step == last_step)


def train_loop(trainer: Trainer, stop_at: int, preemption: Preemption) -> bool:
    """Train the stage's steps after the current one, up to its last step or `stop_at`.

    Returns True when a preemption signal ended it early (after a checkpoint).
    """
    cfg, stage, state = trainer.cfg, trainer.stage, trainer.state
    t = cfg.training
    last_step = min(stage.last_step, stop_at)
    window = LogWindow()
    step = state.step + 1
    while step <= last_step:
        step_start = time.perf_counter()
        lr = lr_at(stage.local_step(step), stage.steps, cfg.optim)
        set_lr(trainer.optimizer, lr)
        rows = state.next_rows()
        data_wait = time.perf_counter() - step_start
        result = train_step(trainer, rows)
        loads = balance_experts(trainer, update=result.verdict == APPLY)
        if result.verdict == ROLLBACK:
            roll_back(trainer)
            step, window = state.step + 1, LogWindow()
            continue
        state.step = step
        window.add(time.perf_counter() - step_start, data_wait, result)
        if step % cfg.metrics.log_interval == 0 or step == last_step:
            scalars = {
                "lr": lr,
                "grad_norm": result.grad_norm,
                "router_loss": result.router_loss,
                **window.scalars(t.global_batch_size * t.seq_len, trainer.ctx.world_size),
                **expert_load_metrics(loads),
                **trainer.loader.metrics(),
                **trainer.health.metrics(),
                **rank_spread(window.seconds / window.steps, trainer.ctx.device),
                **eta(stage, step, window.seconds / window.steps),
            }
            if trainer.fp8.backend != "off":
                scalars.update(fp8_scalars(fp8_metrics(trainer.model)))
            if cfg.metrics.peak_flops_per_device:
                flops = flops_per_token(cfg.model, t.seq_len) * scalars["tokens_per_s"]
                scalars["mfu"] = flops / (
                    cfg.metrics.peak_flops_per_device * trainer.ctx.world_size
                )
            console = format_console(step, stage.run_steps, scalars)
            trainer.metrics.log(step, scalars, console)
            window = LogWindow(save_seconds=window.save_seconds)
        trainer.checkpoints.poll()  # completes a background save once every rank wrote it
        saved = should_save(trainer, step, last_step)
        if saved:
            window.save_seconds = save(trainer, step)  # reported with the next log line
        if preemption.requested(trainer.ctx.device):
            if not saved:
                save(trainer, step)
            trainer.checkpoints.wait()
            if trainer.ctx.rank == 0:
                print(f"preempted: checkpoint at step {step} written, exiting", flush=True)
            return True
        step += 1
    trainer.checkpoints.wait()
    return False


@dataclass
class LogWindow:
    """Sums since the last log line: steps, losses and where the time went."""

    steps: int = 0
    loss: float = 0.0
    seconds: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    save_seconds: float | None = None
    """The last checkpoint save's blocking time, until a log line has reported it."""

    def add(self, seconds: float, data_wait: float, result: StepResult) -> None:
        self.steps += 1
        self.loss += result.loss
        self.seconds += seconds
        for phase, value in {"data_wait": data_wait, **result.seconds}.items():
            self.phases[phase] = self.phases.get(phase, 0.0) + value

    def scalars(self, tokens_per_step: int, world_size: int) -> dict[str, float]:
        tokens_per_s = tokens_per_step * self.steps / self.seconds
        saves = {} if self.save_seconds is None else {"checkpoint/save_s": self.save_seconds}
        self.save_seconds = None
        return {
            **saves,
            "loss": self.loss / self.steps,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / world_size,
            "time/step_s": self.seconds / self.steps,
            **{f"time/{phase}_s": value / self.steps for phase, value in self.phases.items()},
        }


def eta(stage: Stage, step: int, step_seconds: float) -> dict[str, float]:
    """Seconds left in the stage and in the run, at the current step time."""
    return {
        "eta/stage_s": (stage.last_step - step) * step_seconds,
        "eta/run_s": (stage.run_steps - step) * step_seconds,
    }


def save(trainer: Trainer, step: int) -> float:
    """Write a checkpoint; return the seconds training was blocked by it."""
    start = time.perf_counter()
    stage = trainer.stage
    trainer.checkpoints.save(step, trainer.checkpoint_state(), stage.name, step == stage.last_step)
    return time.perf_counter() - start


def roll_back(trainer: Trainer) -> None:
    """Reload the newest checkpoint and mark the offending batches so they are never trained."""
    offending = trainer.health.rolled_back()
    trainer.checkpoints.wait()
    step = trainer.checkpoints.latest_step()
    if step is None:
        raise RuntimeError(
            f"training went wrong at step {trainer.state.step + 1} (batches {offending} of stage "
            f"{trainer.stage.name}: non-finite or spiking loss) and there is no checkpoint to "
            "roll back to; lower the learning rate or save earlier (checkpoint.interval)"
        )
    skip = sorted(set(trainer.state.skip_batches) | set(offending))
    trainer.checkpoints.load(step, trainer.checkpoint_state())
    if trainer.state.stage == trainer.stage.index:  # else the stage restarts with no skips
        trainer.state.skip_batches = sorted(set(trainer.state.skip_batches) | set(skip))
    if trainer.ctx.rank == 0:
        print(
            f"rolled back to step {step}: batches {offending} of stage {trainer.stage.name} "
            "will be skipped",
            flush=True,
        )


def announce(trainer: Trainer, run_cfg: Config) -> None:
    """Print the resolved config and model size, and save the config in the run directory."""
    if trainer.ctx.rank != 0:
        return
    text = to_toml(run_cfg)
    run_dir = run_cfg.training.run_dir.rstrip("/")
    fs, path = fsspec.core.url_to_fs(run_dir)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/config.toml", "w") as f:
        f.write(text)
    params = count_parameters(trainer.cfg.model)
    print(text + f"# parameters: {params}\n# world size: {trainer.ctx.world_size}", flush=True)
    print(f"# {trainer.fp8}", flush=True)
    trainer.metrics.log_text("config", text)
    groups = describe_parametrization(trainer.parametrization, trainer.model, trainer.cfg.optim)
    print(groups, flush=True)
    trainer.metrics.log_text("parametrization", groups)


def announce_stage(trainer: Trainer) -> None:
    stage, t, m = trainer.stage, trainer.cfg.training, trainer.cfg.model
    if trainer.ctx.rank == 0:
        print(
            f"stage {stage.name}: steps {stage.first_step}-{stage.last_step}, seq_len {t.seq_len}, "
            f"{t.global_batch_size} rows, rope_theta {m.rope_theta}, chunk "
            f"{m.attention_chunk_size}, cp {trainer.cfg.parallel.cp}",
            flush=True,
        )


def evaluate_stage(trainer: Trainer) -> None:
    """Long-context evaluation (trainer/eval.py) at the end of a stage, on every rank.

    Logged as `eval/longctx/<length>/...` at the stage's last step and written to
    `run_dir/eval/longctx-step-N.json`.
    """
    cfg, stage, step = trainer.cfg, trainer.stage, trainer.state.step
    results = evaluate_long_context(
        trainer.model,
        build_tokenizer(cfg.data.tokenizer),
        stage.eval_lengths,
        filler=FillerPool.from_sources(tuple(cfg.data.sources), cfg.data.tokenizer),
        seed=cfg.training.seed,
    )
    trainer.metrics.log(step, longctx_scalars(results), format_table(results))
    if trainer.ctx.rank == 0:
        fs, path = fsspec.core.url_to_fs(f"{cfg.training.run_dir.rstrip('/')}/eval")
        fs.makedirs(path, exist_ok=True)
        with fs.open(f"{path}/longctx-step-{step}.json", "w") as f:
            json.dump({"stage": stage.name, "step": step, **results}, f, indent=1)


def completed_step(cfg: Config, rank: int) -> int:
    """The step of the checkpoint this invocation resumes from (0 if none)."""
    if not cfg.checkpoint.resume:
        return 0
    manager = CheckpointManager(cfg.training.run_dir, cfg.checkpoint.keep, rank)
    return manager.latest_step() or 0


def train(cfg: Config) -> None:
    """Train every stage in turn; each builds its own model, parallelism and data from the
    checkpoint the previous one ended with (a stage may change seq_len, RoPE, cp, ...)."""
    ctx = init_distributed(
        resolve_device_type(cfg.training.device), cfg.training.collective_timeout_s
    )
    preemption = Preemption()
    preemption.install()
    try:
        stages = stage_configs(cfg)
        done = completed_step(cfg, ctx.rank)
        stop_at = stages[-1].last_step
        if cfg.training.stop_after_steps:
            stop_at = min(stop_at, done + cfg.training.stop_after_steps)
        announced = False
        for stage in stages:
            if done >= stage.last_step:
                continue  # finished by an earlier invocation
            if done >= stop_at:
                break
            trainer = build_trainer(stage.config, ctx, stage)
            if not announced:
                announce(trainer, cfg)
                announced = True
            announce_stage(trainer)
            resume(trainer)
            try:
                preempted = train_loop(trainer, stop_at, preemption)
                if trainer.state.step == stage.last_step and stage.eval_lengths:
                    evaluate_stage(trainer)
            finally:
                trainer.metrics.close()
                if isinstance(trainer.loader, BackgroundLoader):
                    trainer.loader.close()
            done = trainer.state.step
            if preempted:
                break
        # Tear down together: a rank that destroys its gloo pairs while another still writes
        # files (rank 0) can abort that rank's transport at exit ("terminate called ...").
        dist.barrier()
    finally:
        preemption.restore()
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
