"""FP8 training through the CLI: layouts agree, and the curve follows the bf16 one.

1. The tiny model (vision tower on, kept in higher precision) trained with the torch backend's
   delayed scaling on 4 gloo ranks, dp_shard=2 x ep=2 with FSDP2, equals the single-process FP8
   run: every rank quantises with the same scales (amaxes reduced MAX over all ranks) and the
   loss scaling between layouts is a power of two, which FP8 scaling absorbs exactly, so what
   is left is float32 reduction order (relative 1e-5, as for bf16/float32 layouts).
2. FP8 (delayed scaling, E4M3 forward / E5M2 gradients) against bf16 over 200 steps of the
   shipped corpus's text (8 x 64 tokens a step, text only to keep the test short): FP8 rounds
   each GEMM operand to 3 mantissa bits (a relative error of about 2^-5 per GEMM, ~0.04
   measured in tests/precision), which acts like small noise on the updates. Tolerance: every
   20-step window mean within 0.1 nats of bf16's, the final window within 0.05 (the window
   means themselves move by a nat with the data's languages; measured largest gap 0.042,
   final 0.015).
"""

from __future__ import annotations

import pytest
from trainer_runs import losses_by_step, read_metrics, run_trainer

FP8 = ("--precision.fp8.backend=torch", "--precision.fp8.recipe=delayed")
LAYOUT_STEPS = ("--training.steps=3", "--checkpoint.interval=0", "--data.num_workers=0")


def test_fp8_under_fsdp_and_expert_parallelism_equals_one_process(tmp_path):
    run_trainer(tmp_path / "one", *LAYOUT_STEPS, *FP8)
    run_trainer(tmp_path / "four", *LAYOUT_STEPS, *FP8, "--parallel.ep=2", nproc=4)
    one = {row["step"]: row for row in read_metrics(tmp_path / "one")}
    four = {row["step"]: row for row in read_metrics(tmp_path / "four")}
    for step, ref in one.items():
        for key in ("loss", "grad_norm"):
            assert four[step][key] == pytest.approx(ref[key], rel=1e-5), (step, key)
    scale = "fp8/layers.1.feed_forward.experts/w1.weight_scale"
    assert one[3][scale] == four[3][scale] > 0  # the same scales everywhere


def test_fp8_curve_follows_bf16(tmp_path):
    common = (
        "--training.steps=200",
        "--training.seq_len=64",
        "--training.global_batch_size=8",
        "--training.dtype=bfloat16",
        "--optim.lr=1e-3",
        "--model.vision.enabled=false",
        '--data.sources=["data/sample/sample-*.jsonl.zst"]',
        "--checkpoint.interval=0",
        "--data.num_workers=0",
        "--metrics.log_interval=1",
    )
    run_trainer(tmp_path / "bf16", *common)
    run_trainer(tmp_path / "fp8", *common, *FP8)
    bf16, fp8 = losses_by_step(tmp_path / "bf16"), losses_by_step(tmp_path / "fp8")

    def window_means(losses: dict[int, float]) -> list[float]:
        values = [losses[step] for step in sorted(losses)]
        return [sum(values[i : i + 20]) / 20 for i in range(0, len(values), 20)]

    gaps = [abs(a - b) for a, b in zip(window_means(fp8), window_means(bf16), strict=True)]
    assert min(window_means(bf16)[1:]) < window_means(bf16)[0] - 1.0  # it learned
    assert max(gaps) < 0.1, gaps
    assert gaps[-1] < 0.05, gaps
