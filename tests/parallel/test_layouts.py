"""Every parallel layout on 4 gloo ranks equals one process: losses and full gradients.

Each layout trains the tiny model for 3 steps through the CLI (tests.record_gradients: the
training CLI plus each step's gradients gathered whole) on the same global batches as a single
process; the per-step losses and every parameter's full gradient, at every step, must equal the
single-process ones within a relative 1e-5 (the FSDP tolerance: float32 reductions in another
order). Clipping is off so the raw gradients are compared; the weights of steps 2 and 3 depend
on the earlier updates, so the whole training path is covered, optimizer included. One layout
also recomputes every block (activation checkpointing): its recompute repeats the context-parallel
gather and the expert all-to-all inside backward.

The tiny model's routing is uneven (max/mean expert load of 2.5-3.5 on these steps, checked
below), so the expert-parallel layouts exchange uneven all-to-all splits; experts that get no
token at all are covered at module level in test_expert.py.
"""

from __future__ import annotations

import pytest
import torch
from trainer_runs import read_metrics, run_trainer

STEPS = 3
RTOL = 1e-5
COMMON = (
    f"--training.steps={STEPS}",
    "--checkpoint.interval=0",
    "--training.max_grad_norm=0",
    "--data.num_workers=0",
)
LAYOUTS = {
    "dp_shard=4": (),
    "dp_shard=2 x ep=2": ("--parallel.ep=2",),
    "ep=4": ("--parallel.ep=4",),
    "cp=2 x dp_shard=2": ("--parallel.cp=2",),
    "cp=2 x ep=2, full activation checkpointing": (
        "--parallel.cp=2",
        "--parallel.ep=2",
        "--parallel.activation_checkpointing=full",
    ),
    "dp_replicate=2 x dp_shard=2": ("--parallel.dp_replicate=2",),
}


def run(run_dir, *overrides: str, nproc: int = 1) -> tuple[dict, dict]:
    run_trainer(run_dir, *COMMON, *overrides, nproc=nproc, program="tests.record_gradients")
    metrics = {row["step"]: row for row in read_metrics(run_dir)}
    grads = {
        step: torch.load(run_dir / "gradients" / f"step-{step}.pt") for step in range(1, STEPS + 1)
    }
    return metrics, grads


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("one_process"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_matches_one_process(tmp_path, one_process, layout):
    ref_metrics, ref_grads = one_process
    metrics, grads = run(tmp_path, *LAYOUTS[layout], nproc=4)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    for step, ref in ref_metrics.items():
        assert metrics[step]["loss"] == pytest.approx(ref["loss"], rel=RTOL), step
        assert ref["moe/layer1/max_over_mean_load"] > 2.0  # uneven expert loads
        assert set(grads[step]) == set(ref_grads[step])
        for name, expected in ref_grads[step].items():
            err = (grads[step][name] - expected).norm().item()
            scale = expected.norm().item()
            assert err <= RTOL * scale, f"step {step} {name}: |diff| {err:.3g}, |ref| {scale:.3g}"
