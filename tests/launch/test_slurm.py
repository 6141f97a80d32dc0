"""The SLURM batch script of `python -m launch slurm`, run by bash with stand-ins for srun/scontrol.

The stand-ins log their arguments; the fake interpreter logs how the launcher would be called, so
the test sees what every node would run. The USR1 test checks the stop-and-requeue flow: the
batch shell forwards the signal to srun once, waits for it, and requeues the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.command import parse_args
from launch.slurm import main as slurm_main

SRUN = """#!/bin/bash
# Strip srun's options; run the command once, as node 0 of the allocation.
echo "srun $*" >> "$STUB_LOG"
while [[ "$1" == --* ]]; do shift; done
if [ -n "${SRUN_WAITS_FOR_USR1:-}" ]; then
    sleep 60 &
    trap 'echo "srun got USR1" >> "$STUB_LOG"; kill $!; exit 0' USR1
    wait
    exit 3
fi
SLURM_NODEID=0 exec "$@"
"""
SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
if [ "$1 $2" = "show hostnames" ]; then printf 'node17\\nnode18\\n'; fi
"""
PYTHON = """#!/bin/bash
for arg in "$@"; do echo "python-arg $arg" >> "$STUB_LOG"; done
"""


def write_script(tmp_path: Path, capsys, *trainer_args: str) -> Path:
    slurm_main(["--nodes", "2", "--max-restarts", "2", "--workdir", str(tmp_path),
                "--", *trainer_args])  # fmt: skip
    script = tmp_path / "job.sbatch"
    script.write_text(capsys.readouterr().out)
    return script


def stub_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("python", PYTHON)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHON": str(bin_dir / "python"),
        "STUB_LOG": str(tmp_path / "log"),
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[17-18]",
        "SLURM_JOB_NUM_NODES": "2",
    }


def log(tmp_path: Path) -> list[str]:
    path = tmp_path / "log"
    return path.read_text().splitlines() if path.exists() else []


def test_header_asks_for_requeue_and_an_early_signal_to_the_batch_shell(tmp_path, capsys):
    text = write_script(tmp_path, capsys, "--config", "configs/scout.toml").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --open-mode=append"):  # fmt: skip
        assert line in text.splitlines()
    subprocess.run(["bash", "-n", "-c", text], check=True)


def test_every_node_runs_the_launcher_with_the_first_node_as_rendezvous(tmp_path, capsys):
    script = write_script(tmp_path, capsys, "--config", "configs/tiny_cpu.toml", "--x.y=a b")
    subprocess.run(["bash", str(script)], env=stub_env(tmp_path), check=True, timeout=60)
    lines = log(tmp_path)
    assert "scontrol show hostnames node[17-18]" in lines
    assert any(line.startswith("srun --nodes=2 --ntasks-per-node=1") for line in lines)
    argv = [line.removeprefix("python-arg ") for line in lines if line.startswith("python-arg")]
    port = 29500 + 4242 % 10000
    assert argv[:2] == ["-m", "launch"]
    opts = parse_args(argv[2:])  # what the launcher on node 0 parses
    assert (opts.nnodes, opts.node_rank, opts.rdzv_id) == ("2", 0, "4242")
    assert opts.rdzv_endpoint == f"node17:{port}"
    assert opts.max_restarts == 2
    assert opts.trainer_args == ["--config", "configs/tiny_cpu.toml", "--x.y=a b"]


@pytest.mark.skipif(sys.platform != "linux", reason="signals to a bash process")
def test_usr1_is_forwarded_once_to_srun_and_the_job_requeued(tmp_path, capsys):
    script = write_script(tmp_path, capsys, "--config", "configs/tiny_cpu.toml")
    env = {**stub_env(tmp_path), "SRUN_WAITS_FOR_USR1": "1"}
    shell = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any(line.startswith("srun") for line in log(tmp_path)):
        assert time.monotonic() < deadline, "srun never started"
        time.sleep(0.05)
    time.sleep(0.2)  # the shell reaches `wait` (a signal before that is handled the same)
    shell.send_signal(signal.SIGUSR1)
    out, _ = shell.communicate(timeout=30)
    assert shell.returncode == 0, out
    lines = log(tmp_path)
    assert lines.count("srun got USR1") == 1
    assert lines[-1] == "scontrol requeue 4242"
    assert "requeueing job 4242" in out
