"""Metrics to TensorBoard (`run_dir/tb`), `run_dir/metrics.jsonl` and a console line.

Only rank 0 writes. Values arrive as Python floats at the log interval; the caller decides when
to synchronise with the device.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

import fsspec
import torch
import torch.distributed as dist

from trainer.model.moe import MoE


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.run_dir = run_dir.rstrip("/")
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=f"{self.run_dir}/tb")

    def log(self, step: int, scalars: dict[str, float], console: str | None = None) -> None:
        if not self.enabled:
            return
        record: dict[str, Any] = {"step": step, "time": time.time(), **scalars}
        with fsspec.open(f"{self.run_dir}/metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if console:
            print(console, file=sys.stdout, flush=True)

    def log_text(self, tag: str, text: str) -> None:
        if self.enabled and self.writer is not None:
            self.writer.add_text(tag, f"```\n{text}\n```", 0)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def expert_load_metrics(loads: dict[int, torch.Tensor]) -> dict[str, float]:
    """Per MoE layer: each expert's share of routed tokens, and max/mean load (1 = balanced)."""
    metrics = {}
    for layer, load_E in loads.items():
        total = float(load_E.sum())
        if total == 0:
            continue
        for expert, count in enumerate(load_E.tolist()):
            metrics[f"moe/layer{layer}/expert{expert}_share"] = count / total
        metrics[f"moe/layer{layer}/max_over_mean_load"] = float(load_E.max() / load_E.mean())
    return metrics


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far: CUDA allocations on a GPU, resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rank_spread(step_seconds: float, device: torch.device) -> dict[str, float]:
    """Slowest rank and largest memory over all ranks (a collective: every rank calls it).

    `step_seconds` is this rank's training time over the log window; a straggler shows up as
    `ranks/slowest` holding the same rank while `ranks/step_time_max` stays above the mean.
    """
    mine = torch.tensor([step_seconds, float(peak_memory_bytes(device))], dtype=torch.float64)
    per_rank = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, mine.to(device) if device.type == "cuda" else mine)
    times, memory = torch.stack([t.cpu() for t in per_rank]).T
    return {
        "ranks/step_time_max": float(times.max()),
        "ranks/step_time_mean": float(times.mean()),
        "ranks/slowest": float(times.argmax()),
        "memory/peak_gib_max": float(memory.max()) / 2**30,
        "memory/peak_gib_mean": float(memory.mean()) / 2**30,
        "memory/largest_rank": float(memory.argmax()),
    }


def collect_expert_loads(moe_layers: dict[int, MoE]) -> dict[int, torch.Tensor]:
    return {layer: moe.pop_expert_load() for layer, moe in moe_layers.items()}


def format_console(step: int, total_steps: int, scalars: dict[str, float]) -> str:
    parts = [
        f"step {step}/{total_steps}",
        f"loss {scalars['loss']:.4f}",
        f"lr {scalars['lr']:.2e}",
        f"grad_norm {scalars['grad_norm']:.3f}",
        f"{scalars['tokens_per_s']:,.0f} tok/s",
    ]
    balance = [v for k, v in scalars.items() if k.endswith("max_over_mean_load")]
    if balance:
        parts.append(f"moe max/mean {max(balance):.2f}")
    if "mfu" in scalars:
        parts.append(f"mfu {scalars['mfu']:.1%}")
    if "memory/peak_gib_max" in scalars:
        parts.append(f"mem {scalars['memory/peak_gib_max']:.2f} GiB")
    if "eta/run_s" in scalars:
        stage, run = _clock(scalars["eta/stage_s"]), _clock(scalars["eta/run_s"])
        parts.append(f"eta stage {stage} run {run}")
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
