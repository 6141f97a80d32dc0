"""FP8 (torch backend) vs bf16: step time of a linear layer and of the routed experts.

A "step" is forward + backward (input and weight gradients) of one layer on one batch. Variants
run interleaved in one process (A/B/C/... after warm-up), each timed with time.perf_counter; the
ratios are of the medians, and of the minima (the least disturbed run, on a machine shared with
other jobs). The second part splits the FP8 linear step into its pieces, measured the same way:
the quantisations (amax, scale, cast; with and without the saturation counts), the three FP8
GEMMs alone on pre-quantised operands, and the three bf16 GEMMs they replace.

On CPU `torch._scaled_mm` computes correct FP8 numerics but has no FP8 hardware behind it (it
converts both operands to float32 and runs a float32 GEMM): the point there is the overhead, not
a speed-up. On CUDA (sm89+) the same script measures the real thing with Scout-shaped layers
(`--device cuda`).

    python benchmarks/fp8_step.py                       # CPU shapes, all cores
    python benchmarks/fp8_step.py --device cuda --steps 50
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.model.moe import GroupedExperts  # noqa: E402
from trainer.precision.experts import Fp8GroupedExperts  # noqa: E402
from trainer.precision.fp8 import E4M3, E5M2, Recipe, fp8_mm, quantise_tensorwise  # noqa: E402
from trainer.precision.linear import Fp8Linear  # noqa: E402

# device -> case -> shapes. CPU: sized for seconds per variant on 2 cores. CUDA: Scout's layers
# (dim 5120, expert FFN 8192, 16 experts, top-1) on 8192 tokens.
SHAPES = {
    "cpu": {
        "linear": {"tokens": 2048, "in": 1024, "out": 1024},
        "experts": {"tokens": 2048, "experts": 16, "dim": 256, "hidden": 512},
    },
    "cuda": {
        "linear": {"tokens": 8192, "in": 5120, "out": 5120},
        "experts": {"tokens": 8192, "experts": 16, "dim": 5120, "hidden": 8192},
    },
}
RECIPES = ("delayed", "current", "blockwise")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], steps: int, warmup: int, device) -> dict:
    """Median and min seconds of each function, run round-robin after `warmup` rounds."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + steps):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {
        name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t)}
        for name, t in times.items()
    }


def layer_step(module: nn.Module, inputs: tuple, grad: torch.Tensor) -> Callable[[], None]:
    params = list(module.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        x = inputs[0].detach().requires_grad_()
        module(x, *inputs[1:]).backward(grad)

    return step


def linear_variants(shape: dict, device: torch.device) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    linear = nn.Linear(shape["in"], shape["out"], bias=False, device=device, dtype=torch.bfloat16)
    x = torch.randn(shape["tokens"], shape["in"], device=device, dtype=torch.bfloat16)
    grad = torch.randn(shape["tokens"], shape["out"], device=device, dtype=torch.bfloat16)
    variants = {"bf16": layer_step(linear, (x,), grad)}
    for recipe in RECIPES:
        fp8 = Fp8Linear.from_linear(linear, Recipe(scaling=recipe))
        variants[f"fp8_{recipe}"] = layer_step(fp8, (x,), grad)
    return variants


def experts_variants(shape: dict, device: torch.device) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    n, dim, hidden = shape["experts"], shape["dim"], shape["hidden"]
    experts = GroupedExperts(n, dim, hidden).to(device=device, dtype=torch.bfloat16)
    experts.init_weights(std=0.02, out_std=0.02)
    choice = torch.randint(0, n, (shape["tokens"],), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(choice, minlength=n).to(device)
    x = torch.randn(shape["tokens"], dim, device=device, dtype=torch.bfloat16)
    grad = torch.randn(shape["tokens"], dim, device=device, dtype=torch.bfloat16)
    variants = {"bf16": layer_step(experts, (x, counts), grad)}
    for recipe in RECIPES:
        fp8 = Fp8GroupedExperts.from_experts(experts, Recipe(scaling=recipe))
        variants[f"fp8_{recipe}"] = layer_step(fp8, (x, counts), grad)
    return variants


def linear_breakdown(shape: dict, device: torch.device, steps: int, warmup: int) -> dict:
    """The pieces of one per-tensor FP8 linear step against the bf16 GEMMs they replace."""
    torch.manual_seed(0)
    m, k, n = shape["tokens"], shape["in"], shape["out"]
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    g = torch.randn(m, n, device=device, dtype=torch.bfloat16) * 1e-4
    scale = torch.tensor(1.0, device=device)

    def quantise(count: bool) -> Callable[[], object]:
        def run():
            for t, dtype in ((x, E4M3), (w, E4M3), (g, E5M2)):
                amax = t.abs().amax().float()
                quantise_tensorwise(t, 448.0 / amax, dtype, count, amax)

        return run

    xq, _ = quantise_tensorwise(x, scale, E4M3, False, scale)
    wq, _ = quantise_tensorwise(w, scale * 1e3, E4M3, False, scale)
    gq, _ = quantise_tensorwise(g, scale * 1e6, E5M2, False, scale)

    def fp8_gemms():
        fp8_mm(xq, wq, torch.bfloat16)  # forward
        fp8_mm(gq, wq.t_tensorwise(), torch.bfloat16)  # dgrad
        fp8_mm(gq.t_tensorwise(), xq.t_tensorwise(), torch.bfloat16)  # wgrad

    def bf16_gemms():
        x @ w.t(), g @ w, g.t() @ x

    pieces = interleaved(
        {
            "quantise_3_tensors": quantise(True),
            "quantise_3_tensors_no_counts": quantise(False),
            "fp8_gemms_3": fp8_gemms,
            "bf16_gemms_3": bf16_gemms,
        },
        steps,
        warmup,
        device,
    )
    flops = 3 * 2 * m * k * n
    summary: dict = {"pieces": pieces}
    for stat in ("median_ms", "min_ms"):  # min: the least disturbed run on a shared machine
        t = {name: p[stat] for name, p in pieces.items()}
        suffix = "" if stat == "median_ms" else "_min"
        summary |= {
            f"gflops_fp8_gemms{suffix}": flops / t["fp8_gemms_3"] / 1e6,
            f"gflops_bf16_gemms{suffix}": flops / t["bf16_gemms_3"] / 1e6,
            f"quantise_over_fp8_gemms{suffix}": t["quantise_3_tensors"] / t["fp8_gemms_3"],
            f"quantise_over_bf16_gemms{suffix}": t["quantise_3_tensors"] / t["bf16_gemms_3"],
            f"quantise_no_counts_over_fp8_gemms{suffix}": t["quantise_3_tensors_no_counts"]
            / t["fp8_gemms_3"],
            f"quantise_no_counts_over_bf16_gemms{suffix}": t["quantise_3_tensors_no_counts"]
            / t["bf16_gemms_3"],
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", default="benchmarks/results/fp8_step.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shapes = SHAPES[args.device]
    load_before = os.getloadavg()
    results = {}
    for case, build in (("linear", linear_variants), ("experts", experts_variants)):
        timing = interleaved(build(shapes[case], device), args.steps, args.warmup, device)
        bf16 = timing["bf16"]["median_ms"]
        bf16_min = timing["bf16"]["min_ms"]
        results[case] = {
            "shape": shapes[case],
            "timing": timing,
            "fp8_over_bf16": {
                name: t["median_ms"] / bf16 for name, t in timing.items() if name != "bf16"
            },
            "fp8_over_bf16_min": {
                name: t["min_ms"] / bf16_min for name, t in timing.items() if name != "bf16"
            },
        }
        print(f"{case} {shapes[case]}")
        for name, t in timing.items():
            ratios = f"x{t['median_ms'] / bf16:.2f} (min x{t['min_ms'] / bf16_min:.2f})"
            print(f"  {name:14s} median {t['median_ms']:9.2f} ms  min {t['min_ms']:9.2f} ms  "
                  f"{ratios} of bf16")  # fmt: skip
    breakdown = linear_breakdown(shapes["linear"], device, args.steps, args.warmup)
    results["linear_breakdown"] = breakdown
    print("linear step pieces (per-tensor scaling):")
    for name, p in breakdown["pieces"].items():
        print(f"  {name:30s} median {p['median_ms']:9.2f} ms  min {p['min_ms']:9.2f} ms")
    for key, value in breakdown.items():
        if key != "pieces":
            print(f"  {key:36s} {value:.3f}")
    record = {
        "benchmark": "FP8 (torch backend) vs bf16 layer step (forward + backward)",
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__},
        "machine": {
            "device": args.device,
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "platform": platform.platform(),
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": os.getloadavg(),
        },
        "steps": args.steps,
        "warmup": args.warmup,
        "timing": "median/min of per-step time.perf_counter, variants interleaved",
        "results": results,
    }
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
