"""Staged training: `[[stages]]` in the config, each a phase of the run with its own shape.

Llama 3 grew its context 8K -> 128K in six stages and Llama 4 Scout trained at 256K in
mid-training; each stage changes the sequence length, the batch, RoPE, attention chunking,
temperature tuning, the learning-rate schedule, the context-parallel degree and the data. A
stage is written in TOML as

    [[stages]]
    name = "ctx32k"
    seq_len = 32768
    tokens = 2_000_000_000          # the stage's token budget
    batch_tokens = 4_194_304        # the global batch, in tokens (rows = batch_tokens / seq_len)
    cp = 4                          # parallel.cp during the stage
    eval_lengths = [16384, 32768]   # long-context evaluation when the stage ends (optional)
    [stages.model]                  # overrides of [model]: RoPE, chunking, temperature only
    rope_theta = 8000000.0
    attention_chunk_size = 16384
    [stages.optim]                  # overrides of [optim]: the stage's own schedule
    lr = 1e-4
    warmup_steps = 50
    [stages.data]                   # overrides of [data], e.g. long-document sources
    sources = ["long/*.jsonl.zst"]
    passkey_fraction = 0.1

A stage runs tokens / batch_tokens optimizer steps; the run's steps are the stages' steps end to
end (training.steps is then derived). `stage_configs` resolves every stage into a complete,
validated Config, so a stage is trained by the same code as an unstaged run. Without [[stages]]
the run is a single stage made of the config itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainer.model.config import ConfigError

if TYPE_CHECKING:
    from trainer.config import Config

MODEL_KEYS = (
    "rope_theta",
    "rope_scaling",
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_position",
    "attention_chunk_size",
    "attn_temperature_tuning",
    "floor_scale",
    "attn_scale",
)
"""Model keys a stage may change: none of them changes a parameter's shape."""


@dataclass
class StageConfig:
    name: str = ""
    seq_len: int = 0
    tokens: int = 0
    """The stage's token budget: it runs tokens / batch_tokens optimizer steps."""
    batch_tokens: int = 0
    """Global batch in tokens; a multiple of seq_len."""
    cp: int = 1
    """parallel.cp during this stage (parallel.dp_shard = -1 then takes the remaining ranks)."""
    eval_lengths: list[int] = field(default_factory=list)
    """Sequence lengths of the long-context evaluation run when the stage ends; empty: none."""
    model: dict[str, Any] = field(default_factory=dict)
    """Overrides of [model] keys, only those in MODEL_KEYS."""
    optim: dict[str, Any] = field(default_factory=dict)
    """Overrides of [optim] keys: the stage's schedule runs over the stage's steps."""
    data: dict[str, Any] = field(default_factory=dict)
    """Overrides of [data] keys."""

    @property
    def steps(self) -> int:
        return self.tokens // self.batch_tokens

    def check(self, key: str) -> None:
        if not self.name:
            raise ConfigError(f"{key}.name must be set")
        for what in ("seq_len", "tokens", "batch_tokens", "cp"):
            if getattr(self, what) < 1:
                raise ConfigError(f"{key}.{what} must be >= 1; got {getattr(self, what)}")
        if self.batch_tokens % self.seq_len:
            raise ConfigError(
                f"{key}.batch_tokens ({self.batch_tokens}) must be a multiple of {key}.seq_len "
                f"({self.seq_len})"
            )
        if self.tokens % self.batch_tokens:
            raise ConfigError(
                f"{key}.tokens ({self.tokens}) must be a whole number of batches of "
                f"{key}.batch_tokens ({self.batch_tokens})"
            )
        for name in self.model:
            if name not in MODEL_KEYS:
                raise ConfigError(
                    f"{key}.model.{name} cannot change between stages (parameters keep their "
                    f"shapes); a stage may set: {', '.join(MODEL_KEYS)}"
                )


@dataclass(frozen=True)
class Stage:
    """A resolved stage: its place in the run and the complete config it trains with."""

    index: int
    name: str
    first_step: int
    last_step: int
    config: Config
    eval_lengths: tuple[int, ...] = ()
    run_steps: int = 0
    """The last step of the whole run (of the final stage)."""

    @property
    def final(self) -> bool:
        return self.last_step == self.run_steps

    @property
    def steps(self) -> int:
        return self.last_step - self.first_step + 1

    def local_step(self, step: int) -> int:
        """The 1-based step inside the stage: what the stage's lr schedule runs on."""
        return step - self.first_step + 1


def stage_configs(cfg: Config) -> list[Stage]:
    """Every stage of the run, resolved; a config without [[stages]] is one stage."""
    if not cfg.stages:
        return [Stage(0, "main", 1, cfg.training.steps, cfg, run_steps=cfg.training.steps)]
    stages, first = [], 1
    for index, stage in enumerate(cfg.stages):
        stage.check(f"stages[{index}]")
        resolved = _resolve(cfg, stage, index)
        last = first + stage.steps - 1
        stages.append(Stage(index, stage.name, first, last, resolved, tuple(stage.eval_lengths)))
        first = last + 1
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique; got {names}")
    return [dataclasses.replace(s, run_steps=first - 1) for s in stages]


def total_steps(cfg: Config) -> int:
    return sum(stage.steps for stage in cfg.stages)


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that optimizer step `step` (1-based) belongs to; past the end, the last."""
    for stage in stages:
        if step <= stage.last_step:
            return stage
    return stages[-1]


def _resolve(cfg: Config, stage: StageConfig, index: int) -> Config:
    key = f"stages[{index}]"
    from trainer.config import Config, build_dataclass

    raw = dataclasses.asdict(cfg)
    raw["stages"] = []
    raw["model"].update(stage.model)
    raw["optim"].update(stage.optim)
    raw["data"].update(stage.data)
    raw["training"].update(
        seq_len=stage.seq_len,
        global_batch_size=stage.batch_tokens // stage.seq_len,
        steps=stage.steps,
    )
    if stage.cp != cfg.parallel.cp and cfg.parallel.dp_shard != -1:
        raise ConfigError(
            f"{key}.cp ({stage.cp}) differs from parallel.cp ({cfg.parallel.cp}): set "
            "parallel.dp_shard = -1 so the data-parallel degree follows the stage's cp"
        )
    raw["parallel"]["cp"] = stage.cp
    # Each stage draws its own data stream; stage 0's is the unstaged run's.
    raw["training"]["seed"] = cfg.training.seed + index
    try:
        return build_dataclass(Config, raw, prefix="")
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
