"""Training steps of configs/tiny_cpu.toml at long sequence lengths: time and peak memory per rank.

    python benchmarks/long_context_step.py                    # 16K and 64K on 1 rank, 256K on 4
    python benchmarks/long_context_step.py --runs 16384:1 65536:2 --steps 2

Each run is the real training CLI (`python -m trainer.train`, under torchrun when cp > 1) on
rows of the sample corpus packed to the given length, one row per step, context parallel over
`cp` gloo ranks. The trainer logs each rank's peak memory (resident set on CPU) and step time;
this script reports the last step's time and the largest peak over ranks, and the memory ratio
of the first two runs (the issue's goal: 64K / 16K <= 4.5, i.e. linear in length, no sequence x
sequence buffer anywhere) and whether the longest run completed. JSON to
benchmarks/results/long_context_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = ("16384:1", "65536:1", "262144:4")


def run(seq_len: int, cp: int, steps: int, dtype: str, run_dir: Path) -> dict:
    args = [
        "-m", "trainer.train",
        f"--training.run_dir={run_dir}",
        f"--training.seq_len={seq_len}",
        "--training.global_batch_size=1",
        f"--training.steps={steps}",
        f"--training.dtype={dtype}",
        f"--parallel.cp={cp}",
        "--data.num_workers=0",
        "--checkpoint.interval=0",
        "--metrics.log_interval=1",
        "--metrics.tensorboard=false",
    ]  # fmt: skip
    if cp > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cp}", *args]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"seq_len": seq_len, "cp": cp, "completed": False, "error": result.stderr[-2000:]}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return {
        "seq_len": seq_len,
        "cp": cp,
        "completed": True,
        "step_seconds": seq_len / last["tokens_per_s"],
        "peak_gib_per_rank_max": last["memory/peak_gib_max"],
        "peak_gib_per_rank_mean": last["memory/peak_gib_mean"],
        "peak_gib_all_ranks": last["memory/peak_gib_mean"] * cp,
        "loss": last["loss"],
        "wall_seconds_with_startup": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS), help="SEQ_LEN:CP")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/long_context_step.json"))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.runs):
            seq_len, cp = (int(x) for x in spec.split(":"))
            result = run(seq_len, cp, args.steps, args.dtype, Path(tmp) / f"run{i}")
            results.append(result)
            if result["completed"]:
                print(
                    f"{seq_len:>7} tokens, cp {cp}: step {result['step_seconds']:7.1f} s, peak "
                    f"{result['peak_gib_per_rank_max']:.2f} GiB per rank (max), "
                    f"{result['peak_gib_all_ranks']:.2f} GiB all ranks",
                    flush=True,
                )
            else:
                print(f"{seq_len:>7} tokens, cp {cp}: FAILED\n{result['error']}", flush=True)
    first, second = results[0], results[1] if len(results) > 1 else None
    summary = {"runs": results, "dtype": args.dtype, "steps": args.steps}
    if second and first["completed"] and second["completed"]:
        ratio = second["peak_gib_per_rank_max"] / first["peak_gib_per_rank_max"]
        summary["memory_ratio"] = {
            "of": [second["seq_len"], first["seq_len"]],
            "length_ratio": second["seq_len"] / first["seq_len"],
            "peak_ratio": ratio,
            "goal": 4.5,
        }
        print(f"peak memory {second['seq_len']} / {first['seq_len']}: {ratio:.2f} (goal <= 4.5)")
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
