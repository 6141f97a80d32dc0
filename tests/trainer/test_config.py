"""Config: TOML + overrides, key and type checking, impossible combinations, real model sizes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import Config, ConfigError, load_config, parse_override, to_toml
from trainer.model.config import ModelConfig, count_parameters

REPO = Path(__file__).resolve().parents[2]


def test_embedded_default_loads():
    cfg = load_config()
    assert cfg.model.dim == 128 and cfg.training.seq_len == 256
    assert cfg.data.sources == ["data/sample/*.jsonl.zst"]


def test_overrides_parse_as_toml_values():
    cfg = load_config(
        None,
        [
            "--training.steps=7",
            "--optim.lr=1e-4",
            "--model.use_qk_norm=false",
            "--training.run_dir=/tmp/x",
            '--data.sources=["a.jsonl", "b.jsonl.zst"]',
            "--precision.fp8.backend=off",
        ],
    )
    assert cfg.training.steps == 7 and cfg.optim.lr == 1e-4 and cfg.model.use_qk_norm is False
    assert cfg.training.run_dir == "/tmp/x" and cfg.data.sources == ["a.jsonl", "b.jsonl.zst"]
    assert parse_override("--optim.lr=3") == ("optim.lr", 3)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--training.stpes=3", "unknown config key 'training.stpes'; did you mean training.steps?"),
        ("--trainin.steps=3", "unknown config key 'trainin'; did you mean training?"),
        ("--model.n_expert=3", "did you mean model.n_experts?"),
        ("--precision.fp8.backnd=off", "did you mean precision.fp8.backend?"),
    ],
)
def test_unknown_keys_name_the_key_and_the_closest(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?").replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--training.steps=ten", "training.steps must be of type int; got 'ten'"),
        ("--training.steps=1.5", "training.steps must be of type int"),
        ("--model.use_qk_norm=1", "model.use_qk_norm must be true or false"),
        ("--training=3", "training is a section"),
        ("--training.dtype=float16", "training.dtype must be one of float32, bfloat16"),
    ],
)
def test_wrong_types_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.n_heads=4", "--model.n_kv_heads=3"], "model.n_heads .4. must be a multiple"),
        (["--model.top_k=9"], r"model.top_k \(9\) must lie in \[1, model.n_experts=8\]"),
        (["--parallel.ep=3"], r"parallel.ep \(3\) must divide model.n_experts \(8\)"),
        (["--training.steps=0"], "training.steps must be positive"),
        (["--model.rope_scaling=yarn"], 'model.rope_scaling must be "none" or "llama3"'),
    ],
)
def test_impossible_combinations_fail_clearly(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[training\nsteps = 3\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_config(broken)
    with pytest.raises(ConfigError, match="must look like --section.key=value"):
        load_config(None, ["training.steps=3"])


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(REPO / "configs" / "scout.toml", ["--training.steps=11"])
    path = tmp_path / "config.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    ("name", "total", "active"),
    # Published: Scout ~109B total / 17B active, Maverick ~400B / 17B. The vision tower
    # (0.87B) is in the total; it runs on image tiles, not on every token.
    [("scout", 108.64e9, 17.17e9), ("maverick", 401.58e9, 17.18e9)],
)
def test_real_configs_report_published_parameter_counts(name, total, active):
    cfg = load_config(REPO / "configs" / f"{name}.toml")
    counts = count_parameters(cfg.model)
    assert counts.total == pytest.approx(total, rel=1e-3)
    assert counts.active == pytest.approx(active, rel=1e-3)


def test_parameter_count_matches_a_built_model():
    from trainer.model.transformer import Transformer

    for step in (1, 2):
        cfg = ModelConfig(interleave_moe_layer_step=step, n_layers=4, top_k=2)
        model = Transformer(cfg)
        assert count_parameters(cfg).total == sum(p.numel() for p in model.parameters())


def test_cli_prints_counts_and_rejects_typos():
    ok = subprocess.run(
        [sys.executable, "-m", "trainer.config", "--config", "configs/maverick.toml"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "# parameters: 401.58B total / 17.18B active" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--training.stepz=3"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "unknown config key 'training.stepz'; did you mean training.steps?" in bad.stderr


def test_config_dataclass_validates_on_construction():
    with pytest.raises(ConfigError):
        Config(training=Config().training.__class__(dtype="fp16"))


PUBLISHED = {  # the released HF config.json values of the text decoders
    "scout": dict(
        hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
        head_dim=128, intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=16,
        num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=8192,
        rope_theta=500000.0, use_qk_norm=True, vocab_size=202048, floor_scale=8192,
        rope_scaling={
            "rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
            "high_freq_factor": 1.0, "original_max_position_embeddings": 8192,
        },
    ),
    "maverick": dict(
        hidden_size=5120, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8,
        head_dim=128, intermediate_size=8192, intermediate_size_mlp=16384, num_local_experts=128,
        num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=8192,
        rope_theta=500000.0, use_qk_norm=False, vocab_size=202048, floor_scale=8192,
        rope_scaling=None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_configs_match_the_published_shapes(name):
    from trainer.model.hf import text_config_to_hf

    ours = text_config_to_hf(load_config(REPO / "configs" / f"{name}.toml").model)
    for key, value in PUBLISHED[name].items():
        assert ours[key] == value, key
