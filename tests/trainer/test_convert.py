"""`python -m trainer.convert`: HF -> our checkpoint -> training run -> HF, bit-exact."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors_dirs import read_safetensors
from trainer_runs import REPO, run_trainer

transformers = pytest.importorskip("transformers")


def convert(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "trainer.convert", *map(str, args)],
        cwd=REPO, check=True, capture_output=True, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A random tiny HF Llama 4 with a vocabulary the byte tokenizer fits in."""
    root = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    cfg = transformers.Llama4TextConfig(
        vocab_size=320, hidden_size=64, intermediate_size=32, intermediate_size_mlp=80,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_local_experts=4, interleave_moe_layer_step=2, attention_chunk_size=8, floor_scale=4,
    )  # fmt: skip
    transformers.Llama4ForCausalLM(cfg).save_pretrained(root / "hf")
    convert("from-hf", root / "hf", root / "ckpt")
    return root


def test_from_hf_then_to_hf_is_bit_identical(released):
    convert("to-hf", released / "ckpt", released / "back")
    original, back = read_safetensors(released / "hf"), read_safetensors(released / "back")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[name], back[name]) for name in original)


def test_a_run_starts_from_converted_weights(released, tmp_path):
    """Two FSDP ranks start from the converted weights; with lr 0 the exported step-1 weights
    are the released ones, bit for bit."""
    ckpt = released / "ckpt"
    result = run_trainer(
        tmp_path / "run", "--training.steps=1", "--optim.lr=0", "--model.router_bias_update_rate=0",
        f"--checkpoint.init_from={ckpt}", "--training.seq_len=64", "--training.global_batch_size=4",
        nproc=2, config=ckpt / "config.toml",
    )  # fmt: skip
    assert f"initial weights from {ckpt}" in result.stdout
    convert("to-hf", tmp_path / "run" / "checkpoints" / "step-1", tmp_path / "hf")
    original, trained = read_safetensors(released / "hf"), read_safetensors(tmp_path / "hf")
    assert all(torch.equal(original[name], trained[name]) for name in original)
    transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "hf")  # loads cleanly


def test_to_hf_without_a_config_says_where_it_looked(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "trainer.convert", "to-hf", str(tmp_path), str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0 and "no config.toml" in result.stderr
