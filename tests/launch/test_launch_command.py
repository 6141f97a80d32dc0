"""The torchrun command `python -m launch` builds, for one node and many (nothing is run)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
from trainer_runs import REPO

from launch.command import (
    FORWARDED_SIGNALS,
    Hardware,
    LaunchError,
    build_plan,
    launch_env,
    parse_args,
    plan_launch,
    resolve_nproc,
)

CPU = Hardware("cpu", gpus=0, cpus=8)
GPUS = Hardware("cuda", gpus=8, cpus=96)


def plan(*argv: str, environ: dict[str, str] | None = None):
    return plan_launch(parse_args(list(argv)), environ or {})


def torchrun_options(argv: list[str]) -> list[str]:
    """The options between `-m torch.distributed.run` and `-m trainer.train`."""
    start = argv.index("torch.distributed.run") + 1
    return argv[start : argv.index("trainer.train") - 1]


def test_single_node_is_standalone_with_one_cpu_process():
    p = plan("--", "--training.steps=5")
    assert p.argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    options = torchrun_options(p.argv)
    assert options[:4] == ["--standalone", "--nnodes=1", "--nproc-per-node=1", "--max-restarts=0"]
    assert not any(o.startswith("--rdzv") for o in options)
    assert p.argv[-3:] == ["-m", "trainer.train", "--training.steps=5"]


def test_multi_node_uses_a_c10d_rendezvous():
    p = plan(
        "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", "node0:29400",
        "--rdzv-id", "job7", "--node-rank", "0", "--max-restarts", "3",
        "--", "--config", "configs/tiny_cpu.toml", "--training.steps=5",
    )  # fmt: skip
    options = torchrun_options(p.argv)
    assert options[:8] == [
        "--nnodes=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node0:29400",
        "--rdzv-id=job7",
        "--rdzv-conf=is_host=1",
        "--nproc-per-node=2",
        "--max-restarts=3",
        f"--signals-to-handle={FORWARDED_SIGNALS}",
    ]
    assert "--standalone" not in options and "--node-rank=0" not in options
    tail = ["-m", "trainer.train", "--config", "configs/tiny_cpu.toml", "--training.steps=5"]
    assert p.argv[-5:] == tail
    other = plan("--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", "node0:29400",
                 "--node-rank", "1", "--rdzv-conf", "join_timeout=1800")  # fmt: skip
    assert "--rdzv-conf=join_timeout=1800,is_host=0" in other.argv


def test_elastic_node_range_and_restarts_pass_through():
    p = plan("--nnodes", "1:4", "--rdzv-endpoint", "h:1", "--max-restarts", "2")
    assert "--nnodes=1:4" in p.argv and "--max-restarts=2" in p.argv


def test_dry_run_prints_the_exact_command():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("OMP_NUM_THREADS", None)
    out = subprocess.run(
        [sys.executable, "-m", "launch", "--nproc-per-node", "2", "--dry-run", "--",
         "--training.steps=5", "--training.run_dir=runs/a b"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    words = shlex.split(out)
    assert words[0].startswith("OMP_NUM_THREADS=") and "PYTHONFAULTHANDLER=1" in words
    command = words[words.index(sys.executable) :]
    assert "--nproc-per-node=2" in command
    assert command[-4:] == [
        "-m",
        "trainer.train",
        "--training.steps=5",
        "--training.run_dir=runs/a b",
    ]


def test_nproc_auto_is_the_gpu_count_on_cuda_and_one_on_cpu():
    assert resolve_nproc("auto", GPUS) == 8
    assert resolve_nproc("auto", CPU) == 1
    assert resolve_nproc("3", CPU) == 3
    with pytest.raises(LaunchError, match="exceeds the 8 GPUs"):
        resolve_nproc("9", GPUS)
    with pytest.raises(LaunchError, match="positive number or auto"):
        resolve_nproc("0", CPU)


def test_environment_per_device_and_the_callers_values_win():
    cpu = launch_env(CPU, nproc=4, run_dir="runs/x", environ={})
    assert cpu == {
        "OMP_NUM_THREADS": "2",
        "PYTHONFAULTHANDLER": "1",
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",  # restarts need a fresh store
    }
    assert "OMP_NUM_THREADS" not in launch_env(CPU, 4, "runs/x", {"OMP_NUM_THREADS": "7"})
    cuda = launch_env(GPUS, nproc=8, run_dir="runs/x", environ={})
    assert cuda["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"
    assert cuda["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    assert cuda["TORCH_FR_DUMP_TEMP_FILE"] == "runs/x/comm_traces/rank_"
    assert "OMP_NUM_THREADS" not in cuda and cuda["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert "TORCH_FR_DUMP_TEMP_FILE" not in launch_env(GPUS, 8, "s3://bucket/run", {})


def test_no_backend_or_device_is_passed_to_the_trainer():
    """The trainer picks nccl/gloo from its own training.device; the launch adds nothing."""
    opts = parse_args(["--nproc-per-node", "auto", "--", "--training.steps=5"])
    argv = build_plan(opts, GPUS, "runs/x", {}).argv
    assert argv[argv.index("trainer.train") + 1 :] == ["--training.steps=5"]
    assert not any("backend" in a and "rdzv" not in a for a in argv)


def test_the_device_rule_matches_the_trainer():
    from launch.command import detect_hardware
    from trainer.train import resolve_device_type

    assert detect_hardware("auto").device == resolve_device_type("auto")
    assert detect_hardware("cpu").device == "cpu"


def test_bad_launches_fail_before_anything_starts():
    with pytest.raises(LaunchError, match="needs --rdzv-endpoint"):
        plan("--nnodes", "2")
    with pytest.raises(LaunchError, match="unknown config key 'training.bogus'"):
        plan("--", "--training.bogus=1")
    with pytest.raises(LaunchError, match="2 node\\(s\\) x 1 processes.*world size 2"):
        plan("--nnodes", "2", "--rdzv-endpoint", "h:1", "--", "--parallel.dp_shard=3")
    with pytest.raises(LaunchError, match="--nnodes must be N or MIN:MAX"):
        parse_args(["--nnodes", "two"])
