"""Run the real training CLI (alone or under torchrun) in a subprocess and read its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A smaller, faster variant of configs/tiny_cpu.toml for tests; the model keeps every path
# (dense + MoE layers, NoPE layer, chunked attention, temperature tuning).
FAST = [
    "--training.seq_len=128",
    "--training.global_batch_size=8",
    "--metrics.log_interval=1",
    "--metrics.tensorboard=false",
]


def run_trainer(
    run_dir: Path,
    *overrides: str,
    nproc: int = 1,
    check: bool = True,
    config: Path | None = None,
    program: str = "trainer.train",
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """`python -m program` (the training CLI, or a variant such as tests.record_gradients)."""
    config_args = ["--config", str(config)] if config else []
    args = ["-m", program, *config_args, *FAST, f"--training.run_dir={run_dir}", *overrides]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        args = [*launcher, *args]
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"trainer failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def read_metrics(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run may log a step twice; evaluation rows
    carry no training loss)."""
    return {row["step"]: row["loss"] for row in read_metrics(run_dir) if "loss" in row}
