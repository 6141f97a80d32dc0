"""Throughput of our MoE layer vs a dense SwiGLU FFN with equal active parameters.

Both layers run forward + backward on the same tokens. The MoE layer is `trainer.model.moe.MoE`
as the model builds it: sigmoid top-k router, dropless routing (argsort by expert, one gather,
grouped GEMMs over the sorted copies, `index_add` back) and the always-on shared expert. The
dense layer is `trainer.model.moe.FeedForward` with hidden width (top_k + 1) * F, so that its
parameters equal what one token activates in the MoE layer: top_k routed experts of width F plus
the shared expert of width F (the router's D x E weights, under 1 % here, are the difference).
Goal (issue 5): MoE tokens/s >= 0.7x dense tokens/s.

Layers run in the compute dtype (default bfloat16, as FSDP's mixed precision hands them
bf16 parameters). Timing: warm-up, then MoE/dense steps interleaved (A/B/A/B), each timed with
time.perf_counter; the ratio is of the medians. Then the MoE step is split into its parts, each
timed forward + backward alone with the layer's own modules on the same tokens and routing:
router (gate linear, top-k, sigmoid of the chosen logits), permutation (`MoE.route` with the
experts replaced by the identity: argsort, bincount, gather and score multiply, index_add, and
their backward), grouped GEMM (`GroupedExperts` on the sorted copies), shared expert, and the
remainder. The routed FLOPs are also timed as one plain GEMM (`FeedForward(D, F)` on the R
sorted copies) to show what grouping costs. Gradients are dropped before every step, as the
trainer's `zero_grad(set_to_none=True)` does.

Every shape runs once per `--threads` value (default 1 and all cores): on a CPU shared with other
jobs the multi-threaded MoE step, made of many small GEMMs each ending in a thread barrier, slows
down far more than the dense one, and the single-threaded ratio is the steadier number.

    python benchmarks/moe_vs_dense.py                          # all shapes, bf16, 1 and 2 threads
    python benchmarks/moe_vs_dense.py --shape scout_like --dtype float32 --steps 20 --threads 2
    python benchmarks/moe_vs_dense.py --shape fine_grained --profile 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import all_cores, load_average, report_header  # noqa: E402
from trainer.model.config import ModelConfig  # noqa: E402
from trainer.model.moe import FeedForward, MoE  # noqa: E402

GOAL_RATIO = 0.7
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    dim: int
    n_experts: int
    top_k: int
    expert_ffn_dim: int
    tokens: int
    note: str

    @property
    def dense_ffn_dim(self) -> int:
        """Hidden width of the dense FFN with the MoE layer's active parameters."""
        return (self.top_k + 1) * self.expert_ffn_dim


SHAPES = {
    # Scout's layer scaled down 10x in width: 16 experts, top-1, shared expert of the same width,
    # expert hidden 2 x dim (Scout: 8192 / 5120 = 1.6); dense hidden 2F.
    "scout_like": Shape(512, 16, 1, 1024, 4096, "Scout-like: 16 experts top-1 + shared"),
    # Top-2 over 8 experts (Mixtral-like routing, plus the shared expert); dense hidden 3F.
    "top2": Shape(512, 8, 2, 1024, 4096, "8 experts top-2 + shared"),
    # Fine-grained: many narrow experts (Maverick has 128 of them), 64 rows per expert here.
    "fine_grained": Shape(512, 64, 1, 512, 4096, "64 narrow experts top-1 + shared"),
}


def model_config(shape: Shape) -> ModelConfig:
    return ModelConfig(
        dim=shape.dim,
        n_experts=shape.n_experts,
        top_k=shape.top_k,
        expert_ffn_dim=shape.expert_ffn_dim,
        dense_ffn_dim=shape.dense_ffn_dim,
        router_aux_loss_coef=0.0,
        router_z_loss_coef=0.0,
    )


class _IdentityExperts(nn.Module):
    """Stands in for `GroupedExperts` to time the permutation around it."""

    def forward(self, x_RD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        return x_RD


def timed(fn: Callable[[], None], warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def summary(times_s: list[float], tokens: int) -> dict:
    ms = [t * 1e3 for t in times_s]
    median = statistics.median(ms)
    return {
        "median_ms": median,
        "min_ms": min(ms),
        "max_ms": max(ms),
        "tokens_per_s": tokens / (median / 1e3),
        "steps_ms": [round(t, 3) for t in ms],
    }


def active_parameters(shape: Shape) -> dict[str, int]:
    d, f, e, k = shape.dim, shape.expert_ffn_dim, shape.n_experts, shape.top_k
    moe_active = d * e + k * 3 * d * f + 3 * d * f  # router + k experts + shared expert
    return {
        "moe_active": moe_active,
        "moe_active_without_router": moe_active - d * e,
        "moe_total": d * e + e * 3 * d * f + 3 * d * f,
        "dense": 3 * d * shape.dense_ffn_dim,
    }


def fresh(*tensors: torch.Tensor | nn.Module) -> None:
    """Drop gradients, as the trainer's `zero_grad(set_to_none=True)` does every step."""
    for item in tensors:
        for t in item.parameters() if isinstance(item, nn.Module) else (item,):
            t.grad = None


def breakdown(
    moe: MoE, moe_step: Callable[[], None], x_TD: torch.Tensor, args: argparse.Namespace
) -> dict:
    """Forward + backward of each part of the MoE layer alone, on the benchmark's tokens.

    The whole MoE step runs in the same interleaved loop, so that the remainder (MoE step minus
    the parts) compares times taken under the same load.
    """
    dtype, (n_tokens, dim) = x_TD.dtype, x_TD.shape
    generator = torch.Generator().manual_seed(args.seed + 1)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator).to(dtype)

    with torch.no_grad():
        scores_TK, experts_TK, _ = moe.router(x_TD)
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=moe.n_experts)
    n_routed = experts_TK.numel()
    grad_TD, grad_TK, grad_RD = rand(n_tokens, dim), rand(*scores_TK.shape), rand(n_routed, dim)
    x_RD = rand(n_routed, dim).requires_grad_()
    scores_leaf = scores_TK.detach().requires_grad_()
    one_gemm = FeedForward(dim, moe.experts.w1_EDF.shape[-1]).to(dtype)
    one_gemm.init_weights(0.02, 0.02)

    def router() -> None:
        fresh(moe, x_TD)
        moe.router(x_TD)[0].backward(grad_TK)

    def permutation() -> None:
        fresh(x_TD, scores_leaf)
        experts, moe.experts = moe.experts, _IdentityExperts()
        try:
            moe.route(x_TD, scores_leaf, experts_TK).backward(grad_TD)
        finally:
            moe.experts = experts

    def grouped_gemm() -> None:
        fresh(moe, x_RD)
        moe.experts(x_RD, counts_E).backward(grad_RD)

    def shared_expert() -> None:
        fresh(moe, x_TD)
        moe.shared_expert(x_TD).backward(grad_TD)

    def routed_as_one_gemm() -> None:
        fresh(one_gemm, x_RD)
        one_gemm(x_RD).backward(grad_RD)

    parts = {
        "moe_step": moe_step,
        "router": router,
        "permutation": permutation,
        "grouped_gemm": grouped_gemm,
        "shared_expert": shared_expert,
        "routed_as_one_gemm": routed_as_one_gemm,
    }
    steps = args.steps
    out = {}
    for _ in range(args.warmup):
        for fn in parts.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(steps):
        for name, fn in parts.items():  # interleaved, as the main comparison
            times[name].extend(timed(fn, 0, 1))
    for name in parts:
        out[name] = statistics.median(times[name]) * 1e3
    load = counts_E.float()
    return {
        "part_median_ms": out,
        "steps": steps,
        "tokens_per_expert": counts_E.tolist(),
        "load_max_over_mean": float(load.max() / load.mean()),
    }


def profile_table(fn: Callable[[], None], label: str, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"--- {label}: top {rows} ops by self CPU time (one forward + backward)\n{table}"


def run_shape(name: str, args: argparse.Namespace, threads: int) -> dict:
    shape = SHAPES[name]
    if args.tokens:
        shape = replace(shape, tokens=args.tokens)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    moe = MoE(model_config(shape))
    moe.init_weights(0.02, 0.02)
    dense = FeedForward(shape.dim, shape.dense_ffn_dim)
    dense.init_weights(0.02, 0.02)
    moe.to(dtype).train()
    dense.to(dtype).train()
    generator = torch.Generator().manual_seed(args.seed)
    x_TD = torch.randn(shape.tokens, shape.dim, generator=generator).to(dtype).requires_grad_()
    grad_TD = torch.randn(shape.tokens, shape.dim, generator=generator).to(dtype)
    x_1TD, grad_1TD = x_TD.view(1, *x_TD.shape), grad_TD.view(1, *grad_TD.shape)

    def moe_step() -> None:
        fresh(moe, x_TD)
        out, _ = moe(x_1TD)  # the router loss is 0 here: no aux / z loss, as in the configs
        out.backward(grad_1TD)

    def dense_step() -> None:
        fresh(dense, x_TD)
        dense(x_TD).backward(grad_TD)

    steps = {"moe": moe_step, "dense": dense_step}
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(args.steps):
        for label, fn in steps.items():  # A/B/A/B
            times[label].extend(timed(fn, 0, 1))
    result = {
        "shape": name,
        "note": shape.note,
        "dim": shape.dim,
        "n_experts": shape.n_experts,
        "top_k": shape.top_k,
        "expert_ffn_dim": shape.expert_ffn_dim,
        "shared_expert_ffn_dim": shape.expert_ffn_dim,
        "dense_ffn_dim": shape.dense_ffn_dim,
        "tokens": shape.tokens,
        "dtype": args.dtype,
        "threads": threads,
        "parameters": active_parameters(shape),
        "moe": summary(times["moe"], shape.tokens),
        "dense": summary(times["dense"], shape.tokens),
    }
    ratio = result["dense"]["median_ms"] / result["moe"]["median_ms"]
    result["ratio_moe_over_dense_tokens_per_s"] = ratio
    result["goal_ratio"] = GOAL_RATIO
    result["goal_met"] = ratio >= GOAL_RATIO
    print(
        f"[{name}, {threads} thr] D={shape.dim} E={shape.n_experts} top-{shape.top_k} "
        f"F={shape.expert_ffn_dim} dense={shape.dense_ffn_dim} T={shape.tokens} {args.dtype}: "
        f"moe {result['moe']['median_ms']:.1f} ms ({result['moe']['tokens_per_s']:,.0f} tok/s)  "
        f"dense {result['dense']['median_ms']:.1f} ms "
        f"({result['dense']['tokens_per_s']:,.0f} tok/s)  ratio {ratio:.3f}  "
        f"goal >= {GOAL_RATIO}: {'met' if result['goal_met'] else 'NOT met'}",
        flush=True,
    )

    parts = breakdown(moe, moe_step, x_TD, args)
    part_ms = parts["part_median_ms"]
    measured = ("router", "permutation", "grouped_gemm", "shared_expert")
    moe_ms = part_ms["moe_step"]
    part_ms["rest"] = moe_ms - sum(part_ms[p] for p in measured)
    parts["grouped_over_one_gemm"] = part_ms["grouped_gemm"] / part_ms["routed_as_one_gemm"]
    parts["share_of_moe_step"] = {p: part_ms[p] / moe_ms for p in (*measured, "rest")}
    result["breakdown"] = parts
    print(
        f"[{name}, {threads} thr] MoE forward + backward, each part alone (median ms, share of "
        f"the MoE step timed in the same loop: {moe_ms:.1f} ms):"
    )
    for part in (*measured, "rest"):
        print(f"    {part:<14} {part_ms[part]:8.1f}  {part_ms[part] / moe_ms:6.1%}")
    print(
        f"    routed FLOPs as one plain GEMM {part_ms['routed_as_one_gemm']:.1f} ms: grouped / "
        f"plain {parts['grouped_over_one_gemm']:.2f}x; expert load max/mean "
        f"{parts['load_max_over_mean']:.2f}",
        flush=True,
    )
    if args.profile:
        print(profile_table(moe_step, f"{name} moe, {threads} threads", args.profile), flush=True)
        print(
            profile_table(dense_step, f"{name} dense, {threads} threads", args.profile), flush=True
        )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per layer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per layer first")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument(
        "--tokens", type=int, default=0, help="tokens per step for every shape; 0: 4096"
    )
    parser.add_argument(
        "--threads",
        default="1,0",
        help="comma-separated torch thread counts, each a full pass; 0: all cores",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the top N ops of each layer"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "moe_vs_dense.json",
    )
    args = parser.parse_args(argv)
    try:
        args.threads = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads: comma-separated integers, got {args.threads!r}")
    if args.steps < 1 or args.warmup < 0 or min(args.threads) < 0 or args.tokens < 0:
        parser.error("--steps must be >= 1, --warmup and --threads >= 0")
    args.threads = list(dict.fromkeys(t or all_cores() for t in args.threads))
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = list(SHAPES) if args.shape == "all" else [args.shape]
    print(
        f"torch {torch.__version__}, threads {args.threads}, {args.dtype}, "
        f"{args.steps} timed + {args.warmup} warm-up steps per layer",
        flush=True,
    )
    load_before = load_average()
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        results.extend(run_shape(name, args, threads) for name in names)
    report = {
        **report_header(
            "MoE layer vs dense FFN of equal active parameters, forward + backward", load_before
        ),
        "threads": args.threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "timing": "median/min of per-step time.perf_counter, steps interleaved moe/dense",
        "ratio": "dense median ms / moe median ms = moe tokens/s / dense tokens/s",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
