"""Expert-parallel all-to-all bytes per training step vs the balanced minimum, at ep = 2 and 4.

Each `--ep` value spawns that many gloo ranks (tests/distributed.py's `run_distributed`, one
process each). Every rank builds the same Scout-shaped model (every layer MoE, 16 experts top-1,
the `scout_small` config of step_vs_hf.py), shards its experts with
`parallel.expert.apply_expert_parallel` over all ranks (ep = world size; no FSDP: it moves
parameters, never tokens), and runs forward + backward (next-token cross-entropy) on its own
random tokens. Two routings, in the same processes:

  natural:  the randomly initialised router, routing as it falls;
  balanced: each MoE router forced to round-robin (token t -> expert (t*K + k) mod E; scores
            still sigmoid of the chosen gate logits), so every rank sends T*K/ep copies to each
            rank: the balanced case the minimum assumes.

Bytes are measured twice per step and rank:
  1. `AllToAllStats` (what the library counts from its split sizes; forward exchanges only);
  2. a TorchDispatchMode that sees every collective the rank issues, forward AND backward:
     `_c10d_functional.all_to_all_single` (token copies; off-rank bytes = input rows not kept
     for this rank x row bytes) and `c10d.alltoall_base_` (the per-expert count exchange).

Minimum per rank and step (forward): MoE layers x T x K x D x bytes x 2 x (ep - 1) / ep
(dispatch + combine, T tokens of this rank, K copies each). Goal (issue 5): measured / minimum
<= 1.05. Backward sends the same bytes again (gradients of the same rows), so the ratio is the
same with backward included; both are reported.

    python benchmarks/all_to_all_bytes.py                    # ep 2 and 4, bfloat16
    python benchmarks/all_to_all_bytes.py --ep 4 --dtype float32 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.report import load_average, report_header  # noqa: E402
from parallel.expert import apply_expert_parallel  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from trainer.model.config import ModelConfig  # noqa: E402
from trainer.model.moe import MoE, Router  # noqa: E402
from trainer.model.transformer import Transformer  # noqa: E402

GOAL_RATIO = 1.05
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
ROUTINGS = ("natural", "balanced")

# step_vs_hf.py's `scout_small`: Scout's layer pattern (every layer MoE, 16 experts, top-1,
# shared expert) at dim 256.
MODEL = ModelConfig(
    vocab_size=320,
    dim=256,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    dense_ffn_dim=1024,
    expert_ffn_dim=512,
    n_experts=16,
    top_k=1,
    interleave_moe_layer_step=1,
    nope_layer_interval=4,
    attention_chunk_size=256,
    use_qk_norm=True,
    attn_temperature_tuning=True,
    floor_scale=128.0,
    attn_scale=0.1,
)


class CollectiveBytes(TorchDispatchMode):
    """Off-rank bytes of every all-to-all this rank issues, by phase ("forward"/"backward")."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank
        self.phase = "forward"
        self.bytes: dict[str, dict[str, int]] = {}
        self.calls: dict[str, dict[str, int]] = {}

    def _add(self, kind: str, n_bytes: int) -> None:
        for table, value in ((self.bytes, n_bytes), (self.calls, 1)):
            row = table.setdefault(self.phase, {})
            row[kind] = row.get(kind, 0) + value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("_c10d_functional.all_to_all_single"):
            # (input, output_split_sizes, input_split_sizes, group_name)
            x, _, input_splits = args[0], args[1], args[2]
            row_bytes = x[0].numel() * x.element_size() if x.shape[0] else 0
            self._add("tokens", (sum(input_splits) - input_splits[self.rank]) * row_bytes)
        elif name.startswith("c10d.alltoall_base_"):
            # (output, input, process_group, output_split_sizes, input_split_sizes): even splits
            x = args[1]
            world = dist.get_world_size()
            self._add("counts", x.numel() * x.element_size() * (world - 1) // world)
        return func(*args, **(kwargs or {}))


def force_round_robin(router: Router, n_experts: int) -> None:
    """Route token t's k-th copy to expert (t*K + k) mod E: every expert gets T*K/E copies."""

    def forward(x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_TE = router.gate(x_TD)
        n_tokens, k = x_TD.shape[0], router.top_k
        experts_TK = torch.arange(n_tokens * k, device=x_TD.device).view(n_tokens, k) % n_experts
        scores_TK = torch.sigmoid(logits_TE.float().gather(1, experts_TK)).to(x_TD.dtype)
        return scores_TK, experts_TK, logits_TE

    router.forward = forward


def rank_main(rank: int, world: int, args: argparse.Namespace) -> dict:
    torch.set_num_threads(max(1, args.threads // world))
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)  # the same full model on every rank, then each keeps its slice
    model = Transformer(MODEL)
    model.init_weights()
    model.to(dtype).train()
    stats = apply_expert_parallel(model, dist.group.WORLD)
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    out: dict[str, list] = {}
    for routing in args.routings:
        if routing == "balanced":
            for moe in moe_layers:
                force_round_robin(moe.router, moe.n_experts)
        steps = []
        for step in range(args.steps):
            generator = torch.Generator().manual_seed(args.seed * 1000 + step * 100 + rank)
            tokens = torch.randint(0, MODEL.vocab_size, (args.batch, args.seq), generator=generator)
            for moe in moe_layers:
                moe.pop_expert_load()
            stats.pop()
            spy = CollectiveBytes(rank)
            start = time.perf_counter()
            with spy:
                logits = model(tokens, None, None).logits_BSV
                loss = F.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()
                )
                spy.phase = "backward"
                loss.backward()
            elapsed = time.perf_counter() - start
            model.zero_grad(set_to_none=True)
            steps.append(
                {
                    "stats": stats.pop(),
                    "wire_bytes": spy.bytes,
                    "wire_calls": spy.calls,
                    "tokens": args.batch * args.seq,
                    "expert_load": [moe.pop_expert_load().tolist() for moe in moe_layers],
                    "seconds": elapsed,
                }
            )
        out[routing] = steps
    return out


def minimum_bytes(ep: int, tokens: int, element_size: int) -> float:
    n_moe = sum(MODEL.is_moe_layer(i) for i in range(MODEL.n_layers))
    return n_moe * tokens * MODEL.top_k * MODEL.dim * element_size * 2 * (ep - 1) / ep


def summarize(ep: int, routing: str, per_rank: list[list[dict]], element_size: int) -> dict:
    """per_rank[r][s]: rank r's record of step s."""
    steps = []
    for s in range(len(per_rank[0])):
        records = [per_rank[r][s] for r in range(ep)]
        minimum = minimum_bytes(ep, records[0]["tokens"], element_size)
        ranks = []
        for rec in records:
            st, wire = rec["stats"], rec["wire_bytes"]
            fwd, bwd = wire.get("forward", {}), wire.get("backward", {})
            if abs(st["balanced_bytes"] - minimum) > 0.5:
                raise SystemExit(
                    f"AllToAllStats.balanced_bytes {st['balanced_bytes']} != {minimum}"
                )
            if fwd.get("tokens", 0) != st["token_bytes"]:
                raise SystemExit(
                    f"forward wire bytes {fwd.get('tokens')} != stats {st['token_bytes']}"
                )
            ranks.append(
                {
                    "dispatch_bytes": st["dispatch_bytes"],
                    "combine_bytes": st["combine_bytes"],
                    "token_bytes": st["token_bytes"],
                    "count_bytes": st["count_bytes"],
                    "local_bytes": st["local_bytes"],
                    "exchanges": st["exchanges"],
                    "wire_forward": fwd,
                    "wire_backward": bwd,
                    "wire_calls": rec["wire_calls"],
                    "ratio_tokens": st["token_bytes"] / minimum,
                    "ratio_with_counts": (st["token_bytes"] + st["count_bytes"]) / minimum,
                    "ratio_fwd_bwd_wire": (sum(fwd.values()) + sum(bwd.values())) / (2 * minimum),
                    "backward_equals_forward": bwd.get("tokens") == fwd.get("tokens"),
                }
            )
        loads = torch.tensor([rec["expert_load"] for rec in records]).sum(0)  # (layers, E)
        rank_load = loads.view(loads.shape[0], ep, -1).sum(-1)  # copies each rank's experts got
        total_tokens = sum(r["token_bytes"] for r in ranks)
        steps.append(
            {
                "minimum_bytes_per_rank": minimum,
                "ranks": ranks,
                "ratio_max_rank": max(r["ratio_tokens"] for r in ranks),
                "ratio_min_rank": min(r["ratio_tokens"] for r in ranks),
                "ratio_group_total": total_tokens / (ep * minimum),
                "ratio_group_total_with_counts": (
                    total_tokens + sum(r["count_bytes"] for r in ranks)
                )
                / (ep * minimum),
                "ratio_max_rank_fwd_bwd_wire": max(r["ratio_fwd_bwd_wire"] for r in ranks),
                "expert_load_max_over_mean_per_layer": (
                    loads.max(-1).values / loads.float().mean(-1)
                ).tolist(),
                "ep_rank_load_share_per_layer": (
                    rank_load / rank_load.sum(-1, keepdim=True)
                ).tolist(),
                "seconds_max_rank": max(rec["seconds"] for rec in records),
            }
        )
    worst = max(steps, key=lambda s: s["ratio_max_rank"])
    return {
        "ep": ep,
        "routing": routing,
        "steps": steps,
        "ratio_max_rank": worst["ratio_max_rank"],
        "ratio_group_total": max(s["ratio_group_total"] for s in steps),
        "ratio_group_total_with_counts": max(s["ratio_group_total_with_counts"] for s in steps),
        "goal_ratio": GOAL_RATIO,
        "goal_met_every_rank": worst["ratio_max_rank"] <= GOAL_RATIO,
        "goal_met_group_total": max(s["ratio_group_total_with_counts"] for s in steps)
        <= GOAL_RATIO,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ep", default="2,4", help="comma-separated ep degrees (= ranks)")
    parser.add_argument("--routings", default=",".join(ROUTINGS), help="natural,balanced")
    parser.add_argument("--steps", type=int, default=2, help="forward+backward steps per routing")
    parser.add_argument("--batch", type=int, default=2, help="rows per rank")
    parser.add_argument("--seq", type=int, default=512, help="tokens per row")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--threads", type=int, default=0, help="torch threads over all ranks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "all_to_all_bytes.json",
    )
    args = parser.parse_args(argv)
    args.ep = [int(e) for e in args.ep.split(",")]
    requested = args.routings.split(",")
    if any(r not in ROUTINGS for r in requested):
        parser.error(f"--routings: choose from {ROUTINGS}")
    # natural first: "balanced" patches the routers for the rest of the run
    args.routings = [r for r in ROUTINGS if r in requested]
    if any(e < 2 or MODEL.n_experts % e for e in args.ep):
        parser.error(f"each --ep must be >= 2 and divide {MODEL.n_experts}")
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        parser.error("--steps, --batch >= 1, --seq >= 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.threads = args.threads or cores
    element_size = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    load_before = load_average()
    print(
        f"torch {torch.__version__}, {args.dtype}, {args.batch}x{args.seq} tokens per rank, "
        f"{args.steps} steps per routing; model: dim {MODEL.dim}, {MODEL.n_layers} MoE layers, "
        f"{MODEL.n_experts} experts top-{MODEL.top_k}",
        flush=True,
    )
    results = []
    header = (
        f"{'ep':>3} {'routing':<9} {'step':>4} {'min MB/rank':>11} {'max rank':>9} "
        f"{'min rank':>9} {'group':>7} {'+counts':>8} {'fwd+bwd':>8} {'ep-rank load share'}"
    )
    for ep in args.ep:
        start = time.perf_counter()
        per_rank = run_distributed(rank_main, world_size=ep, args=(args,))
        wall = time.perf_counter() - start
        for routing in args.routings:
            result = summarize(ep, routing, [r[routing] for r in per_rank], element_size)
            result["wall_seconds_all_routings"] = wall
            results.append(result)
    print(header)
    for result in results:
        for s, step in enumerate(result["steps"]):
            share = step["ep_rank_load_share_per_layer"]
            share_text = " ".join("/".join(f"{v:.2f}" for v in layer) for layer in share[:2]) + (
                " ..." if len(share) > 2 else ""
            )
            print(
                f"{result['ep']:>3} {result['routing']:<9} {s:>4} "
                f"{step['minimum_bytes_per_rank'] / 1e6:>11.3f} {step['ratio_max_rank']:>9.4f} "
                f"{step['ratio_min_rank']:>9.4f} {step['ratio_group_total']:>7.4f} "
                f"{step['ratio_group_total_with_counts']:>8.5f} "
                f"{step['ratio_max_rank_fwd_bwd_wire']:>8.4f} {share_text}"
            )
    print(
        "ratios: measured dispatch+combine bytes / minimum; 'max rank'/'min rank' per rank, "
        "'group' summed over ranks, '+counts' with the count exchanges, 'fwd+bwd' the max rank "
        f"on the wire incl. backward. Goal <= {GOAL_RATIO}."
    )
    for result in results:
        print(
            f"ep={result['ep']} {result['routing']}: max rank {result['ratio_max_rank']:.4f} "
            f"(goal every rank: {'met' if result['goal_met_every_rank'] else 'NOT met'}), "
            f"group total with counts {result['ratio_group_total_with_counts']:.5f} "
            f"(goal: {'met' if result['goal_met_group_total'] else 'NOT met'})"
        )
    report = {
        **report_header(
            "expert-parallel all-to-all bytes per step vs the balanced minimum", load_before
        ),
        "model": {k: v for k, v in vars(MODEL).items() if k != "vision"},
        "dtype": args.dtype,
        "tokens_per_rank": args.batch * args.seq,
        "steps": args.steps,
        "minimum": "MoE layers x tokens x top_k x dim x bytes x 2 x (ep-1)/ep per rank, forward",
        "goal_ratio": GOAL_RATIO,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
