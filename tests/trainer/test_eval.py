"""Long-context evaluation (trainer/eval.py): perfect scores for a model given the answer,
chance for one that ignores the needle, loss in the right position buckets, the model left as
it was, the command on a checkpoint, and context parallelism equal to one process."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from distributed import run_distributed
from torch import nn

from data.loader import load_corpus
from data.passkey import ANSWER_END, NEEDLE_BEFORE, NEEDLE_MIDDLE, QUESTION, FillerPool
from data.tokenizer import ByteTokenizer
from trainer.config import Config, ConfigError, load_config, to_toml
from trainer.eval import bucket_edges, evaluate_long_context, longctx_scalars, main, stage_config
from trainer.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[2]
SHARD = str(REPO / "data" / "sample" / "sample-00000-of-00004.jsonl.zst")
TOKENIZER = ByteTokenizer()
VOCAB = 320
DIGITS = TOKENIZER.encode("0123456789")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def filler() -> FillerPool:
    return FillerPool(load_corpus((SHARD,), "raise", "byte").documents, TOKENIZER)


def find(tokens: list[int], pattern: list[int], start: int = 0) -> int:
    """Where `pattern` (bytes) first occurs in `tokens` from `start`; specials never match."""
    return bytes(t if t < 256 else 0 for t in tokens).find(bytes(pattern), start)


class Oracle(nn.Module):
    """Reads the key from the needle in its input and, after the question, puts all the logit
    mass on the key's next digit. Looks only at tokens up to each position (causal)."""

    def forward(self, tokens_BS, positions_BS=None, document_ids_BS=None):
        logits = torch.zeros(*tokens_BS.shape, VOCAB)
        before, middle = TOKENIZER.encode(NEEDLE_BEFORE), TOKENIZER.encode(NEEDLE_MIDDLE)
        question = TOKENIZER.encode(QUESTION)
        for b, row in enumerate(tokens_BS.tolist()):
            start = find(row, before) + len(before)
            key = row[start : find(row, middle, start)]
            asked = find(row, question, start) + len(question)
            for j, digit in enumerate(key):
                logits[b, asked - 1 + j, digit] = 100.0
        return logits


class IgnoresTheNeedle(nn.Module):
    """Random logits over the digits (a seeded generator), nothing else possible."""

    def __init__(self):
        super().__init__()
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, tokens_BS, positions_BS=None, document_ids_BS=None):
        logits = torch.full((*tokens_BS.shape, VOCAB), -math.inf)
        logits[..., DIGITS] = torch.randn(*tokens_BS.shape, 10, generator=self.generator)
        return logits


class Ramp(nn.Module):
    """Uniform logits but for token 0 (never in text), whose logit grows with the position:
    the loss predicting token t + 1 is log(exp(SLOPE * t) + VOCAB - 1)."""

    SLOPE = 0.01

    def forward(self, tokens_BS, positions_BS=None, document_ids_BS=None):
        logits = torch.zeros(*tokens_BS.shape, VOCAB)
        logits[..., 0] = self.SLOPE * positions_BS.float()
        return logits


def test_an_oracle_scores_exact_match_at_every_length_and_depth(filler):
    results = evaluate_long_context(
        Oracle(), TOKENIZER, [256, 1024, 4096], filler=filler, samples=2, depths=DEPTHS
    )
    for r in results["lengths"].values():
        assert r["passkey"]["exact_match"] == 1.0 and r["passkey"]["token_accuracy"] == 1.0
        assert all(s["exact_match"] == 1.0 for s in r["passkey"]["by_depth"].values())
        assert r["documents"] == 10


def test_a_model_that_ignores_the_needle_scores_chance(filler):
    results = evaluate_long_context(
        IgnoresTheNeedle(), TOKENIZER, [256, 512], filler=filler, samples=8, depths=DEPTHS
    )
    # 2 lengths x 5 depths x 8 samples x 5 digits = 400 digits, each right with p = 0.1:
    # standard deviation 0.015, tolerance 0.05 (3.3 sigma; the draws are seeded).
    accuracy = np.mean([r["passkey"]["token_accuracy"] for r in results["lengths"].values()])
    assert abs(accuracy - 0.1) < 0.05
    assert all(r["passkey"]["exact_match"] == 0.0 for r in results["lengths"].values())


def test_loss_is_bucketed_by_position_up_to_the_question(filler):
    length, samples = 2048, 2
    results = evaluate_long_context(
        Ramp(), TOKENIZER, [length], filler=filler, samples=samples, depths=(0.0, 1.0), buckets=8
    )
    r = results["lengths"][str(length)]
    edges = [0, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert r["loss"]["edges"] == edges == bucket_edges(length, 8)
    tail = len(TOKENIZER.encode(QUESTION)) + 5 + len(TOKENIZER.encode(ANSWER_END)) + 1  # + eos
    question = length - tail  # targets 1 .. question - 1 are scored
    documents = 2 * samples
    for lo, hi, mean, n in zip(
        edges, edges[1:], r["loss"]["mean"], r["loss"]["tokens"], strict=False
    ):
        targets = np.arange(max(lo, 1), min(hi, question))
        assert n == documents * len(targets)
        want = np.log(np.exp(Ramp.SLOPE * (targets - 1)) + VOCAB - 1).mean()
        assert math.isfinite(mean) and mean == pytest.approx(want, rel=1e-6)
    scalars = longctx_scalars(results)
    assert scalars[f"eval/longctx/{length}/loss/1024-2048"] == r["loss"]["mean"][-1]
    assert {"passkey/exact_match", "passkey/depth_1/exact_match", "loss/mean"} <= {
        k.split(f"{length}/", 1)[1] for k in scalars
    }


def tiny_model_config() -> Config:
    """configs/tiny_cpu.toml's model, narrower and without the vision tower."""
    cfg = load_config(None)
    vision = replace(cfg.model.vision, enabled=False)
    small = dict(dim=64, dense_ffn_dim=128, expert_ffn_dim=64, n_experts=4, vision=vision)
    return replace(cfg, model=replace(cfg.model, **small))


def test_the_model_comes_back_in_training_mode_with_its_expert_loads(filler):
    torch.manual_seed(0)
    model = Transformer(tiny_model_config().model)
    model.init_weights()
    loads = {i: torch.arange(4.0) + i for i in model.moe_layers()}
    for i, moe in model.moe_layers().items():
        moe.tokens_per_expert.copy_(loads[i])
    results = evaluate_long_context(model, TOKENIZER, [256], filler=filler, depths=(0.5,))
    assert model.training
    for i, moe in model.moe_layers().items():
        assert torch.equal(moe.tokens_per_expert, loads[i])
    r = results["lengths"]["256"]
    assert all(math.isfinite(m) for m in r["loss"]["mean"])
    assert r["loss_mean"] == pytest.approx(math.log(VOCAB), rel=0.2)  # untrained


def test_the_command_evaluates_a_checkpoint_to_json_and_tensorboard(tmp_path, capsys):
    cfg = tiny_model_config()
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights()
    step_dir = tmp_path / "run" / "checkpoints" / "step-7"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(step_dir), no_dist=True)
    (tmp_path / "run" / "config.toml").write_text(to_toml(cfg))  # found at ../../config.toml
    out = tmp_path / "longctx.json"
    main(
        ["longctx", "--checkpoint", str(step_dir), "--lengths", "256,512", "--depths", "0,1"]
        + ["--sources", SHARD, "--out", str(out), "--tensorboard", str(tmp_path / "tb")]
    )
    results = json.loads(out.read_text())
    assert results["step"] == 7 and set(results["lengths"]) == {"256", "512"}
    filler = FillerPool.from_sources([SHARD], "byte")
    want = evaluate_long_context(model, TOKENIZER, [512], filler=filler, depths=(0.0, 1.0))
    got = results["lengths"]["512"]
    assert got["loss"]["mean"] == pytest.approx(want["lengths"]["512"]["loss"]["mean"], rel=1e-6)
    assert got["passkey"] == want["lengths"]["512"]["passkey"]
    table = capsys.readouterr().out
    assert "L=    256" in table and "passkey exact" in table
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def _evaluate_under_context_parallelism(rank: int, world_size: int) -> dict:
    from parallel.fsdp import parallelize_model
    from parallel.mesh import ParallelDims

    torch.manual_seed(0)
    model = Transformer(tiny_model_config().model)
    model.init_weights()
    meshes = ParallelDims(1, 1, 1, world_size, world_size).build_mesh("cpu")
    parallelize_model(model, meshes, torch.float32, 0)
    filler = FillerPool(load_corpus((SHARD,), "raise", "byte").documents, TOKENIZER)
    return evaluate_long_context(model, TOKENIZER, [256], filler=filler, depths=(0.0, 1.0))


def test_context_parallel_ranks_report_what_one_process_does(filler):
    torch.manual_seed(0)
    model = Transformer(tiny_model_config().model)
    model.init_weights()
    want = evaluate_long_context(model, TOKENIZER, [256], filler=filler, depths=(0.0, 1.0))
    for got in run_distributed(_evaluate_under_context_parallelism, world_size=2):
        g, w = got["lengths"]["256"], want["lengths"]["256"]
        assert g["loss"]["tokens"] == w["loss"]["tokens"]  # each position on one rank
        assert g["loss"]["mean"] == pytest.approx(w["loss"]["mean"], rel=1e-5)
        assert g["passkey"] == w["passkey"]


def test_a_checkpoint_is_evaluated_with_the_model_settings_of_its_stage(tmp_path):
    pytest.importorskip("trainer.stages")
    stages = """
[[stages]]
name = "short"
seq_len = 128
tokens = 1024
batch_tokens = 512
[[stages]]
name = "long"
seq_len = 512
tokens = 2048
batch_tokens = 1024
[stages.model]
rope_theta = 8000000.0
"""
    path = tmp_path / "config.toml"
    path.write_text((REPO / "configs" / "tiny_cpu.toml").read_text() + stages)
    cfg = load_config(path)
    assert stage_config(cfg, 2, None).model.rope_theta == cfg.model.rope_theta  # steps 1-2
    assert stage_config(cfg, 3, None).model.rope_theta == 8000000.0  # steps 3-4
    assert stage_config(cfg, 1, "long").training.seq_len == 512
    with pytest.raises(ConfigError, match="the run's stages are"):
        stage_config(cfg, 1, "medium")
