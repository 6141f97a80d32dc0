"""Operations: preemption, non-finite steps and rollbacks, loss spikes, hung collectives.

Through the CLI: SIGTERM sent to ONE of two ranks mid-run stops both after the same step with a
checkpoint and exit code 0, and the restart equals an uninterrupted run bitwise. A process that
dies while its asynchronous save is in flight leaves no checkpoint marked complete. NaN injected
into one batch skips that update; NaN in max_nonfinite_steps batches in a row rolls back to the
newest checkpoint and skips those batches, and a run stopped after the rollback and resumed
does not replay them (its losses equal the uninterrupted faulty run's, bitwise).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from distributed import run_distributed
from torch.distributed.device_mesh import init_device_mesh
from trainer_runs import FAST, REPO, losses_by_step, read_metrics, run_trainer

from parallel.mesh import init_distributed
from trainer.health import APPLY, ROLLBACK, SKIP, TrainingHealth

STEPS = 6
COMMON = (f"--training.steps={STEPS}", "--checkpoint.interval=2", "--data.num_workers=0")


def test_health_verdicts():
    health = TrainingHealth(max_nonfinite_steps=2, loss_spike_factor=1.5, loss_spike_window=3)
    assert [health.verdict(loss, 1.0, b) for b, loss in enumerate([4.0, 3.0, 2.0], 1)] == [
        APPLY
    ] * 3
    assert health.verdict(4.6, 1.0, 4) == ROLLBACK  # > 1.5 x mean(4, 3, 2) = 4.5
    assert health.rolled_back() == [4]
    assert [health.verdict(x, 1.0, b) for b, x in enumerate([4.0, 3.0, 2.0], 5)] == [APPLY] * 3
    assert health.verdict(4.4, 1.0, 8) == APPLY  # below the spike threshold
    assert health.verdict(float("nan"), 1.0, 9) == SKIP
    assert health.verdict(2.0, float("inf"), 10) == ROLLBACK  # 2 non-finite in a row
    assert health.rolled_back() == [9, 10]
    assert health.metrics() == {"health/nonfinite_skipped_steps": 2.0, "health/rollbacks": 2.0}


def faulty(run_dir, *overrides: str, batches: str = "3,4") -> subprocess.CompletedProcess:
    return run_trainer(
        run_dir,
        *COMMON,
        "--training.max_nonfinite_steps=2",
        *overrides,
        program="tests.inject_faults",
        env={"FAULT_NAN_BATCHES": batches},
    )


def test_one_nonfinite_step_is_skipped(tmp_path):
    faulty(tmp_path, batches="3")
    rows = {row["step"]: row for row in read_metrics(tmp_path) if "loss" in row}
    assert math.isnan(rows[3]["loss"]) and all(math.isfinite(rows[s]["loss"]) for s in (4, 5, 6))
    assert rows[6]["health/nonfinite_skipped_steps"] == 1.0 and rows[6]["health/rollbacks"] == 0


def test_nonfinite_steps_in_a_row_roll_back_and_are_never_replayed(tmp_path):
    whole = faulty(tmp_path / "whole")
    assert "rolled back to step 2: batches [3, 4] of stage main will be skipped" in whole.stdout
    losses = losses_by_step(tmp_path / "whole")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(loss) for loss in losses.values())
    assert read_metrics(tmp_path / "whole")[-1]["health/rollbacks"] == 1.0

    stopped = tmp_path / "stopped"
    faulty(stopped, "--training.stop_after_steps=4")  # the rollback happens in this invocation
    resumed = faulty(stopped)
    assert "rolled back" not in resumed.stdout  # batches 3 and 4 stay skipped after resuming
    assert losses_by_step(stopped) == losses  # bitwise


def test_a_crash_during_an_async_save_never_leaves_a_complete_checkpoint(tmp_path):
    crashed = run_trainer(
        tmp_path,
        *COMMON,
        "--checkpoint.async_save=true",
        program="tests.inject_faults",
        env={"FAULT_CRASH_AFTER_SAVE": "4"},
        check=False,
    )
    assert crashed.returncode == 3
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "step-2" / "COMPLETE").exists()
    assert not (checkpoints / "step-4" / "COMPLETE").exists()  # data perhaps, marker never
    resumed = run_trainer(tmp_path, *COMMON)
    assert f"resumed from {checkpoints}/step-2" in resumed.stdout
    assert sorted(losses_by_step(tmp_path)) == list(range(1, STEPS + 1))


def worker_pids(agent: subprocess.Popen) -> list[int]:
    children = open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split()
    return sorted(int(pid) for pid in children)


def test_sigterm_to_one_rank_checkpoints_every_rank_and_exits_zero(tmp_path):
    steps = ("--training.steps=12", "--checkpoint.interval=0", "--data.num_workers=0")
    run_trainer(tmp_path / "reference", *steps, nproc=2)
    run_dir = tmp_path / "preempted"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "trainer.train", *FAST, f"--training.run_dir={run_dir}", *steps,
    ]  # fmt: skip
    agent = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists() or len(read_metrics(run_dir)) < 2:
        assert agent.poll() is None and time.time() < deadline, "the run ended before step 2"
        time.sleep(0.2)
    pids = worker_pids(agent)
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGTERM)
    out, err = agent.communicate(timeout=300)
    assert agent.returncode == 0, err.decode()[-3000:]
    stopped_at = max(losses_by_step(run_dir))
    assert stopped_at < 12
    assert f"preempted: checkpoint at step {stopped_at} written" in out.decode()
    assert (run_dir / "checkpoints" / f"step-{stopped_at}" / "COMPLETE").exists()
    second = run_trainer(run_dir, *steps, nproc=2)
    assert f"resumed from {run_dir}/checkpoints/step-{stopped_at}" in second.stdout
    assert losses_by_step(run_dir) == losses_by_step(tmp_path / "reference")  # bitwise


def hang_on_rank_one(rank: int, world_size: int, port: int) -> str:
    """Re-join through init_distributed (its timeout) on a fresh port; rank 1 never arrives."""
    dist.destroy_process_group()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_PORT=str(port))
    init_distributed("cpu", timeout_s=3.0)
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("dp",))
    if rank == 1:
        time.sleep(15)  # stuck: never joins the collective
        return "slept"
    start = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(1), group=mesh.get_group())
    except RuntimeError as error:
        return f"{time.perf_counter() - start:.1f}s: {error}"
    return "completed"


def test_a_hung_collective_fails_within_the_timeout():
    """init_distributed's timeout applies to device-mesh groups too: the wait ends in error."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result, _ = run_distributed(hang_on_rank_one, world_size=2, args=(port,))
    seconds, _, message = result.partition("s: ")
    assert float(seconds) < 10, result
    assert "timed out" in message.lower() or "timeout" in message.lower(), message


def test_checkpoints_on_an_fsspec_url_resume_exactly(tmp_path):
    """run_dir as a `file://` URL: metrics, async checkpoints and markers go through fsspec."""
    reference = run_trainer(tmp_path / "reference", *COMMON)
    assert "eta stage 0:00:" in reference.stdout  # the console line's ETA
    url = f"file://{tmp_path}/url_run"
    run_trainer(url, *COMMON, "--training.stop_after_steps=4")
    assert (tmp_path / "url_run" / "checkpoints" / "step-4" / "COMPLETE").exists()
    resumed = run_trainer(url, *COMMON)
    assert f"resumed from {url}/checkpoints/step-4" in resumed.stdout
    assert losses_by_step(tmp_path / "url_run") == losses_by_step(tmp_path / "reference")
