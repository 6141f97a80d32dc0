"""One training step (forward, backward, AdamW) of our model vs transformers' Llama4ForCausalLM.

Both models compute the same function: the HF model is built from our config with
`text_config_to_hf` and loads our weights through an HF checkpoint directory written by `to_hf`.
Before timing, the two losses on the benchmark batch are compared in float32 (|diff| < 1e-4).

The reference `Llama4TextMoe` runs every expert on every token (dense bmm over all experts, the
unchosen ones scaled by zero); ours sorts token copies by expert and runs grouped GEMMs. HF uses
`attn_implementation="sdpa"`, its fastest CPU attention path. Steps are interleaved in one process
(A/B/A/B after warm-up), each timed with time.perf_counter; the ratio is of the medians.

    python benchmarks/step_vs_hf.py                      # both configs, float32, all cores
    python benchmarks/step_vs_hf.py --config tiny --steps 20 --dtype bfloat16 --threads 1
    python benchmarks/step_vs_hf.py --config scout_small --profile 15   # top ops of our step
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import all_cores, load_average, report_header  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.model.config import ModelConfig, VisionConfig  # noqa: E402
from trainer.model.hf import text_config_to_hf, to_hf  # noqa: E402
from trainer.model.transformer import Transformer  # noqa: E402

GOAL_RATIO = 0.5
LOSS_TOLERANCE = 1e-4

# name -> (model config, batch size, sequence length)
CONFIGS: dict[str, tuple[ModelConfig, int, int]] = {
    # The model of configs/tiny_cpu.toml, text only: dense and MoE layers interleaved, NoPE
    # layer 3, chunking and temperature tuning active inside the 256-token rows.
    "tiny": (replace(load_config().model, vision=VisionConfig()), 8, 256),
    # Scout's shape, scaled down: every layer MoE with 16 experts, top-1, QK-norm, llama3 RoPE
    # scaling; chunk and floor scale shrunk so chunking and temperature act inside 512 tokens.
    # high_freq_factor 4 (Llama 3.1's): HF warns on Scout's 1.0, equal to low_freq_factor.
    "scout_small": (
        ModelConfig(
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
            rope_scaling="llama3",
            rope_scaling_factor=16.0,
            rope_low_freq_factor=1.0,
            rope_high_freq_factor=4.0,
            rope_original_max_position=8192,
            use_qk_norm=True,
            attn_temperature_tuning=True,
            floor_scale=128.0,
            attn_scale=0.1,
        ),
        4,
        512,
    ),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_text_config(cfg: ModelConfig):
    """`Llama4TextConfig(**text_config_to_hf(cfg))`, dropping keys the constructor rejects."""
    import transformers

    kwargs = text_config_to_hf(cfg)
    dropped = []
    while True:
        try:
            return transformers.Llama4TextConfig(**kwargs), dropped
        except TypeError as error:
            match = re.search(r"unexpected keyword argument '(\w+)'", str(error))
            if not match or match.group(1) not in kwargs:
                raise
            dropped.append(match.group(1))
            del kwargs[match.group(1)]


def build_models(cfg: ModelConfig, seed: int):
    """Our model (float32, freshly initialised) and the HF model holding the same weights."""
    import transformers

    torch.manual_seed(seed)
    ours = Transformer(cfg)
    ours.init_weights()
    hf_config, dropped = hf_text_config(cfg)
    with tempfile.TemporaryDirectory(prefix="step_vs_hf_") as directory:
        to_hf(ours, cfg, directory)
        reference = transformers.Llama4ForCausalLM.from_pretrained(
            directory, config=hf_config, attn_implementation="sdpa", dtype=torch.float32
        )
    return ours.train(), reference.train(), dropped


def ours_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    return model(tokens, positions_BS=None, document_ids_BS=None).logits_BSV


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens, use_cache=False).logits


def next_token_loss(logits_BSV: torch.Tensor, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token s + 1 from position s (float32 logits)."""
    return F.cross_entropy(
        logits_BSV[:, :-1].flatten(0, 1).float(), tokens_BS[:, 1:].flatten(), reduction="mean"
    )


def make_step(model, logits_fn, tokens: torch.Tensor):
    optimizer = torch.optim.AdamW(  # as trainer/optim.py builds it: foreach
        model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, foreach=True
    )

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = next_token_loss(logits_fn(model, tokens), tokens)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def check_losses(ours, reference, tokens: torch.Tensor) -> dict:
    with torch.no_grad():
        loss_ours = next_token_loss(ours_logits(ours, tokens), tokens).item()
        loss_hf = next_token_loss(hf_logits(reference, tokens), tokens).item()
    diff = abs(loss_ours - loss_hf)
    return {
        "dtype": "float32",
        "loss_ours": loss_ours,
        "loss_hf": loss_hf,
        "abs_diff": diff,
        "tolerance": LOSS_TOLERANCE,
        "agree": diff < LOSS_TOLERANCE,
    }


def summary(times_s: list[float]) -> dict:
    ms = [t * 1e3 for t in times_s]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "max_ms": max(ms),
        "steps_ms": [round(t, 3) for t in ms],
    }


def profile_step(step, label: str, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return f"--- {label}: top {rows} ops by self CPU time (one step)\n{table}"


def run_config(name: str, args: argparse.Namespace) -> dict:
    cfg, batch, seq = CONFIGS[name]
    ours, reference, dropped = build_models(cfg, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=generator)

    agreement = check_losses(ours, reference, tokens)
    print(
        f"[{name}] float32 loss: ours {agreement['loss_ours']:.6f}  "
        f"hf {agreement['loss_hf']:.6f}  |diff| {agreement['abs_diff']:.2e}",
        flush=True,
    )
    if not agreement["agree"]:
        raise SystemExit(
            f"[{name}] the models disagree (|loss diff| {agreement['abs_diff']:.3e} >= "
            f"{LOSS_TOLERANCE}): not timing two different functions"
        )

    dtype = DTYPES[args.dtype]
    ours.to(dtype)
    reference.to(dtype)
    steps = {
        "ours": make_step(ours, ours_logits, tokens),
        "hf": make_step(reference, hf_logits, tokens),
    }
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {"ours": [], "hf": []}
    for _ in range(args.steps):
        for label, step in steps.items():  # A/B/A/B
            start = time.perf_counter()
            step()
            times[label].append(time.perf_counter() - start)

    result = {
        "config": name,
        "model": {k: v for k, v in vars(cfg).items() if k != "vision"},
        "batch_size": batch,
        "seq_len": seq,
        "tokens_per_step": batch * seq,
        "dtype": args.dtype,
        "hf_attn_implementation": "sdpa",
        "hf_config_keys_dropped": dropped,
        "parameters": {
            "ours": sum(p.numel() for p in ours.parameters()),
            "hf": sum(p.numel() for p in reference.parameters()),
        },
        "loss_agreement": agreement,
        "ours": summary(times["ours"]),
        "hf": summary(times["hf"]),
    }
    ratio = result["ours"]["median_ms"] / result["hf"]["median_ms"]
    result["ratio_ours_over_hf"] = ratio
    result["goal_ratio"] = GOAL_RATIO
    result["goal_met"] = ratio <= GOAL_RATIO
    print(
        f"[{name}] {batch}x{seq} {args.dtype}: ours median {result['ours']['median_ms']:.1f} ms "
        f"(min {result['ours']['min_ms']:.1f})  hf median {result['hf']['median_ms']:.1f} ms "
        f"(min {result['hf']['min_ms']:.1f})  ratio {ratio:.3f}  "
        f"goal <= {GOAL_RATIO}: {'met' if result['goal_met'] else 'NOT met'}",
        flush=True,
    )
    if args.profile:
        for label, step in steps.items():
            print(profile_step(step, f"{name} {label}", args.profile), flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=[*CONFIGS, "all"], default="all")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: all cores")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="print the top N ops of one step"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "step_vs_hf.json",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 0:
        parser.error("--steps must be >= 1, --warmup and --threads >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    import transformers

    args = parse_args(argv)
    threads = args.threads or all_cores()
    torch.set_num_threads(threads)
    names = list(CONFIGS) if args.config == "all" else [args.config]
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"{threads} threads, {args.steps} timed + {args.warmup} warm-up steps per model",
        flush=True,
    )
    load_before = load_average()
    results = [run_config(name, args) for name in names]
    report = {
        **report_header(
            "one training step (forward, backward, AdamW) ours vs HF Llama4ForCausalLM",
            load_before,
            transformers=transformers.__version__,
        ),
        "threads": threads,
        "steps": args.steps,
        "warmup": args.warmup,
        "timing": "median/min of per-step time.perf_counter, steps interleaved ours/hf",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
