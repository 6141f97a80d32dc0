"""Run configuration: typed sections loaded from TOML, overridden by `--section.key=value`.

Every key is checked: an unknown key is an error that names it and the closest valid key, and a
value of the wrong type is an error that names the key, the expected type and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.model.config import ConfigError, ModelConfig
from trainer.stages import StageConfig, stage_configs, total_steps

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny_cpu.toml"


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["data/sample/*.jsonl.zst"])
    """Document shards: paths, globs or fsspec URLs of .jsonl / .jsonl.zst files."""
    tokenizer: str = "byte"
    """"byte", "tiktoken:PATH" (a Llama 4 style ranks file) or "hf:PATH" (a tokenizer.json)."""
    mixture: str = "natural"
    """Language mixture: "natural" (by tokens), "temperature" (p ~ tokens^(1/T)) or "unimax"."""
    mixture_temperature: float = 1.0
    unimax_max_epochs: float = 4.0
    """UniMax: the most epochs any language is repeated over the run's token budget."""
    on_error: str = "raise"
    """Bad input: "raise" (the error names the file and line) or "skip" (counted by reason,
    logged, and kept in checkpoints)."""
    num_workers: int = 1
    """Background worker processes producing batches; 0 produces them in the training process."""
    prefetch: int = 2
    """Batches each worker prepares ahead."""
    max_tiles: int = 4
    """Most 336-pixel tiles per image (plus the global thumbnail when more than one)."""
    video_fps: float = 1.0
    """Frames per second sampled from videos."""
    max_frames: int = 8
    """Most frames kept per video."""
    manifest: str = ""
    """A `python -m data.prepare scan` manifest for the mixture's token counts (text and media
    blocks); empty: the text tokens are counted when the run starts."""
    passkey_fraction: float = 0.0
    """Long-context stages: share of the documents replaced by synthetic passkey documents (a
    key hidden in multilingual corpus filler, asked for at the end; data/passkey.py). Reported
    as data/passkey/share and kept out of the language mixture. 0: none."""
    passkey_tokens: int = 0
    """Tokens per passkey document, at most training.seq_len (never cut); 0: training.seq_len."""
    min_document_tokens: int = 0
    """Leave out documents of fewer tokens (bos and eos included), counted as
    data/skipped/short_document; a language left without documents drops out of the mixture
    (data/skipped/language_without_long_documents). Tokenizes the corpus at start-up. 0: off."""
    whole_long_documents: int = 0
    """Never cut a document of at least this many tokens that fits in a row: when it does not
    fit in what is left of a row, the row is padded and the document opens the next. 0: off."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.passkey_fraction <= 1.0:
            raise ConfigError(
                f"data.passkey_fraction must lie in [0, 1]; got {self.passkey_fraction}"
            )
        for key in ("passkey_tokens", "min_document_tokens", "whole_long_documents"):
            if getattr(self, key) < 0:
                raise ConfigError(f"data.{key} must be >= 0; got {getattr(self, key)}")


@dataclass
class TrainingConfig:
    steps: int = 300
    seed: int = 0
    run_dir: str = "runs/tiny_cpu"
    global_batch_size: int = 16
    """Rows (sequences) per optimizer step, over all data-parallel ranks."""
    micro_batch_size: int = 0
    """Rows per forward/backward on one rank; 0 means the whole per-rank share (no accumulation)."""
    seq_len: int = 256
    dtype: str = "float32"
    """Compute dtype: "float32" or "bfloat16" (parameters and optimizer state stay float32)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    device: str = "auto"
    """"auto" (cuda if available), "cpu" or "cuda"."""
    stop_after_steps: int = 0
    """End this invocation after this many steps (with a checkpoint) even if training.steps is
    not reached; re-running resumes. For time-limited allocations. 0: run to training.steps."""
    max_nonfinite_steps: int = 3
    """A step with a non-finite loss or gradient norm is skipped (no update); this many in a
    row roll back to the newest checkpoint and skip those batches (trainer/health.py)."""
    loss_spike_factor: float = 0.0
    """Roll back (and skip the batch) when a loss exceeds this factor times the mean of the last
    loss_spike_window losses; 0 disables."""
    loss_spike_window: int = 50
    collective_timeout_s: float = 600.0
    """A collective that has not completed after this many seconds fails the job, naming the
    operation, instead of hanging forever (a rank died or is stuck)."""


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    """The schedule decays to lr * min_lr_ratio."""
    warmup_steps: int = 20
    schedule: str = "cosine"
    """"cosine", "wsd" (warmup-stable-decay, linear decay) or "constant"."""
    decay_fraction: float = 0.2
    """WSD: the final fraction of the steps spent decaying."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    parametrization: str = "standard"
    """"standard" (one lr, the model's own init) or "metap": per-parameter-group init scales and
    lr multipliers from the model's shapes relative to the base shapes below, so that lr and
    init_std tuned at the base shapes transfer (trainer/parametrization.py has the formulas)."""
    base_width: int = 128
    """MetaP: the fan-in at which a matrix keeps model.init_std and lr x 1 (the width lr was
    tuned at; the default is configs/tiny_cpu.toml's model.dim)."""
    base_depth: int = 4
    """MetaP: the number of layers lr was tuned at (residual branches scale with it)."""
    base_batch_size: int = 0
    """MetaP: the training.global_batch_size lr was tuned at; every lr then scales with
    sqrt(global_batch_size / base_batch_size). 0: no batch-size scaling."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _require_choice("optim.parametrization", self.parametrization, ("standard", "metap"))
        for key in ("base_width", "base_depth"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"optim.{key} must be positive, got {getattr(self, key)}")
        if self.base_batch_size < 0:
            raise ConfigError(
                f"optim.base_batch_size must be >= 0 (0: no batch-size scaling), "
                f"got {self.base_batch_size}"
            )


@dataclass
class ParallelConfig:
    """Degrees of each parallelism; their meshes are described in parallel/mesh.py.

    dp_replicate x dp_shard x cp must equal the world size; ep borrows its ranks from dp_shard x cp
    and must divide that product.
    """

    dp_replicate: int = 1
    """HSDP replicas: full copies of the sharded model, gradients all-reduced across them."""
    dp_shard: int = -1
    """FSDP degree; -1 means every rank not used by dp_replicate and cp."""
    ep: int = 1
    """Expert-parallel degree (ranks borrowed from dp_shard x cp)."""
    cp: int = 1
    """Context-parallel degree: ranks splitting one sequence."""
    activation_checkpointing: str = "none"
    """Recompute block activations in backward: "none", "full" (every block) or "every:N" (the
    Nth, 2Nth, ... block)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key in ("dp_replicate", "ep", "cp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key} must be >= 1; got {getattr(self, key)}")
        if self.dp_shard < 1 and self.dp_shard != -1:
            raise ConfigError(
                f"parallel.dp_shard must be >= 1, or -1 for the rest of the ranks; "
                f"got {self.dp_shard}"
            )
        _checkpoint_interval(self.activation_checkpointing)

    @property
    def checkpoint_every(self) -> int:
        """activation_checkpointing as a block interval: 0 none, 1 full, N for "every:N"."""
        return _checkpoint_interval(self.activation_checkpointing)


def _checkpoint_interval(mode: str) -> int:
    if mode in ("none", "full"):
        return 0 if mode == "none" else 1
    prefix, _, number = mode.partition(":")
    if prefix != "every" or not number.isdigit() or int(number) < 1:
        raise ConfigError(
            'parallel.activation_checkpointing must be "none", "full" or "every:N" with N a '
            f"positive integer (checkpoint every Nth block); got {mode!r}"
        )
    return int(number)


@dataclass
class CheckpointConfig:
    interval: int = 100
    """Save every this many steps (and at the last step); 0 disables saving."""
    keep: int = 2
    """Keep the newest this many complete checkpoints; 0 keeps all."""
    resume: bool = True
    """Resume from the newest complete checkpoint in run_dir/checkpoints if there is one."""
    async_save: bool = True
    """Write checkpoints in a background thread (training waits only for an in-memory copy);
    a checkpoint counts as complete only once every rank's thread has finished."""
    init_from: str = ""
    """Model weights to start from when there is nothing to resume: a checkpoint directory (a
    run's `checkpoints/step-N` or one written by `python -m trainer.convert from-hf`)."""


@dataclass
class MetricsConfig:
    log_interval: int = 10
    tensorboard: bool = True
    peak_flops_per_device: float = 0.0
    """Peak FLOP/s of one device for MFU; 0 leaves MFU out."""


@dataclass
class FP8Config:
    """FP8 matmuls (trainer/precision): which backend, which scaling recipe, which layers."""

    backend: str = "off"
    """"off", "torch" (torch._scaled_mm; CPU and CUDA) or "te" (Transformer Engine; CUDA)."""
    recipe: str = "delayed"
    """Scaling: "delayed" (per-tensor, from an amax history), "current" (per-tensor, from the
    tensor itself), "blockwise" (1x128 activation tiles, 128x128 weight blocks, DeepSeek-V3)
    or "mxfp8" (32-element blocks, power-of-two scales; backend "te" on Blackwell only)."""
    format: str = "hybrid"
    """"hybrid": E4M3 inputs and weights, E5M2 gradients; "e4m3": E4M3 everywhere."""
    margin: int = 0
    """Scales leave 2^margin of headroom: scale = fp8_max / amax / 2^margin."""
    amax_history_len: int = 16
    """Delayed scaling: optimizer steps of amax kept per tensor."""
    amax_compute_algo: str = "max"
    """Delayed scaling: the amax a scale is computed from, "max" of the history or
    "most_recent"."""
    layers: list[str] = field(
        default_factory=lambda: ["attention", "dense_ffn", "shared_expert", "experts"]
    )
    """Linear layers run in FP8: any of "attention" (wq, wk, wv, wo), "dense_ffn",
    "shared_expert", "experts" (routed) and "output" (the head). The router, embeddings, norms
    and the vision tower always stay in the compute dtype."""
    track_saturation: bool = True
    """Count values that overflow (saturate) or underflow to zero when quantised, for metrics
    (two extra passes over each quantised tensor)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _require_choice("precision.fp8.backend", self.backend, FP8_BACKENDS)
        _require_choice("precision.fp8.recipe", self.recipe, FP8_RECIPES)
        _require_choice("precision.fp8.format", self.format, ("hybrid", "e4m3"))
        _require_choice(
            "precision.fp8.amax_compute_algo", self.amax_compute_algo, ("max", "most_recent")
        )
        if self.margin < 0 or self.amax_history_len < 1:
            raise ConfigError(
                "precision.fp8.margin must be >= 0 and precision.fp8.amax_history_len >= 1; got "
                f"{self.margin} and {self.amax_history_len}"
            )
        unknown = [name for name in self.layers if name not in FP8_LAYERS]
        if unknown or len(set(self.layers)) != len(self.layers):
            raise ConfigError(
                f"precision.fp8.layers must name distinct layer kinds among "
                f"{', '.join(FP8_LAYERS)}; got {self.layers}"
            )
        if self.recipe == "mxfp8" and self.backend == "torch":
            raise ConfigError(
                'precision.fp8.recipe = "mxfp8" needs precision.fp8.backend = "te" (MXFP8 '
                "needs Blackwell tensor cores); the torch backend has delayed, current, blockwise"
            )


FP8_BACKENDS = ("off", "torch", "te")
FP8_RECIPES = ("delayed", "current", "blockwise", "mxfp8")
FP8_LAYERS = ("attention", "dense_ffn", "shared_expert", "experts", "output")


@dataclass
class PrecisionConfig:
    fp8: FP8Config = field(default_factory=FP8Config)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    stages: list[StageConfig] = field(default_factory=list)
    """`[[stages]]`: phases with their own sequence length, batch, RoPE, schedule, cp and data
    (trainer/stages.py). When given, training.steps is derived: the stages' steps end to end."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks that need more than one field; per-field checks live in each section."""
        t, o = self.training, self.optim
        _require_choice("training.dtype", t.dtype, ("float32", "bfloat16"))
        _require_choice("training.device", t.device, ("auto", "cpu", "cuda"))
        _require_choice("optim.schedule", o.schedule, ("cosine", "wsd", "constant"))
        _require_choice("data.mixture", self.data.mixture, ("natural", "temperature", "unimax"))
        _require_choice("data.on_error", self.data.on_error, ("raise", "skip"))
        if self.data.num_workers < 0 or self.data.prefetch < 1:
            raise ConfigError("data.num_workers must be >= 0 and data.prefetch >= 1")
        _require_choice("precision.fp8.backend", self.precision.fp8.backend, FP8_BACKENDS)
        for key in ("steps", "global_batch_size", "seq_len"):
            if getattr(t, key) <= 0:
                raise ConfigError(f"training.{key} must be positive, got {getattr(t, key)}")
        if min(t.seed, t.micro_batch_size, t.stop_after_steps, o.warmup_steps) < 0:
            raise ConfigError(
                "training.seed, training.micro_batch_size, training.stop_after_steps and "
                "optim.warmup_steps must be >= 0"
            )
        if not 0.0 <= o.min_lr_ratio <= 1.0 or not 0.0 < o.decay_fraction <= 1.0:
            raise ConfigError("optim.min_lr_ratio must lie in [0, 1] and decay_fraction in (0, 1]")
        self._validate_parallel()
        if self.stages:
            self.training.steps = total_steps(self)
            stage_configs(self)  # each stage resolves to a valid config, or the error names it

    def _validate_parallel(self) -> None:
        """What needs the model or the sequence length besides ParallelConfig.

        The world size is only known at launch: `parallel.mesh.ParallelDims` checks the degrees
        against it then.
        """
        p, m, t = self.parallel, self.model, self.training
        if p.checkpoint_every > m.n_layers:
            raise ConfigError(
                f"parallel.activation_checkpointing = {p.activation_checkpointing!r} would "
                f"checkpoint no block: the model has {m.n_layers} (model.n_layers)"
            )
        if p.ep > 1 and m.n_experts % p.ep:
            raise ConfigError(
                f"parallel.ep ({p.ep}) must divide model.n_experts ({m.n_experts}): each "
                "expert-parallel rank owns n_experts / ep whole experts"
            )
        if t.seq_len % (2 * p.cp):
            raise ConfigError(
                f"training.seq_len ({t.seq_len}) must be divisible by 2 x parallel.cp "
                f"({2 * p.cp}): context parallelism cuts each row into 2 x cp equal chunks"
            )


def _require_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML file (the embedded default when None) and apply `--section.key=value` items."""
    config_path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        raw = tomllib.loads(config_path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {config_path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return build_dataclass(Config, raw, prefix="")


def parse_override(item: str) -> tuple[str, Any]:
    """`--training.steps=10` -> ("training.steps", 10); values parse as TOML, else as strings."""
    if not item.startswith("--") or "=" not in item:
        raise ConfigError(f"override {item!r} must look like --section.key=value")
    key, text = item[2:].split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
    node[leaf] = value


def build_dataclass(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    """Construct `cls` from a nested dict, checking every key and value type."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full_key = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {full_key!r}{hint}")
        kwargs[key] = _convert(hints[key], value, full_key)
    return cls(**kwargs)


def _convert(expected: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(expected):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section; got the value {value!r}")
        return build_dataclass(expected, value, prefix=f"{key}.")
    origin = typing.get_origin(expected)
    if origin is dict:  # a free-form table (stage overrides), checked by its consumer
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a table; got the value {value!r}")
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(expected)
        if isinstance(value, str):  # a single CLI value for a list key
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        return [_convert(item_type, v, key) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{key}: union-typed config fields are not supported")
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        raise ConfigError(f"{key} must be of type {expected.__name__}; got {value!r}")
    return value


# --------------------------------------------------------------------------- writing


def to_toml(config: Config) -> str:
    """The resolved config as TOML that `load_config` reads back to an equal Config."""
    lines: list[str] = []
    _write_section(dataclasses.asdict(config), [], lines)
    return "\n".join(lines).strip() + "\n"


def _write_section(values: dict[str, Any], path: list[str], lines: list[str]) -> None:
    def is_table_array(value: Any) -> bool:
        return isinstance(value, list) and bool(value) and isinstance(value[0], dict)

    scalars = {k: v for k, v in values.items() if not isinstance(v, dict) and not is_table_array(v)}
    if path and scalars:
        lines.append(f"\n[{'.'.join(path)}]")
    lines.extend(f"{key} = {_toml_value(value)}" for key, value in scalars.items())
    for key, value in values.items():
        if isinstance(value, dict):
            _write_section(value, [*path, key], lines)
    for key, value in values.items():
        if is_table_array(value):  # [[key]] entries, each followed by its own sub-tables
            for entry in value:
                lines.append(f"\n[[{'.'.join([*path, key])}]]")
                _write_array_entry(entry, [*path, key], lines)


def _write_array_entry(values: dict[str, Any], path: list[str], lines: list[str]) -> None:
    tables = {k: v for k, v in values.items() if isinstance(v, dict)}
    lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items() if k not in tables)
    for key, table in tables.items():
        if table:
            lines.append(f"[{'.'.join([*path, key])}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def main(argv: list[str] | None = None) -> None:
    """`python -m trainer.config [--config FILE] [--section.key=value ...]`: print and count."""
    from trainer.model.config import count_parameters

    args = list(sys.argv[1:] if argv is None else argv)
    path, overrides = split_cli(args)
    try:
        config = load_config(path, overrides)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    print(to_toml(config), end="")
    print(f"# parameters: {count_parameters(config.model)}")


def split_cli(args: list[str]) -> tuple[str | None, list[str]]:
    """Separate `--config FILE` (or `--config=FILE`) from the dotted overrides."""
    path = None
    overrides = []
    it = iter(args)
    for arg in it:
        if arg == "--config":
            path = next(it, None)
            if path is None:
                raise ConfigError("--config needs a file path")
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return path, overrides


if __name__ == "__main__":
    main()
