"""Learning-rate sweep across widths, standard vs MetaP: does the best lr stay put?

Tiny text models (configs/tiny_cpu.toml's architecture, narrowed: 2 layers, a dense then an MoE
layer with router, 4 routed experts and the shared expert, head_dim 32 with the heads scaling with
the width) train on windows of the shipped sample corpus (its text shards, byte tokenizer; see
`load_batches`) at widths 64, 128 and 256 for every lr of a 2x grid, under both
parametrisations. Every run sees the same batches in the same order and starts from the same
seed; the trainer's pieces do the work: `build_optimizer` (AdamW, the MetaP groups), `lr_at`
(warm-up then cosine), `set_lr`, gradient clipping at 1.0 and the aux-loss-free expert-bias
balancing. The score of a run is its cross-entropy on held-out
windows (from documents no run trains on) after the last step; a run whose loss is not finite
counts as diverged. Goal (issue 9): under MetaP the best lr moves by at most one grid step
across the widths.

    python benchmarks/metap_lr_sweep.py        # the recorded run (~10 min on 2 shared cores)
    python benchmarks/metap_lr_sweep.py --steps 50 --lrs 2e-3 8e-3 --widths 64 128

Writes `results/metap_lr_sweep.json` (every run, the best lr per width, the shift in grid steps)
and `results/metap_lr_sweep.png` (held-out loss against lr, one line per width, one panel per
parametrisation), drawn with pillow.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.shards import expand_sources, iter_documents  # noqa: E402
from data.tokenizer import build_tokenizer  # noqa: E402
from trainer.config import OptimConfig, load_config  # noqa: E402
from trainer.model.config import ModelConfig  # noqa: E402
from trainer.model.transformer import Transformer  # noqa: E402
from trainer.optim import build_optimizer, lr_at, set_lr  # noqa: E402
from trainer.parametrization import build_parametrization, init_weights  # noqa: E402

TEXT_SHARDS = "data/sample/sample-*.jsonl.zst"
PARAMETRIZATIONS = ("standard", "metap")


def model_config(width: int, n_layers: int) -> ModelConfig:
    base = load_config().model
    return ModelConfig(
        vocab_size=base.vocab_size, dim=width, n_layers=n_layers, n_heads=width // 32,
        n_kv_heads=max(1, width // 64), head_dim=32, dense_ffn_dim=2 * width,
        expert_ffn_dim=2 * width, n_experts=4, top_k=1, interleave_moe_layer_step=2,
        nope_layer_interval=base.nope_layer_interval, attention_chunk_size=0,
        use_qk_norm=base.use_qk_norm, router_bias_update_rate=base.router_bias_update_rate,
    )  # fmt: skip


def load_batches(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """(steps, batch, seq_len + 1) training windows and (eval_rows, seq_len + 1) held-out ones.

    Byte tokens of every text document of the sample corpus (bos ... eos), every tenth document
    held out; windows start at uniformly drawn offsets, so every batch comes from the whole
    187-language mixture. The trainer's loader reads documents in order instead, so a short run
    sees one script after another and its loss follows the script, not the learning rate.
    """
    tokenizer = build_tokenizer("byte")
    train_ids: list[int] = []
    held_ids: list[int] = []
    for path in expand_sources([TEXT_SHARDS]):
        for i, document in enumerate(iter_documents(path)):
            ids = tokenizer.encode(document.text, bos=True, eos=True)
            (held_ids if i % 10 == 0 else train_ids).extend(ids)
    generator = torch.Generator().manual_seed(args.seed)

    def windows(ids: list[int], n: int) -> torch.Tensor:
        stream = torch.tensor(ids)
        starts = torch.randint(0, len(stream) - args.seq_len - 1, (n,), generator=generator)
        return torch.stack([stream[s : s + args.seq_len + 1] for s in starts.tolist()])

    train = windows(train_ids, args.steps * args.batch).view(args.steps, args.batch, -1)
    return train, windows(held_ids, args.eval_rows)


def loss_of(model: Transformer, windows: torch.Tensor) -> torch.Tensor:
    logits = model(windows[:, :-1]).logits_BSV
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


def train_once(
    width: int,
    kind: str,
    lr: float,
    data: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
) -> dict:
    model_cfg = model_config(width, args.layers)
    optim_cfg = OptimConfig(
        lr=lr, warmup_steps=args.warmup, schedule="cosine", parametrization=kind,
        base_width=args.base_width, base_depth=args.base_depth,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = Transformer(model_cfg)
    model.init_weights()
    parametrization = build_parametrization(model, model_cfg, optim_cfg, args.batch)
    init_weights(model, parametrization)
    optimizer = build_optimizer(model, optim_cfg, parametrization)
    batches, held_out = data
    start, losses = time.perf_counter(), []
    for step, batch in enumerate(batches, start=1):
        set_lr(optimizer, lr_at(step, args.steps, optim_cfg))
        loss = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for moe in model.moe_layers().values():
            moe.update_expert_bias(moe.pop_expert_load(), model_cfg.router_bias_update_rate)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
    with torch.no_grad():
        held_out_loss = sum(float(loss_of(model, rows)) for rows in held_out.split(64))
        held_out_loss /= len(held_out.split(64))
    diverged = len(losses) < len(batches) or not math.isfinite(held_out_loss)
    last = losses[-args.score_steps :]
    return {
        "parametrization": kind,
        "width": width,
        "lr": lr,
        "final_loss": float("nan") if diverged else held_out_loss,
        "train_loss_last": sum(last) / len(last),
        "diverged": diverged,
        "losses": losses,
        "seconds": time.perf_counter() - start,
    }


def summarise(runs: list[dict], lrs: list[float], widths: list[int]) -> dict:
    """Best lr per (parametrisation, width) and how many grid steps it moves across widths."""
    summary = {}
    for kind in PARAMETRIZATIONS:
        best = {}
        for width in widths:
            scored = [
                r for r in runs if r["parametrization"] == kind and r["width"] == width
                and not r["diverged"]
            ]  # fmt: skip
            if scored:
                best[width] = min(scored, key=lambda r: r["final_loss"])["lr"]
        indices = [lrs.index(lr) for lr in best.values()]
        shift = max(indices) - min(indices) if indices else None
        summary[kind] = {
            "best_lr": {str(w): lr for w, lr in best.items()},
            "best_lr_shift_grid_steps": shift,
            "at_most_one_step": shift is not None and shift <= 1,
        }
    return summary


def print_table(runs: list[dict], lrs: list[float], widths: list[int]) -> None:
    print("\nheld-out loss after training (best per row marked *; 'div' = diverged)")
    print(f"{'parametrization':<16}{'width':>6} " + " ".join(f"{lr:>9.2e}" for lr in lrs))
    for kind in PARAMETRIZATIONS:
        for width in widths:
            row = {r["lr"]: r for r in runs if r["parametrization"] == kind and r["width"] == width}
            finite = [r["final_loss"] for r in row.values() if not r["diverged"]]
            best = min(finite) if finite else None
            cells = []
            for lr in lrs:
                r = row.get(lr)
                if r is None or r["diverged"]:
                    cells.append(f"{'div' if r else '-':>9}")
                else:
                    mark = "*" if r["final_loss"] == best else " "
                    cells.append(f"{r['final_loss']:>8.4f}{mark}")
            print(f"{kind:<16}{width:>6} " + " ".join(cells))


# --------------------------------------------------------------------------- the plot

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def plot(runs: list[dict], lrs: list[float], widths: list[int], path: Path) -> None:
    """Two panels (standard, MetaP): held-out loss against log2(lr), one line per width."""
    from PIL import Image, ImageDraw

    panel_w, panel_h, margin = 520, 380, 60
    image = Image.new("RGB", (2 * panel_w, panel_h + 40), "white")
    draw = ImageDraw.Draw(image)
    finite = [r["final_loss"] for r in runs if not r["diverged"]]
    low, high = min(finite), max(finite)
    high = min(high, low + 2.0)  # keep the minima readable; worse runs clip to the top
    pad = 0.05 * (high - low or 1.0)
    low, high = low - pad, high + pad

    def x_of(i: int, panel: int) -> float:
        return panel * panel_w + margin + i * (panel_w - 2 * margin) / max(1, len(lrs) - 1)

    def y_of(loss: float) -> float:
        loss = min(loss, high)
        return 20 + (high - loss) / (high - low) * (panel_h - margin - 20)

    for panel, kind in enumerate(PARAMETRIZATIONS):
        left, right = panel * panel_w + margin, (panel + 1) * panel_w - margin
        bottom = panel_h - margin + 20
        draw.rectangle([left, 20, right, bottom - 20], outline="black")
        draw.text((left, 4), f"{kind}: held-out loss vs lr", fill="black")
        for i, lr in enumerate(lrs):
            draw.text((x_of(i, panel) - 18, bottom - 14), f"{lr:.1e}", fill="black")
        for k in range(5):
            loss = low + k * (high - low) / 4
            draw.text((left - 44, y_of(loss) - 6), f"{loss:.2f}", fill="black")
        for c, width in enumerate(widths):
            colour = COLOURS[c % len(COLOURS)]
            points = [
                (x_of(lrs.index(r["lr"]), panel), y_of(r["final_loss"]))
                for r in sorted(runs, key=lambda r: r["lr"])
                if r["parametrization"] == kind and r["width"] == width and not r["diverged"]
            ]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            if points:
                best = max(points, key=lambda p: p[1])  # the lowest loss: the largest y
                draw.ellipse([best[0] - 5, best[1] - 5, best[0] + 5, best[1] + 5], outline=colour)
            draw.text((left + 90 * c, bottom + 6), f"width {width}", fill=colour)
    caption = "x: peak lr (log scale); circles: the best lr per width; missing points diverged"
    draw.text((margin, panel_h + 22), caption, fill="black")
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument(
        "--lrs", type=float, nargs="+", default=[2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2, 8e-2]
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--base-width", type=int, default=64)
    parser.add_argument("--base-depth", type=int, default=2)
    parser.add_argument("--eval-rows", type=int, default=256)
    parser.add_argument("--score-steps", type=int, default=30, help="train loss reported over")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="1: fastest on a shared, loaded 2-core machine"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/metap_lr_sweep.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lrs = sorted(args.lrs)
    load_before = os.getloadavg()
    data = load_batches(args)
    runs = []
    for kind in PARAMETRIZATIONS:
        for width in args.widths:
            for lr in lrs:
                run = train_once(width, kind, lr, data, args)
                runs.append(run)
                print(
                    f"{kind:<9} width {width:4d} lr {lr:.2e}: held-out {run['final_loss']:.4f}, "
                    f"train (last {args.score_steps} steps) {run['train_loss_last']:.4f} "
                    f"({run['seconds']:.1f} s)",
                    flush=True,
                )
    summary = summarise(runs, lrs, args.widths)
    print_table(runs, lrs, args.widths)
    for kind, result in summary.items():
        print(
            f"{kind}: best lr by width {result['best_lr']}; moves "
            f"{result['best_lr_shift_grid_steps']} grid step(s)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(runs, lrs, args.widths, png)
    record = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "machine": {
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
        "setup": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "lrs": lrs,
            "data": TEXT_SHARDS,
            "models": {str(w): vars(model_config(w, args.layers)) for w in args.widths},
        },
        "goal": "under metap the best lr moves by at most one grid step across widths",
        "summary": summary,
        "runs": runs,
    }
    record["setup"]["models"] = {
        w: {k: v for k, v in m.items() if k != "vision"}
        for w, m in record["setup"]["models"].items()
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()
