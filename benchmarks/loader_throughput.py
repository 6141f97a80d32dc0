"""Data loader throughput side by side with the training step's consumption, and packing efficiency.

Goals (issue 4): the loader supplies at least 10x the tokens/s that `train_step` consumes on the
same config, and packing keeps >= 98% of the tokens non-pad on the sample corpus.

One run measures, for the config's DataSpec (`trainer.train.data_spec`) over three source sets:
  - "text":    the text shards only (`data/sample/sample-*.jsonl.zst`),
  - "default": the config's `data.sources` (text + the media shard: images and a video),
  - "media":   the media shard only, every row carrying image tiles: the loader's worst case,
               reported for information (not one of the goals' corpora);
  1. corpus loading (reading the shards) and loader start-up (tokenizing for the mixture
     weights), timed apart from the batches;
  2. one in-process GlobalBatchLoader of world size 1 (all rows): N global batches timed after a
     warm-up;
  3. BackgroundLoader with 1 and 2 worker processes: tokens/s reaching the consumer when it pulls
     batches as fast as it can (start-up, i.e. the time to the first batch, reported apart);
  4. packing efficiency (`data/packing_efficiency`) over the first `--efficiency-batches` global
     batches of a fresh stream (default: training.steps, the whole run) and over the timed window.
The training step's consumption is `train_step` + `balance_experts` (as the loop runs them) of the
trainer that `build_trainer` makes for the same config in one process (a one-rank gloo group), on
batches prepared beforehand: text-only batches (the fastest step, hence the most demanding
consumer) and image batches from the media shard (the vision tower runs on every row's tiles).
Ratios are loader tokens/s (mean over the timed batches) over the trainer's tokens/s at its fastest
timed step (the least disturbed by other processes, the most demanding); the goal is judged
against the text step.
Tokens are rows x seq_len (padding included), as the trainer's `tokens_per_s` counts them.
Where a ratio misses the goal, the loader's top functions under cProfile are printed and saved.

Run from the repository root (the config's sources are relative paths):

    python benchmarks/loader_throughput.py
    python benchmarks/loader_throughput.py --config configs/tiny_cpu.toml --training.seq_len=512
    python benchmarks/loader_throughput.py --batches 2000 --workers 1,2,4 --profile 20
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import datetime
import io
import json
import os
import platform
import pstats
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Only light imports at the top: BackgroundLoader spawns workers that re-import this module, and
# torch stays out of them (the trainer's pieces are imported where they are used).
from data.loader import (  # noqa: E402
    BackgroundLoader,
    DataSpec,
    GlobalBatchLoader,
    RankSlice,
    load_corpus,
)
from trainer.config import ConfigError, load_config, split_cli  # noqa: E402

GOAL_RATIO = 10.0
GOAL_PACKING = 0.98
TEXT_SOURCES = "data/sample/sample-*.jsonl.zst"
MEDIA_SOURCES = "data/sample/media-*.jsonl.zst"
ALL_ROWS = RankSlice(0, 1)


def all_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def tokens_per_batch(spec: DataSpec) -> int:
    return spec.global_batch_size * spec.seq_len


def timing_summary(times_s: list[float], tokens_each: int, tiles: int) -> dict[str, Any]:
    total = sum(times_s)
    ms = sorted(t * 1e3 for t in times_s)
    return {
        "batches": len(times_s),
        "seconds": total,
        "tokens_per_s": tokens_each * len(times_s) / total,
        "batches_per_s": len(times_s) / total,
        "tiles": tiles,
        "tiles_per_s": tiles / total,
        "batch_ms_min": ms[0],
        "batch_ms_median": statistics.median(ms),
        "batch_ms_p90": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
        "batch_ms_max": ms[-1],
    }


def consumption(step: dict[str, Any]) -> float:
    """The trainer's demand: tokens/s of its fastest timed step.

    Other processes on the cores slow the multi-threaded step far more than the single-threaded
    loader; the fastest step is the least disturbed and the most demanding, so a loader that
    keeps 10x ahead of it keeps 10x ahead of the mean.
    """
    return step["tokens_per_s_fastest_step"]


def n_tiles(batch) -> int:
    return 0 if batch.pixel_values is None else len(batch.pixel_values)


# ------------------------------------------------------------------------------- the loader


def measure_corpus(spec: DataSpec):
    start = time.perf_counter()
    corpus = load_corpus(spec.sources, spec.on_error, spec.tokenizer)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    GlobalBatchLoader(spec, ALL_ROWS, corpus)
    init_s = time.perf_counter() - start
    documents = sum(len(docs) for docs in corpus.documents.values())
    info = {
        "documents": documents,
        "languages": len(corpus.documents),
        "load_s": load_s,
        "loader_init_s": init_s,
    }
    return corpus, info


def time_batches(loader: GlobalBatchLoader | BackgroundLoader, batches: int):
    """Seconds each of `batches` next_batch() calls took, and the image tiles they carried."""
    times, tiles = [], 0
    for _ in range(batches):
        start = time.perf_counter()
        batch = loader.next_batch()
        times.append(time.perf_counter() - start)
        tiles += n_tiles(batch)
    return times, tiles


def measure_in_process(spec: DataSpec, corpus, batches: int, warmup: int) -> dict[str, Any]:
    loader = GlobalBatchLoader(spec, ALL_ROWS, corpus)
    for _ in range(warmup):
        loader.next_batch()
    times, tiles = time_batches(loader, batches)
    result = timing_summary(times, tokens_per_batch(spec), tiles)
    result["warmup"] = warmup
    metrics = loader.metrics()
    result["packing_efficiency_through_window"] = metrics["data/packing_efficiency"]
    result["image_token_share_through_window"] = metrics.get("data/modality/image/share", 0.0)
    return result


def measure_packing(spec: DataSpec, corpus, batches: int) -> dict[str, Any]:
    loader = GlobalBatchLoader(spec, ALL_ROWS, corpus)
    first_image = None
    for index in range(batches):
        batch = loader.next_batch()
        if first_image is None and n_tiles(batch):
            first_image = index
    metrics = loader.metrics()
    stats = loader.packer.stats
    return {
        "batches": batches,
        "efficiency": metrics["data/packing_efficiency"],
        "tokens": stats.tokens,
        "padding": stats.padding,
        "image_token_share": metrics.get("data/modality/image/share", 0.0),
        "first_batch_with_images": first_image,
    }


def measure_background(
    spec: DataSpec, workers: int, prefetch: int, batches: int, warmup: int
) -> dict[str, Any]:
    loader = BackgroundLoader(spec, ALL_ROWS, workers, prefetch)
    try:
        start = time.perf_counter()
        loader.next_batch()
        startup_s = time.perf_counter() - start
        for _ in range(warmup):
            loader.next_batch()
        times, tiles = time_batches(loader, batches)
    finally:
        loader.close()
    result = timing_summary(times, tokens_per_batch(spec), tiles)
    result.update(
        workers=workers,
        prefetch=prefetch,
        startup_s=startup_s,
        tokens_per_s_per_worker=result["tokens_per_s"] / workers,
    )
    return result


def profile_loader(spec: DataSpec, corpus, batches: int, warmup: int, rows: int) -> dict:
    """The in-process loader's top functions (self time and cumulative) over `batches`."""
    loader = GlobalBatchLoader(spec, ALL_ROWS, corpus)
    for _ in range(warmup):
        loader.next_batch()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(batches):
        loader.next_batch()
    profiler.disable()
    report: dict[str, Any] = {"batches": batches}
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(key)
        stats.print_stats(rows)
        report[f"by_{key}_text"] = text.getvalue().strip()
        top = []
        for func in stats.fcn_list[:rows]:
            calls, _, tottime, cumtime, _ = stats.stats[func]
            top.append(
                {
                    "function": f"{func[0]}:{func[1]}({func[2]})",
                    "calls": calls,
                    "tottime_s": tottime,
                    "cumtime_s": cumtime,
                }
            )
        report[f"by_{key}"] = top
        report["total_s"] = stats.total_tt
    return report


# ------------------------------------------------------------------------------ the trainer


def measure_trainer(cfg_path, overrides, batch_sets, steps: int, warmup: int, threads: int):
    """tokens/s of train_step + balance_experts for each list of prepared batches."""
    import torch
    import torch.distributed as dist

    from parallel.mesh import init_distributed
    from trainer.train import balance_experts, build_trainer, train_step

    torch.set_num_threads(threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="loader_throughput_") as run_dir:
        cfg = load_config(
            cfg_path,
            [
                *overrides,
                f"--training.run_dir={run_dir}",
                "--data.num_workers=0",
                "--metrics.tensorboard=false",
                "--training.device=cpu",
            ],
        )
        tokens_each = cfg.training.global_batch_size * cfg.training.seq_len
        ctx = init_distributed("cpu")
        try:
            trainer = build_trainer(cfg, ctx)
            for name, batches in batch_sets.items():
                times = []
                for index, batch in enumerate(batches[: warmup + steps]):
                    start = time.perf_counter()
                    train_step(trainer, batch)
                    balance_experts(trainer)
                    if index >= warmup:
                        times.append(time.perf_counter() - start)
                tiles = sum(n_tiles(b) for b in batches[warmup : warmup + steps])
                result = timing_summary(times, tokens_each, tiles)
                result["step_ms_median"] = result.pop("batch_ms_median")
                result["step_ms_p90"] = result.pop("batch_ms_p90")
                result["step_ms_max"] = result.pop("batch_ms_max")
                result["step_ms_min"] = result.pop("batch_ms_min")
                result["tokens_per_s_fastest_step"] = tokens_each / result["step_ms_min"] * 1e3
                result["steps"] = result.pop("batches")
                del result["batches_per_s"]
                results[name] = result
        finally:
            dist.destroy_process_group()
    return results, torch.get_num_threads()


def prepared_batches(spec: DataSpec, corpus, count: int) -> list:
    loader = GlobalBatchLoader(spec, ALL_ROWS, corpus)
    return [loader.next_batch() for _ in range(count)]


# ----------------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
        epilog="Other --section.key=value arguments override the config, as for the trainer.",
    )
    parser.add_argument("--config", default=None, help="TOML config (default: tiny_cpu)")
    parser.add_argument("--batches", type=int, default=1000, help="timed in-process batches")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches first")
    parser.add_argument(
        "--media-batches", type=int, default=50, help="timed batches of the media-only stream"
    )
    parser.add_argument(
        "--bg-batches", type=int, default=300, help="timed BackgroundLoader batches"
    )
    parser.add_argument("--workers", default="1,2", help="BackgroundLoader worker counts")
    parser.add_argument(
        "--efficiency-batches",
        type=int,
        default=0,
        help="batches for packing efficiency; 0: training.steps (the whole run)",
    )
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--train-warmup", type=int, default=3, help="untimed training steps")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: all cores")
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="profile every source set's loader (top N functions); by default only those "
        "that miss the goal are profiled (top 15)",
    )
    parser.add_argument("--no-media", action="store_true", help="skip the media-only stream")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "loader_throughput.json",
    )
    args, rest = parser.parse_known_args(argv)
    path, overrides = split_cli(rest)
    args.config = args.config or path
    args.overrides = overrides
    try:
        args.worker_counts = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        parser.error(f"--workers must be comma-separated integers, got {args.workers!r}")
    counts = (args.batches, args.media_batches, args.bg_batches, args.train_steps)
    if min(counts) < 1 or min(args.worker_counts, default=0) < 1:
        parser.error("batch, step and worker counts must be >= 1")
    if min(args.warmup, args.train_warmup, args.efficiency_batches, args.threads) < 0:
        parser.error("warm-up counts, --efficiency-batches and --threads must be >= 0")
    return args


def versions() -> dict[str, str]:
    import numpy
    import PIL
    import torch
    import zstandard

    return {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "zstandard": zstandard.__version__,
        "python": platform.python_version(),
    }


def machine(load_before) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cores_available": all_cores(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        # Other processes compete for the cores; timings are noisier the higher these are.
        "loadavg_1_5_15_before": load_before,
        "loadavg_1_5_15_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def print_table(report: dict[str, Any]) -> None:
    trainer = report["trainer"]
    text_rate = consumption(trainer["text_step"])
    print(f"\ntrainer (1 process), fastest step: text {text_rate:,.0f} tok/s", end="")
    if "image_step" in trainer:
        print(f", image {consumption(trainer['image_step']):,.0f} tok/s", end="")
    print(f"; ratios below are over the text step (goal >= {GOAL_RATIO:g}x)")
    header = f"{'sources':<8} {'loader':<14} {'tok/s':>12} {'per worker':>12} {'ratio':>8}"
    print(header + f" {'tiles/s':>9} {'start-up s':>10}")
    for name, variant in report["variants"].items():
        corpus = variant["corpus"]
        rows = [("in-process", variant["in_process"], corpus["load_s"] + corpus["loader_init_s"])]
        rows += [
            (f"{n} worker{'s' * (n > 1)}", bg, bg["startup_s"])
            for n, bg in ((int(k), v) for k, v in variant["background"].items())
        ]
        for label, m, startup in rows:
            per_worker = m.get("tokens_per_s_per_worker", m["tokens_per_s"])
            print(
                f"{name:<8} {label:<14} {m['tokens_per_s']:>12,.0f} {per_worker:>12,.0f} "
                f"{m['tokens_per_s'] / text_rate:>7.1f}x {m['tiles_per_s']:>9.1f} "
                f"{startup:>10.2f}"
            )
    print(
        "start-up: reading the corpus + loader init (in-process), time to the first batch "
        "(workers: spawn, imports, corpus)"
    )
    print("\npacking efficiency (non-pad share):")
    for name, variant in report["variants"].items():
        p = variant["packing"]
        window = variant["in_process"]
        print(
            f"  {name:<8} first {p['batches']} batches {p['efficiency']:.4f} "
            f"(image tokens {p['image_token_share']:.2%}); through the timed window "
            f"({window['warmup'] + window['batches']} batches) "
            f"{window['packing_efficiency_through_window']:.4f}"
        )


def goals(report: dict[str, Any], config_workers: int) -> dict[str, Any]:
    text_rate = consumption(report["trainer"]["text_step"])
    checks = []
    for name in ("text", "default"):
        variant = report["variants"][name]
        loaders = {"in_process": variant["in_process"]}
        loaders.update({f"background_{k}": v for k, v in variant["background"].items()})
        for label, m in loaders.items():
            ratio = m["tokens_per_s"] / text_rate
            checks.append(
                {
                    "goal": f"loader/trainer >= {GOAL_RATIO:g}",
                    "sources": name,
                    "loader": label,
                    "value": ratio,
                    "met": ratio >= GOAL_RATIO,
                }
            )
        efficiency = variant["packing"]["efficiency"]
        checks.append(
            {
                "goal": f"packing efficiency >= {GOAL_PACKING:g}",
                "sources": name,
                "value": efficiency,
                "met": efficiency >= GOAL_PACKING,
            }
        )
    configured = f"background_{config_workers}" if config_workers else "in_process"
    as_configured = [
        c for c in checks if "loader" not in c or c["loader"] in (configured, "in_process")
    ]
    return {
        "ratio_denominator": "tokens/s of the fastest timed text-only training step",
        "checks": checks,
        "config_num_workers": config_workers,
        "all_met": all(c["met"] for c in checks),
        "met_as_configured": all(c["met"] for c in as_configured),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from trainer.train import data_spec  # torch: kept out of the module's top level

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        sys.exit(f"config error: {error}")
    threads = args.threads or all_cores()
    spec = data_spec(cfg)
    efficiency_batches = args.efficiency_batches or cfg.training.steps
    sources = {"text": (TEXT_SOURCES,), "default": spec.sources}
    if not args.no_media and cfg.model.vision.enabled:
        sources["media"] = (MEDIA_SOURCES,)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(
        f"config {args.config or 'configs/tiny_cpu.toml (default)'} {' '.join(args.overrides)}\n"
        f"{spec.global_batch_size} rows x {spec.seq_len} tokens per global batch, "
        f"{all_cores()} cores, {threads} torch threads for the trainer",
        flush=True,
    )

    variants: dict[str, dict[str, Any]] = {}
    specs, corpora = {}, {}
    for name, srcs in sources.items():
        specs[name] = dataclasses.replace(spec, sources=srcs)
        corpora[name], corpus_info = measure_corpus(specs[name])
        timed = args.media_batches if name == "media" else args.batches
        warmup = min(args.warmup, 5) if name == "media" else args.warmup
        in_process = measure_in_process(specs[name], corpora[name], timed, warmup)
        packing_batches = efficiency_batches if name != "media" else warmup + timed
        packing = measure_packing(specs[name], corpora[name], packing_batches)
        variants[name] = {
            "sources": list(srcs),
            "corpus": corpus_info,
            "in_process": in_process,
            "packing": packing,
        }
        print(
            f"[{name}] corpus {corpus_info['documents']} documents read in "
            f"{corpus_info['load_s']:.2f} s (+{corpus_info['loader_init_s']:.2f} s loader "
            f"start-up); in-process {in_process['tokens_per_s']:,.0f} tok/s over "
            f"{in_process['batches']} batches ({in_process['tiles']} tiles); packing "
            f"{packing['efficiency']:.4f} over {packing['batches']} batches",
            flush=True,
        )

    batch_sets = {"text_step": "text", "image_step": "media"}
    batch_sets = {k: v for k, v in batch_sets.items() if v in specs}
    count = args.train_warmup + args.train_steps
    prepared = {k: prepared_batches(specs[v], corpora[v], count) for k, v in batch_sets.items()}
    trainer, torch_threads = measure_trainer(
        args.config, args.overrides, prepared, args.train_steps, args.train_warmup, threads
    )
    del prepared
    for name, result in trainer.items():
        print(
            f"[trainer] {name}: {result['tokens_per_s']:,.0f} tok/s mean, "
            f"{result['tokens_per_s_fastest_step']:,.0f} tok/s fastest step (median step "
            f"{result['step_ms_median']:.0f} ms, fastest {result['step_ms_min']:.0f} ms, "
            f"{result['steps']} steps)",
            flush=True,
        )

    for name, variant in variants.items():
        variant["background"] = {}
        timed = min(args.bg_batches, args.media_batches) if name == "media" else args.bg_batches
        warmup = min(args.warmup, 3) if name == "media" else args.warmup
        for workers in args.worker_counts:
            result = measure_background(specs[name], workers, cfg.data.prefetch, timed, warmup)
            variant["background"][str(workers)] = result
            print(
                f"[{name}] BackgroundLoader {workers} worker(s): "
                f"{result['tokens_per_s']:,.0f} tok/s ({result['startup_s']:.2f} s to the "
                f"first batch)",
                flush=True,
            )

    text_rate = consumption(trainer["text_step"])
    for variant in variants.values():
        loaders = {"in_process": variant["in_process"]}
        loaders.update({f"background_{k}": v for k, v in variant["background"].items()})
        variant["ratio_over_text_step"] = {
            k: m["tokens_per_s"] / text_rate for k, m in loaders.items()
        }
        if "image_step" in trainer:
            image_rate = consumption(trainer["image_step"])
            variant["ratio_over_image_step"] = {
                k: m["tokens_per_s"] / image_rate for k, m in loaders.items()
            }

    report: dict[str, Any] = {
        "benchmark": "data loader tokens/s vs train_step tokens/s; packing efficiency",
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "machine": machine(load_before),
        "config": {
            "path": args.config or "configs/tiny_cpu.toml (embedded default)",
            "overrides": args.overrides,
            "data_spec": dataclasses.asdict(spec),
            "num_workers": cfg.data.num_workers,
        },
        "settings": {
            "batches": args.batches,
            "media_batches": args.media_batches,
            "warmup": args.warmup,
            "bg_batches": args.bg_batches,
            "efficiency_batches": efficiency_batches,
            "train_steps": args.train_steps,
            "train_warmup": args.train_warmup,
            "torch_threads": torch_threads,
            "tokens": "rows x seq_len per global batch, padding included",
        },
        "trainer": trainer,
        "variants": variants,
    }
    report["goals"] = goals(report, cfg.data.num_workers)

    profiles = {}
    for name, variant in variants.items():
        missed = min(variant["ratio_over_text_step"].values()) < GOAL_RATIO
        if args.profile or missed:
            timed = args.media_batches if name == "media" else args.batches
            profiles[name] = profile_loader(
                specs[name], corpora[name], timed, min(args.warmup, 5), args.profile or 15
            )
    report["profiles"] = profiles

    print_table(report)
    busy = load_before[0] if load_before else 0.0
    if busy > 0.5 * all_cores():
        print(
            f"warning: load average {busy:.1f} on {all_cores()} cores before the run: other "
            "processes slow the multi-threaded training step far more than the single-threaded "
            "loader (hence the fastest step as the denominator); timings are noisy"
        )
    for check in report["goals"]["checks"]:
        if not check["met"]:
            where = f"{check['sources']} {check.get('loader', '')}".strip()
            print(f"goal NOT met: {check['goal']} for {where}: {check['value']:.3f}")
    verdict = "all met" if report["goals"]["all_met"] else "NOT all met"
    print(f"goals (text and default sources): {verdict}")
    if "media" in variants:
        ratios = variants["media"].get("ratio_over_image_step", {})
        shown = ", ".join(f"{k} {v:.1f}x" for k, v in ratios.items())
        print(f"media-only stream (information) over the image step: {shown}")
    for name, profile in profiles.items():
        print(
            f"\n--- cProfile of the in-process loader, {name} sources, {profile['batches']} "
            f"batches, top functions by self time\n{profile['by_tottime_text']}"
        )
        print(f"--- same, by cumulative time\n{profile['by_cumulative_text']}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
