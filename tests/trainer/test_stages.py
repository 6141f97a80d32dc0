"""Staged training: [[stages]] resolve into whole configs, and a staged run trains through them.

The run: 128 -> 512 -> 2048 tokens per row on 2 gloo ranks, two steps each. The 512 stage raises
RoPE theta, halves the attention chunk and changes the temperature floor; the 2048 stage also
switches to context parallelism (cp = 2, so dp_shard drops from 2 to 1). Checked: stage
boundaries at exactly steps 2 and 4, each with a checkpoint tagged with its stage; the stage
parameters in force; and exact resume (bitwise losses) across a boundary (stopped at step 2) and
inside a stage (stopped at step 5, mid-cp stage). The first stage ends with a long-context
evaluation (trainer/eval.py), which must not disturb the training that follows.
"""

from __future__ import annotations

import json
import shutil

import pytest
from trainer_runs import REPO, losses_by_step, read_metrics, run_trainer

from trainer.config import ConfigError, load_config, to_toml
from trainer.stages import stage_at, stage_configs

STAGED = """
[[stages]]
name = "s128"
seq_len = 128
tokens = 1024
batch_tokens = 512
eval_lengths = [256]

[[stages]]
name = "s512"
seq_len = 512
tokens = 2048
batch_tokens = 1024
[stages.model]
rope_theta = 2000000.0
attention_chunk_size = 64
floor_scale = 32.0
[stages.optim]
lr = 1e-3
warmup_steps = 1
schedule = "constant"

[[stages]]
name = "s2048"
seq_len = 2048
tokens = 8192
batch_tokens = 4096
cp = 2
[stages.model]
rope_theta = 8000000.0
attention_chunk_size = 512
"""
ARGS = ("--metrics.log_interval=1", "--metrics.tensorboard=false", "--data.num_workers=0")


def staged_config(tmp_path, extra: str = ""):
    path = tmp_path / "staged.toml"
    path.write_text((REPO / "configs" / "tiny_cpu.toml").read_text() + STAGED + extra)
    return path


def test_stages_resolve_into_whole_configs(tmp_path):
    cfg = load_config(staged_config(tmp_path))
    stages = stage_configs(cfg)
    assert cfg.training.steps == 6
    assert [(s.name, s.first_step, s.last_step) for s in stages] == [
        ("s128", 1, 2),
        ("s512", 3, 4),
        ("s2048", 5, 6),
    ]
    short, mid, long = (s.config for s in stages)
    assert (short.training.seq_len, short.training.global_batch_size) == (128, 4)
    assert (mid.model.rope_theta, mid.model.attention_chunk_size, mid.model.floor_scale) == (
        2e6,
        64,
        32.0,
    )
    assert (mid.optim.lr, mid.optim.schedule) == (1e-3, "constant")
    assert (long.training.seq_len, long.training.global_batch_size, long.parallel.cp) == (
        2048,
        2,
        2,
    )
    assert long.model.floor_scale == cfg.model.floor_scale  # not overridden: the base value
    assert [s.config.training.seed for s in stages] == [0, 1, 2]  # a data stream per stage
    assert stage_at(stages, 4).name == "s512" and stage_at(stages, 5).name == "s2048"
    assert load_config(staged_config(tmp_path)) == cfg
    reread = tmp_path / "reread.toml"
    reread.write_text(to_toml(cfg))
    assert load_config(reread) == cfg


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[[stages]]\nname = "x"\nseq_len = 100\ntokens = 800\nbatch_tokens = 150\n',
         r"stages\[3\].batch_tokens \(150\) must be a multiple of stages\[3\].seq_len \(100\)"),
        ('[[stages]]\nname = "x"\nseq_len = 128\ntokens = 1000\nbatch_tokens = 512\n',
         r"stages\[3\].tokens \(1000\) must be a whole number of batches"),
        ('[[stages]]\nname = "x"\nseq_len = 128\ntokens = 512\nbatch_tokens = 512\n'
         "[stages.model]\ndim = 256\n", r"stages\[3\].model.dim cannot change between stages"),
        ('[[stages]]\nname = "s128"\nseq_len = 128\ntokens = 512\nbatch_tokens = 512\n',
         "stage names must be unique"),
        ('[[stages]]\nname = "x"\nseq_len = 128\ntokens = 512\nbatch_tokens = 512\n'
         "[stages.optim]\nschedule = 'linear'\n", r"stages\[3\]: optim.schedule must be one of"),
    ],
)  # fmt: skip
def test_bad_stages_name_the_key(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(staged_config(tmp_path, extra))


def test_a_cp_change_needs_dp_shard_to_follow(tmp_path):
    path = staged_config(tmp_path)
    with pytest.raises(ConfigError, match=r"stages\[2\].cp \(2\) differs from parallel.cp"):
        load_config(path, ["--parallel.dp_shard=2"])


def markers(run_dir) -> dict[int, dict]:
    found = {}
    for path in (run_dir / "checkpoints").glob("step-*/COMPLETE"):
        found[int(path.parent.name.split("-")[1])] = json.loads(path.read_text())
    return found


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("staged")
    run_dir = tmp / "run"
    result = run_trainer(run_dir, *ARGS, "--checkpoint.keep=0", nproc=2, config=staged_config(tmp))
    return tmp, run_dir, result


def test_a_staged_run_changes_shape_at_exact_boundaries(uninterrupted):
    _, run_dir, result = uninterrupted
    assert sorted(losses_by_step(run_dir)) == [1, 2, 3, 4, 5, 6]
    for line in (
        "stage s128: steps 1-2, seq_len 128, 4 rows, rope_theta 500000.0, chunk 128, cp 1",
        "stage s512: steps 3-4, seq_len 512, 2 rows, rope_theta 2000000.0, chunk 64, cp 1",
        "stage s2048: steps 5-6, seq_len 2048, 2 rows, rope_theta 8000000.0, chunk 512, cp 2",
    ):
        assert line in result.stdout
    tags = {step: marker["stage"] for step, marker in markers(run_dir).items()}
    assert tags[2] == "s128" and tags[4] == "s512" and tags[6] == "s2048"
    # The long-context evaluation ran where s128 ended, on both ranks, logged and saved.
    evaluated = [row for row in read_metrics(run_dir) if "eval/longctx/256/loss/mean" in row]
    assert [row["step"] for row in evaluated] == [2]
    assert 0.0 <= evaluated[0]["eval/longctx/256/passkey/token_accuracy"] <= 1.0
    assert (run_dir / "eval" / "longctx-step-2.json").exists()


@pytest.mark.parametrize("stop", [2, 5])
def test_resume_across_and_inside_a_boundary_is_exact(uninterrupted, stop):
    tmp, run_dir, _ = uninterrupted
    resumed = tmp / f"stopped_at_{stop}"
    config = staged_config(tmp)
    run_trainer(resumed, *ARGS, f"--training.stop_after_steps={stop}", nproc=2, config=config)
    assert max(losses_by_step(resumed)) == stop
    second = run_trainer(resumed, *ARGS, nproc=2, config=config)
    assert f"resumed from {resumed}/checkpoints/step-{stop}" in second.stdout
    assert losses_by_step(resumed) == losses_by_step(run_dir)  # bitwise
    shutil.rmtree(resumed)
