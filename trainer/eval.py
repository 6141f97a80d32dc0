"""Long-context evaluation: loss by position and passkey retrieval at each sequence length.

    python -m trainer.eval longctx --checkpoint DIR --lengths 4096,16384,65536,262144
        [--config FILE] [--stage NAME] [--samples N] [--depths 0,0.25,0.5,0.75,1]
        [--buckets 8] [--sources GLOB ...] [--dtype float32|bfloat16] [--seed S]
        [--out JSON] [--tensorboard DIR]

For each length L the model reads passkey documents of exactly L tokens (data/passkey.py: a
5-digit key hidden at a depth of multilingual corpus filler, asked for at the end), `samples`
of them at each depth, one forward each, and reports
  - loss by position: the mean next-token loss over the document up to the question, in
    log-spaced position buckets [0, L/2^(n-1)), ..., [L/4, L/2), [L/2, L), so the far end of
    the context (what a context extension is for) has buckets of its own;
  - passkey retrieval, teacher-forced: the argmax at each answer position against the key's
    token there. Per-token accuracy and exact match (every key token right), overall and by
    depth. A model that ignores the needle scores chance, 1/10 per digit with the byte
    tokenizer, and ~1e-5 exact match.
To stdout (a table), JSON (`--out`) and TensorBoard scalars `eval/longctx/<L>/...`.

The checkpoint's model config is its run's (DIR/config.toml, else DIR/../../config.toml, as in
trainer.convert), at the stage the checkpoint's step belongs to (or `--stage`). The CLI runs in
one process; the trainer calls `evaluate_long_context` on its own (sharded, context-parallel)
model at stage boundaries, on every rank.

Cost: one forward of batch 1 per document, lengths x depths x samples forwards in all.
Attention memory is linear in L (flash-style kernel, chunked RoPE layers); the logits are
L x vocab floats (84 MB at 64K with the byte vocabulary, L x 202048 x 2 bytes with Llama 4's,
so use context parallelism for long L with a large vocabulary). The global (NoPE) layers' time
is quadratic in L. Measured with configs/tiny_cpu.toml, float32, on 2 CPU cores shared with
other jobs (load ~10, so upper bounds), per document: 4K 5 s, 16K 10 s, 64K 84 s (peak RSS
0.8 GB); 256K, by the quadratic term, ~20 min on such a machine: run it on a GPU, or with
few depths and one sample.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from data.passkey import FillerPool, PasskeyDocument, passkey_document
from data.tokenizer import Tokenizer, build_tokenizer

DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_BUCKETS = 8
_LOSS_CHUNK = 8192
"""Logit rows upcast to float32 at a time for the loss."""


def bucket_edges(length: int, buckets: int = DEFAULT_BUCKETS) -> list[int]:
    """Log-spaced position bucket edges: [0, L/2^(n-1), ..., L/4, L/2, L], repeats dropped."""
    edges = [0, *(length >> (buckets - i) for i in range(1, buckets)), length]
    return sorted(set(edges))


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """eval() and no_grad for the duration, then the model as it was: training mode, and the
    MoE expert-load counters that feed the next optimizer step's balancing, untouched."""
    was_training = model.training
    counters = [
        (m.tokens_per_expert, m.tokens_per_expert.clone())
        for m in model.modules()
        if isinstance(getattr(m, "tokens_per_expert", None), torch.Tensor)
    ]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        for counter, saved in counters:
            counter.copy_(saved)


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums over every rank. Ranks of one context-parallel group hold parts of a document and
    data-parallel ranks the same parts again: every sum then counts every position the same
    number of times, and the ratios reported are those of one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def score_document(
    model: nn.Module, document: PasskeyDocument, edges: Sequence[int], device: torch.device
) -> torch.Tensor:
    """One forward: [loss sum per bucket, tokens per bucket, answer tokens right, answer
    tokens], summed over ranks."""
    length = len(document.tokens)
    tokens = torch.from_numpy(document.tokens).to(device)[None]
    positions = torch.arange(length, device=device)[None]
    out = model(tokens, positions, torch.zeros_like(tokens))
    logits_SV = getattr(out, "logits_BSV", out)[0]
    where = positions
    split = getattr(model, "sequence_split", None)
    if split is not None:  # context parallel: this rank's logits are for its share of the row
        where = split.shard(positions)
    where = where[0]  # the position each logit row predicts from
    target = where + 1
    bucket_of = torch.tensor(edges[1:-1], device=device)
    n_buckets = len(edges) - 1
    sums = torch.zeros(2 * n_buckets + 2, dtype=torch.float64, device=device)
    scored = target < document.question[0]  # filler and needle; the answer is scored below
    for start in range(0, len(where), _LOSS_CHUNK):
        rows = torch.arange(start, min(start + _LOSS_CHUNK, len(where)), device=device)
        rows = rows[scored[rows]]
        if not len(rows):
            continue
        loss = F.cross_entropy(logits_SV[rows].float(), tokens[0, target[rows]], reduction="none")
        bucket = torch.bucketize(target[rows], bucket_of, right=True)
        sums[:n_buckets].index_add_(0, bucket, loss.double())
        sums[n_buckets : 2 * n_buckets].index_add_(0, bucket, torch.ones_like(loss).double())
    first, end = document.answer
    answer = (target >= first) & (target < end)
    hits = logits_SV[answer].argmax(-1) == tokens[0, target[answer]]
    sums[-2] = hits.sum()
    sums[-1] = answer.sum()
    return _all_reduce(sums)


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def evaluate_long_context(
    model: nn.Module,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    *,
    filler: FillerPool,
    samples: int = 1,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    buckets: int = DEFAULT_BUCKETS,
    seed: int = 0,
) -> dict[str, Any]:
    """Loss by position bucket and passkey retrieval at each length; a JSON-able dict.

    `model(tokens_BS, positions_BS, document_ids_BS)` returns the logits (or an object with
    `logits_BSV`), as `Transformer` does. With a process group every rank must call this with
    the same arguments (the documents are the same on every rank); a context-parallel model's
    `sequence_split` says which positions its logits are for. Training mode and MoE load
    counters are restored afterwards.
    """
    if samples < 1 or not depths or not lengths:
        raise ValueError("long-context eval needs samples >= 1, depths and lengths")
    device = _device_of(model)
    results: dict[str, Any] = {
        "depths": list(depths),
        "samples": samples,
        "seed": seed,
        "lengths": {},
    }
    with evaluation_mode(model):
        for length in lengths:
            results["lengths"][str(length)] = _evaluate_length(
                model, tokenizer, filler, length, samples, depths, buckets, seed, device
            )
    return results


def _evaluate_length(
    model: nn.Module,
    tokenizer: Tokenizer,
    filler: FillerPool,
    length: int,
    samples: int,
    depths: Sequence[float],
    buckets: int,
    seed: int,
    device: torch.device,
) -> dict[str, Any]:
    start = time.perf_counter()
    edges = bucket_edges(length, buckets)
    n = len(edges) - 1
    total = torch.zeros(2 * n + 2, dtype=torch.float64)
    by_depth = {}
    for d, depth in enumerate(depths):
        right, exact = 0.0, 0
        for sample in range(samples):
            document = passkey_document(
                tokenizer, filler, length, depth=depth, seed=[seed, length, d, sample]
            )
            sums = score_document(model, document, edges, device).cpu()  # note: a host sync
            total += sums
            right += float(sums[-2] / sums[-1])
            exact += int(sums[-2] == sums[-1])
        by_depth[f"{depth:g}"] = {"token_accuracy": right / samples, "exact_match": exact / samples}
    loss_sum, counts = total[:n], total[n : 2 * n]
    means = [float(s / c) if c else None for s, c in zip(loss_sum, counts, strict=True)]
    return {
        "loss": {
            "edges": edges,
            "mean": means,
            "tokens": [int(c) for c in counts],
        },
        "loss_mean": float(loss_sum.sum() / counts.sum()),
        "passkey": {
            "token_accuracy": sum(v["token_accuracy"] for v in by_depth.values()) / len(depths),
            "exact_match": sum(v["exact_match"] for v in by_depth.values()) / len(depths),
            "by_depth": by_depth,
        },
        "documents": samples * len(depths),
        "seconds": time.perf_counter() - start,
    }


def longctx_scalars(results: dict[str, Any], prefix: str = "eval/longctx") -> dict[str, float]:
    """Flat scalars for MetricsLogger / TensorBoard: `eval/longctx/<L>/loss/<lo>-<hi>`, ..."""
    scalars: dict[str, float] = {}
    for length, r in results["lengths"].items():
        key = f"{prefix}/{length}"
        edges = r["loss"]["edges"]
        for lo, hi, mean in zip(edges[:-1], edges[1:], r["loss"]["mean"], strict=True):
            if mean is not None:
                scalars[f"{key}/loss/{lo}-{hi}"] = mean
        scalars[f"{key}/loss/mean"] = r["loss_mean"]
        passkey = r["passkey"]
        scalars[f"{key}/passkey/token_accuracy"] = passkey["token_accuracy"]
        scalars[f"{key}/passkey/exact_match"] = passkey["exact_match"]
        for depth, scores in passkey["by_depth"].items():
            scalars[f"{key}/passkey/depth_{depth}/exact_match"] = scores["exact_match"]
        scalars[f"{key}/seconds"] = r["seconds"]
    return scalars


def format_table(results: dict[str, Any]) -> str:
    """Loss by position bucket, then passkey scores by depth, one line per length."""
    lines = []
    for length, r in results["lengths"].items():
        edges = r["loss"]["edges"]
        cells = [
            f"[{_short(lo)},{_short(hi)}) {'-' if m is None else f'{m:.3f}'}"
            for lo, hi, m in zip(edges[:-1], edges[1:], r["loss"]["mean"], strict=True)
        ]
        lines.append(f"L={length:>7} loss {r['loss_mean']:.3f} | " + "  ".join(cells))
        p = r["passkey"]
        depths = "  ".join(
            f"d={d} {s['exact_match']:.2f}/{s['token_accuracy']:.2f}"
            for d, s in p["by_depth"].items()
        )
        lines.append(
            f"{'':9} passkey exact {p['exact_match']:.3f} token {p['token_accuracy']:.3f} | "
            f"exact/token by depth: {depths} | {r['documents']} docs {r['seconds']:.1f} s"
        )
    return "\n".join(lines)


def _short(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


# --------------------------------------------------------------------------- the command


def load_checkpoint_model(
    ckpt_dir: str, config: str | None, stage: str | None, dtype: torch.dtype
) -> tuple[nn.Module, Any, int]:
    """The model of a checkpoint directory on this process, its Config, and its step (0 when
    the directory is not a run's `step-N`)."""
    from trainer.checkpoint import load_model_weights
    from trainer.config import load_config
    from trainer.convert import find_config
    from trainer.model.transformer import Transformer

    cfg = load_config(find_config(Path(ckpt_dir), Path(config) if config else None))
    match = re.fullmatch(r"step-(\d+)", Path(ckpt_dir.rstrip("/")).name)
    step = int(match.group(1)) if match else 0
    cfg = stage_config(cfg, step, stage)
    # No init_weights(): the load sets every parameter and persistent buffer (DCP refuses a
    # checkpoint that lacks one) and the only other buffers, the MoE load counters, start at 0.
    model = Transformer(cfg.model)
    with warnings.catch_warnings():  # DCP says it loads in one process: that is the intent
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        load_model_weights(ckpt_dir, model)
    return model.to(dtype), cfg, step


def stage_config(cfg: Any, step: int, stage: str | None) -> Any:
    """The config of the [[stages]] entry named `stage`, else of the one `step` lies in (its
    RoPE, chunking and temperature settings); a run without stages is its own config."""
    from trainer.config import ConfigError

    if not getattr(cfg, "stages", None):
        if stage is not None:
            raise ConfigError(f"--stage {stage!r}: the run has no [[stages]]")
        return cfg
    from trainer.stages import stage_at, stage_configs

    stages = stage_configs(cfg)
    if stage is None:
        return stage_at(stages, max(step, 1)).config
    chosen = [s for s in stages if s.name == stage]
    if not chosen:
        raise ConfigError(f"--stage {stage!r}: the run's stages are {[s.name for s in stages]}")
    return chosen[0].config


def run_longctx(args: argparse.Namespace) -> dict[str, Any]:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, cfg, step = load_checkpoint_model(args.checkpoint, args.config, args.stage, dtype)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise SystemExit(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
            f"vocabulary ({tokenizer.vocab_size}): pass the run's --config"
        )
    filler = FillerPool.from_sources(args.sources or cfg.data.sources, cfg.data.tokenizer)
    results = evaluate_long_context(
        model,
        tokenizer,
        args.lengths,
        filler=filler,
        samples=args.samples,
        depths=args.depths,
        buckets=args.buckets,
        seed=args.seed,
    )
    results.update(checkpoint=args.checkpoint, step=step)
    print(format_table(results), flush=True)
    if args.out:
        with fsspec.open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    if args.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=args.tensorboard) as writer:
            for key, value in longctx_scalars(results).items():
                writer.add_scalar(key, value, step)
    return results


def _numbers(kind: type, what: str):
    def parse(text: str) -> list:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{what}: comma-separated numbers; got {text!r}"
            ) from None
        if not values or any(not math.isfinite(v) or v < 0 for v in values):
            raise argparse.ArgumentTypeError(f"{what}: non-negative numbers; got {text!r}")
        return values

    return parse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.eval", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    longctx = commands.add_parser("longctx", help="loss by position and passkey retrieval")
    longctx.add_argument(
        "--checkpoint", required=True, help="a run's checkpoints/step-N or a converted one"
    )
    longctx.add_argument("--lengths", required=True, type=_numbers(int, "--lengths"))
    longctx.add_argument("--config", help="default: DIR/config.toml or DIR/../../config.toml")
    longctx.add_argument(
        "--stage", help="the [[stages]] entry whose model settings to use; default: the step's"
    )
    longctx.add_argument("--samples", type=int, default=1, help="documents per length and depth")
    longctx.add_argument("--depths", type=_numbers(float, "--depths"), default=list(DEFAULT_DEPTHS))
    longctx.add_argument("--buckets", type=int, default=DEFAULT_BUCKETS)
    longctx.add_argument(
        "--sources", nargs="+", help="filler corpus; default: the run's data.sources"
    )
    longctx.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    longctx.add_argument("--seed", type=int, default=0)
    longctx.add_argument("--out", help="write the results as JSON here")
    longctx.add_argument("--tensorboard", help="write eval/longctx/... scalars to this log dir")
    args = parser.parse_args(argv)
    if any(d > 1 for d in args.depths):
        parser.error("--depths: each depth lies in [0, 1]")
    run_longctx(args)


if __name__ == "__main__":
    sys.exit(main())
