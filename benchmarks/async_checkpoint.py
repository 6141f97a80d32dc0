"""How long a checkpoint blocks training: asynchronous against synchronous saves of one state.

    python benchmarks/async_checkpoint.py [--dim 512] [--steps 8] [--interval 2] [--nproc 1]

Runs the training CLI twice on the same model and data, with `checkpoint.async_save` true and
false, saving every `interval` steps, and reads the blocking time of each save that the trainer
logs (`checkpoint/save_s`: from the call until training may go on; for an async save that is
the in-memory copy, plus waiting for the previous save if it is still being written). Reports
the median blocking time of both modes and their ratio (the issue's goal: async <= 20% of sync),
plus the checkpoint size. JSON to benchmarks/results/async_checkpoint.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(run_dir: Path, async_save: bool, args: argparse.Namespace) -> dict:
    overrides = [
        f"--training.run_dir={run_dir}",
        f"--training.steps={args.steps}",
        "--training.seq_len=128",
        "--training.global_batch_size=8",
        f"--model.dim={args.dim}",
        f"--model.dense_ffn_dim={4 * args.dim}",
        f"--model.expert_ffn_dim={2 * args.dim}",
        f"--model.vision.output_dim={args.dim}",
        f"--checkpoint.interval={args.interval}",
        "--checkpoint.keep=0",
        f"--checkpoint.async_save={'true' if async_save else 'false'}",
        "--metrics.log_interval=1",
        "--metrics.tensorboard=false",
        "--data.num_workers=0",
    ]
    command = [sys.executable, "-m", "trainer.train", *overrides]
    if args.nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
        command = [sys.executable, *launcher, "-m", "trainer.train", *overrides]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    saves = [row["checkpoint/save_s"] for row in rows if "checkpoint/save_s" in row]
    steps = [row["time/step_s"] for row in rows if "time/step_s" in row]
    size = sum(f.stat().st_size for f in (run_dir / "checkpoints").rglob("*") if f.is_file())
    n_checkpoints = len(list((run_dir / "checkpoints").glob("step-*")))
    return {
        "save_blocking_s": saves,
        "median_save_blocking_s": statistics.median(saves),
        "median_step_s": statistics.median(steps),
        "checkpoint_mib": size / n_checkpoints / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/async_checkpoint.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sync = run(Path(tmp) / "sync", False, args)
        asynchronous = run(Path(tmp) / "async", True, args)
    ratio = asynchronous["median_save_blocking_s"] / sync["median_save_blocking_s"]
    result = {
        "config": vars(args) | {"out": None},
        "sync": sync,
        "async": asynchronous,
        "blocking_ratio_async_over_sync": ratio,
        "goal": 0.2,
    }
    blocked_sync = sync["median_save_blocking_s"]
    blocked_async = asynchronous["median_save_blocking_s"]
    print(
        f"checkpoint {sync['checkpoint_mib']:.0f} MiB: sync blocks {blocked_sync:.3f} s, async "
        f"{blocked_async:.3f} s (ratio {ratio:.3f}, goal <= 0.2); "
        f"step {sync['median_step_s']:.2f} s"
    )
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
