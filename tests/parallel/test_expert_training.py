"""Expert-parallel training through the CLI on 4 gloo ranks: equal to one process, exact resume.

Layout: dp_shard=4 x ep=2 (experts FSDP-sharded over 2 ranks, 2 ep groups; ep=4 and the full
gradients of every layout are in test_layouts.py). It reads 4 distinct data slices and must
reproduce one process on the same global batch: losses AND gradient norms. Measured on CPU:
relative differences of losses below 1e-7 and of gradient norms below 1e-6 (float32 reduction
order), so the FSDP tolerance of 1e-5 applies. The norm is the sensitive check: with the expert
gradients left ep times too large, the losses of these 4 steps still agreed to 3e-6 (Adam is
nearly scale invariant), but the norms were off by 1.3e-4. Resume is bitwise under the same
parallel.ep and continues the one-process curve under another (checked with one process, ep = 1:
the cheapest other layout; more layouts in tests/trainer/test_resharding.py).
"""

from __future__ import annotations

import shutil

import pytest
from trainer_runs import losses_by_step, read_metrics, run_trainer

STEPS = 4
HALF = STEPS // 2
RTOL = 1e-5
COMMON = (f"--training.steps={STEPS}", f"--checkpoint.interval={HALF}")


def metrics_by_step(run_dir) -> dict[int, dict]:
    return {row["step"]: row for row in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_process")
    run_trainer(run_dir, *COMMON)
    return metrics_by_step(run_dir)


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ep2")
    run_trainer(run_dir, *COMMON, "--parallel.ep=2", nproc=4)
    return metrics_by_step(run_dir)


def test_expert_parallel_matches_one_process(reference, ep2):
    assert sorted(ep2) == sorted(reference)
    for step, ref in reference.items():
        for key in ("loss", "grad_norm", "router_loss", "moe/layer1/max_over_mean_load"):
            assert ep2[step][key] == pytest.approx(ref[key], rel=RTOL), (step, key)


def test_exact_resume_and_resume_under_another_ep(tmp_path, reference, ep2):
    stopped, other = tmp_path / "stopped", tmp_path / "other_ep"
    run_trainer(stopped, *COMMON, f"--training.stop_after_steps={HALF}", "--parallel.ep=2", nproc=4)
    shutil.copytree(stopped, other)
    second = run_trainer(stopped, *COMMON, "--parallel.ep=2", nproc=4)
    assert f"resumed from {stopped}/checkpoints/step-{HALF}" in second.stdout
    assert losses_by_step(stopped) == {step: row["loss"] for step, row in ep2.items()}  # bitwise

    one_process = run_trainer(other, *COMMON)
    assert f"resumed from {other}/checkpoints/step-{HALF}" in one_process.stdout
    losses = losses_by_step(other)
    for step in range(HALF + 1, STEPS + 1):
        assert losses[step] == pytest.approx(reference[step]["loss"], rel=RTOL), step
