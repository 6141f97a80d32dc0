"""Memory per rank under FSDP2 for dp_shard = 1, 2, 4: parameter, gradient and Adam shards, RSS.

For each N in `--dp-shard` (default 1,2,4) N gloo ranks are spawned (tests/distributed.py's
`run_distributed`), and each builds its trainer exactly as training does: `trainer.train.
build_trainer` (seeded init, `parallel.fsdp.parallelize_model` over a dp_shard = N mesh,
`trainer.optim.build_optimizer`: AdamW, foreach) on a config derived from configs/tiny_cpu.toml
with a wider model (dim 512, dense FFN 2048, 8 experts of 1024; text only). Then `--steps`
`train_step` + `balance_experts` calls on the config's data; the last step's
`optimizer.zero_grad` is skipped so that its gradients (reduce-scattered, float32) remain to be
counted.

Per rank, exact byte counts summed over the local tensors (`DTensor.to_local()`):
parameters, gradients, optimizer state (exp_avg + exp_avg_sq; the per-parameter `step` scalars
apart), and the model's buffers (not sharded). Peak RSS is `resource.getrusage(RUSAGE_SELF).
ru_maxrss` of the rank's process, with the RSS when the rank started (torch imported, process
group up) for reference. The per-rank micro-batch is the same for every N (`--rows` rows of
`--seq` tokens; global batch = N x rows), so activations do not shrink with N and RSS
differences come from the sharded state.

Claim checked: parameters + optimizer state per rank = (that of N = 1) / N; the ratio to 1/N is
printed (1.000 = exact).

    python benchmarks/memory_per_rank.py
    python benchmarks/memory_per_rank.py --dp-shard 1,2 --steps 1 --model.dim=768
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import load_average, report_header  # noqa: E402
from parallel.mesh import DistributedContext  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from trainer.config import ConfigError, load_config, split_cli  # noqa: E402

# tiny_cpu.toml's model, 4x wider; text only (the vision tower is not what is measured here).
DERIVED = [
    "--model.dim=512",
    "--model.dense_ffn_dim=2048",
    "--model.expert_ffn_dim=1024",
    "--model.vision.enabled=false",
    '--data.sources=["data/sample/sample-*.jsonl.zst"]',
    "--data.num_workers=0",
    "--metrics.tensorboard=false",
    "--checkpoint.interval=0",
    "--checkpoint.resume=false",
]
MB = 1 << 20


def local_bytes(tensor: torch.Tensor | None) -> int:
    if tensor is None:
        return 0
    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    return tensor.numel() * tensor.element_size()


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    params = list(model.parameters())
    optim = {"exp_avg": 0, "exp_avg_sq": 0, "step": 0, "other": 0}
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                optim[key if key in optim else "other"] += local_bytes(value)
    return {
        "parameters": sum(local_bytes(p) for p in params),
        "parameters_full": sum(p.numel() * p.element_size() for p in params),
        "parameter_elements_local": sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel() for p in params
        ),
        "gradients": sum(local_bytes(p.grad) for p in params),
        "optimizer_moments": optim["exp_avg"] + optim["exp_avg_sq"],
        "optimizer_step_scalars": optim["step"],
        "optimizer_other": optim["other"],
        "buffers": sum(local_bytes(b) for b in model.buffers()),
    }


def rank_main(rank: int, world: int, args: argparse.Namespace) -> dict:
    from trainer.train import balance_experts, build_trainer, train_step

    torch.set_num_threads(max(1, args.threads // world))
    rss_start = current_rss()
    with tempfile.TemporaryDirectory(prefix="memory_per_rank_") as run_dir:
        overrides = [
            *DERIVED,
            *args.overrides,
            f"--parallel.dp_shard={world}",
            "--parallel.dp_replicate=1",
            "--parallel.ep=1",
            "--parallel.cp=1",
            f"--training.global_batch_size={world * args.rows}",
            f"--training.seq_len={args.seq}",
            f"--training.run_dir={run_dir}",
        ]
        cfg = load_config(args.config, overrides)
        ctx = DistributedContext(rank, rank, world, torch.device("cpu"))
        trainer = build_trainer(cfg, ctx)
        built = state_bytes(trainer.model, trainer.optimizer)
        rss_built, peak_built = current_rss(), peak_rss()
        step_seconds, peak_steps = [], []
        for step in range(args.steps):
            if step == args.steps - 1:
                # keep the last step's gradients for counting
                trainer.optimizer.zero_grad = lambda set_to_none=True: None
            start = time.perf_counter()
            train_step(trainer, trainer.loader.next_batch())
            balance_experts(trainer)
            step_seconds.append(time.perf_counter() - start)
            peak_steps.append(peak_rss())
        after = state_bytes(trainer.model, trainer.optimizer)
        result = {
            "rank": rank,
            "after_build": built,
            "after_steps": after,
            "rss_start": rss_start,
            "rss_after_build": rss_built,
            "peak_rss_after_build": peak_built,
            "peak_rss_after_each_step": peak_steps,
            "rss_after_steps": current_rss(),
            "peak_rss": peak_rss(),
            "step_seconds": step_seconds,
            "model": {k: v for k, v in vars(cfg.model).items() if k != "vision"},
        }
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other arguments: --config PATH and --section.key=value overrides (applied after "
        "the derived model's).",
    )
    parser.add_argument("--dp-shard", default="1,2,4", help="comma-separated FSDP degrees")
    parser.add_argument("--steps", type=int, default=2, help="train steps per rank (>= 1)")
    parser.add_argument("--rows", type=int, default=2, help="rows per rank per step")
    parser.add_argument("--seq", type=int, default=256, help="tokens per row")
    parser.add_argument("--threads", type=int, default=0, help="torch threads over all ranks")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "memory_per_rank.json",
    )
    args, rest = parser.parse_known_args(argv)
    try:
        args.config, args.overrides = split_cli(rest)
    except ConfigError as e:
        parser.error(str(e))
    args.dp_shard = [int(n) for n in args.dp_shard.split(",")]
    if 1 not in args.dp_shard:
        args.dp_shard.insert(0, 1)  # the 1/N reference
    if args.steps < 1 or args.rows < 1 or min(args.dp_shard) < 1:
        parser.error("--steps, --rows and every --dp-shard must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.chdir(REPO)  # the config's data sources are relative to the repository root
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.threads = args.threads or cores
    load_before = load_average()
    print(
        f"torch {torch.__version__}; config {args.config or 'configs/tiny_cpu.toml'} with "
        f"{' '.join(DERIVED[:4] + args.overrides)}; {args.rows}x{args.seq} tokens per rank, "
        f"{args.steps} steps",
        flush=True,
    )
    runs = {}
    for n in args.dp_shard:
        start = time.perf_counter()
        ranks = run_distributed(rank_main, world_size=n, args=(args,))
        runs[n] = {"ranks": ranks, "wall_seconds": time.perf_counter() - start}
        print(f"dp_shard={n}: {runs[n]['wall_seconds']:.1f} s", flush=True)

    def states(rank: dict) -> int:
        s = rank["after_steps"]
        return s["parameters"] + s["optimizer_moments"] + s["optimizer_step_scalars"]

    base = runs[1]["ranks"][0]
    base_states = states(base)
    base_all = base_states + base["after_steps"]["gradients"]
    rows = []
    for n, run in runs.items():
        for rank in run["ranks"]:
            s = rank["after_steps"]
            rows.append(
                {
                    "dp_shard": n,
                    "rank": rank["rank"],
                    "parameters_mb": s["parameters"] / MB,
                    "gradients_mb": s["gradients"] / MB,
                    "optimizer_mb": (s["optimizer_moments"] + s["optimizer_step_scalars"]) / MB,
                    "buffers_kb": s["buffers"] / 1024,
                    "params_plus_optimizer_mb": states(rank) / MB,
                    "ratio_params_optimizer_to_1_over_n": states(rank) / (base_states / n),
                    "ratio_params_grads_optimizer_to_1_over_n": (states(rank) + s["gradients"])
                    / (base_all / n),
                    "rss_start_mb": rank["rss_start"] / MB,
                    "rss_after_build_mb": rank["rss_after_build"] / MB,
                    "peak_rss_after_build_mb": rank["peak_rss_after_build"] / MB,
                    "peak_rss_mb": rank["peak_rss"] / MB,
                    "peak_rss_over_start_mb": (rank["peak_rss"] - rank["rss_start"]) / MB,
                    "step_seconds": rank["step_seconds"],
                }
            )
    print(
        f"{'N':>2} {'rank':>4} {'params MB':>10} {'grads MB':>9} {'Adam MB':>8} "
        f"{'buffers KB':>10} {'P+O MB':>8} {'P+O / (1/N)':>11} {'P+G+O / (1/N)':>13} "
        f"{'RSS start':>9} {'built':>6} {'peak@build':>10} {'peak RSS':>9} {'peak-start':>10}"
    )
    for r in rows:
        print(
            f"{r['dp_shard']:>2} {r['rank']:>4} {r['parameters_mb']:>10.2f} "
            f"{r['gradients_mb']:>9.2f} {r['optimizer_mb']:>8.2f} {r['buffers_kb']:>10.3f} "
            f"{r['params_plus_optimizer_mb']:>8.2f} "
            f"{r['ratio_params_optimizer_to_1_over_n']:>11.4f} "
            f"{r['ratio_params_grads_optimizer_to_1_over_n']:>13.4f} {r['rss_start_mb']:>9.0f} "
            f"{r['rss_after_build_mb']:>6.0f} {r['peak_rss_after_build_mb']:>10.0f} "
            f"{r['peak_rss_mb']:>9.0f} {r['peak_rss_over_start_mb']:>10.0f}"
        )
    print(
        "MB = 2^20 bytes; P+O = parameters + Adam state (moments + step scalars) on the rank; "
        "ratios: the rank's bytes / (N = 1 bytes / N), 1.0000 = exactly 1/N. RSS MB: at the "
        "rank's start, after build_trainer, peak during build_trainer, peak at the end."
    )
    params_full = base["after_steps"]["parameters_full"]
    report = {
        **report_header(
            "per-rank parameter / gradient / optimizer bytes and peak RSS vs dp_shard", load_before
        ),
        "config": args.config or "configs/tiny_cpu.toml",
        "overrides": [*DERIVED, *args.overrides],
        "model": base["model"],
        "parameter_bytes_full": params_full,
        "parameters_full": params_full // 4,
        "rows_per_rank": args.rows,
        "seq_len": args.seq,
        "steps": args.steps,
        "table": rows,
        "runs": {str(n): run for n, run in runs.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
