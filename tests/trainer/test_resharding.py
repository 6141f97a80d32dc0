"""Checkpoints reshard across parallel layouts: saved under one, resumed or started from under any.

Every parameter and its Adam moments are stored under the unsharded name in full shape, routed
experts included whatever parallel.ep (trainer/checkpoint.py, `ExpertRows`). A run's step-2
checkpoint from one layout, resumed under another, must continue the uninterrupted loss curve
(dp_shard=4, itself equal to one process): steps 3..4 agree to the FSDP tolerance 1e-5
(measured on CPU: relative differences below 1e-7). The pairs move ep up (dp_shard=4 ->
dp_shard=2 x ep=2) and down (ep=4 -> dp_replicate=2 x dp_shard=2 x ep=2, whose two replicas hold
the same experts: DCP saves each once and both read it); ep=2 -> one process is in
tests/parallel/test_expert_training.py. `checkpoint.init_from` loads the ep=4 checkpoint into
ep=2 ranks bit for bit.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from trainer_runs import losses_by_step, run_trainer

STEPS = 4
HALF = STEPS // 2
RTOL = 1e-5
COMMON = (f"--training.steps={STEPS}", f"--checkpoint.interval={HALF}")

# name -> (processes, overrides)
LAYOUTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "dp_shard=4": (4, ()),
    "ep=4": (4, ("--parallel.ep=4",)),
    "dp_shard=2 x ep=2": (2, ("--parallel.ep=2",)),
    "dp_replicate=2 x dp_shard=2 x ep=2": (
        4,
        ("--parallel.dp_replicate=2", "--parallel.dp_shard=2", "--parallel.ep=2"),
    ),
}


def run_layout(run_dir: Path, layout: str, *overrides: str) -> subprocess.CompletedProcess:
    nproc, args = LAYOUTS[layout]
    return run_trainer(run_dir, *args, *overrides, nproc=nproc)


def full_state(checkpoint: Path, tmp_path: Path) -> dict:
    """Every entry of a DCP checkpoint, tensors in full shape, read in this one process."""
    path = tmp_path / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint, path)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """STEPS steps under dp_shard=4 without interruption; its step-HALF checkpoint is kept."""
    run_dir = tmp_path_factory.mktemp("dp_shard4")
    run_layout(run_dir, "dp_shard=4", *COMMON)
    return run_dir


@pytest.fixture(scope="module")
def stopped_ep4(tmp_path_factory) -> Path:
    """A run stopped at step HALF under ep=4 (each rank 2 whole experts); copy before resuming."""
    run_dir = tmp_path_factory.mktemp("ep4")
    run_layout(run_dir, "ep=4", *COMMON, f"--training.stop_after_steps={HALF}")
    return run_dir


def test_resume_from_dense_fsdp_under_expert_parallelism(tmp_path, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    # As if stopped at step HALF: its checkpoint is the newest, its metrics end there.
    shutil.rmtree(tmp_path / "checkpoints" / f"step-{STEPS}")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(f"{row}\n" for row in metrics.read_text().splitlines()[:HALF]))
    assert_resumes_on_the_curve(tmp_path, "dp_shard=2 x ep=2", reference)


def test_resume_from_ep4_under_replicated_ep2(tmp_path, reference, stopped_ep4):
    shutil.copytree(stopped_ep4, tmp_path, dirs_exist_ok=True)
    assert_resumes_on_the_curve(tmp_path, "dp_replicate=2 x dp_shard=2 x ep=2", reference)


def assert_resumes_on_the_curve(run_dir: Path, layout: str, reference: Path) -> None:
    second = run_layout(run_dir, layout, *COMMON)
    assert f"resumed from {run_dir}/checkpoints/step-{HALF}" in second.stdout
    losses, expected = losses_by_step(run_dir), losses_by_step(reference)
    for step in range(HALF + 1, STEPS + 1):
        assert losses[step] == pytest.approx(expected[step], rel=RTOL), step


def test_init_from_loads_into_another_ep(tmp_path, stopped_ep4):
    """With lr 0 the weights of step 1 under ep=2 are those saved under ep=4, bit for bit."""
    source = stopped_ep4 / "checkpoints" / f"step-{HALF}"
    result = run_layout(
        tmp_path / "run", "dp_shard=2 x ep=2", "--training.steps=1", "--optim.lr=0",
        "--model.router_bias_update_rate=0", f"--checkpoint.init_from={source}",
    )  # fmt: skip
    assert f"initial weights from {source}" in result.stdout
    loaded = full_state(tmp_path / "run" / "checkpoints" / "step-1", tmp_path)["model"]
    expected = full_state(source, tmp_path)["model"]
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
