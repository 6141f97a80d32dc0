"""The real thing through `python -m launch`: two nodes' agents on one machine, and a restart.

Both compare per-step losses with one process trained on the same config without interruption;
the trainer makes the loss independent of the world size (to float32 rounding: rel 1e-5).

- Two torchrun agents (--nnodes=2, 2 processes each) meet at a c10d rendezvous on localhost:
  one job of 4 gloo ranks.
- One node, 2 processes, --max-restarts=1: once step CHECKPOINT_EVERY has a complete checkpoint
  and a later step is logged, local rank 1 is killed with SIGKILL. torchrun stops the group and
  starts it again; the new group resumes from the newest complete checkpoint and finishes.
  Rank 1 is the victim because rank 0 writes metrics.jsonl and the checkpoint marker: killing it
  mid-write could tear a metrics line, which is not what this test is about.
- SIGUSR1 to the launcher (SLURM's warning before the time limit) reaches every worker through
  the torchrun agent (torchrun forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT unless told):
  the workers checkpoint and exit 0 (trainer/preemption.py).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_runs import FAST, REPO, losses_by_step, read_metrics, run_trainer

STEPS = 8
CHECKPOINT_EVERY = 2
RTOL = 1e-5
TRAINING = [
    f"--training.steps={STEPS}",
    f"--checkpoint.interval={CHECKPOINT_EVERY}",
    "--data.num_workers=0",
]
TIMEOUT_S = 420


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """One process, STEPS steps, no interruption."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_trainer(run_dir, *TRAINING)
    return losses_by_step(run_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_launcher(run_dir: Path, log_name: str, *launch_args: str) -> subprocess.Popen:
    """`python -m launch ... -- <trainer args>`; the process becomes the torchrun agent."""
    trainer_args = [*FAST, *TRAINING, f"--training.run_dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(run_dir.parent / f"{run_dir.name}-{log_name}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "launch", *launch_args, "--", *trainer_args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def agent_output(run_dir: Path, log_name: str) -> str:
    return (run_dir.parent / f"{run_dir.name}-{log_name}.log").read_text()


def wait_for(agent: subprocess.Popen) -> int:
    try:
        return agent.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        agent.send_signal(signal.SIGTERM)  # the agent stops its workers
        agent.wait(timeout=60)
        raise


def assert_losses_match(losses: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=RTOL), step


def test_two_nodes_of_two_processes_match_one_process(tmp_path, reference):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    endpoint = f"localhost:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", endpoint,
              "--rdzv-id", "two-nodes", "--max-restarts", "0"]  # fmt: skip
    agents = [
        start_launcher(run_dir, f"node{rank}", *common, "--node-rank", str(rank)) for rank in (0, 1)
    ]
    codes = [wait_for(agent) for agent in agents]
    outputs = [agent_output(run_dir, f"node{rank}") for rank in (0, 1)]
    assert codes == [0, 0], "\n".join(out[-3000:] for out in outputs)
    assert "# world size: 4" in "".join(outputs)
    assert_losses_match(losses_by_step(run_dir), reference)


def children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc: psutil is not a dependency)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def worker_pid(agent_pid: int, local_rank: int) -> int | None:
    for pid in children(agent_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={local_rank}".encode() in environ:
            return pid
    return None


def kill_worker_after_first_checkpoint(run_dir: Path, agent: subprocess.Popen) -> None:
    marker = run_dir / "checkpoints" / f"step-{CHECKPOINT_EVERY}" / "COMPLETE"
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        assert agent.poll() is None, "the run ended before a worker could be killed"
        logged = (run_dir / "metrics.jsonl").exists() and read_metrics(run_dir)
        if marker.exists() and logged and logged[-1]["step"] > CHECKPOINT_EVERY:
            victim = worker_pid(agent.pid, local_rank=1)
            assert victim is not None, "no worker with LOCAL_RANK=1 under the agent"
            os.kill(victim, signal.SIGKILL)
            return
        time.sleep(0.05)
    raise AssertionError("no step after the first checkpoint was logged in time")


def test_killed_worker_restarts_the_group_which_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    agent = start_launcher(run_dir, "agent", "--nproc-per-node", "2", "--max-restarts", "1",
                           "--shutdown-timeout", "30")  # fmt: skip
    kill_worker_after_first_checkpoint(run_dir, agent)
    code = wait_for(agent)
    output = agent_output(run_dir, "agent")
    assert code == 0, output[-4000:]
    assert "resumed from" in output  # the restarted group loaded a checkpoint
    logged = [row["step"] for row in read_metrics(run_dir)]
    assert len(logged) > len(set(logged))  # steps after that checkpoint were trained twice
    assert_losses_match(losses_by_step(run_dir), reference)


def test_usr1_to_the_launcher_checkpoints_every_worker_and_stops(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    agent = start_launcher(run_dir, "agent", "--nproc-per-node", "2")
    deadline = time.monotonic() + TIMEOUT_S
    while not ((run_dir / "metrics.jsonl").exists() and read_metrics(run_dir)):
        assert agent.poll() is None and time.monotonic() < deadline, "no step was logged"
        time.sleep(0.05)
    agent.send_signal(signal.SIGUSR1)
    wait_for(agent)  # torchrun exits non-zero after a signal by design; the workers matter
    output = agent_output(run_dir, "agent")
    last = read_metrics(run_dir)[-1]["step"]
    assert last < STEPS, "the run ended before the signal"
    assert f"preempted: checkpoint at step {last} written" in output, output[-3000:]
    assert (run_dir / "checkpoints" / f"step-{last}" / "COMPLETE").exists()
    assert "exitcode" not in output  # no worker failed or was killed
