"""Activation checkpointing: the same numbers, the same names, and the recompute really happens.

Recomputing a block replays the same float32 operations on the same inputs, so losses and
gradients are bitwise equal on CPU; the CLI runs compare per-step losses exactly as well.
"""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from trainer_runs import losses_by_step, run_trainer

from parallel.fsdp import apply_activation_checkpointing, checkpointed_layers
from trainer.checkpoint import ModelState
from trainer.config import ConfigError, ParallelConfig, load_config
from trainer.model.config import ModelConfig
from trainer.model.transformer import Transformer

TINY = ModelConfig(
    vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, dense_ffn_dim=64,
    expert_ffn_dim=32, n_experts=4, top_k=1, interleave_moe_layer_step=2, attention_chunk_size=8,
    use_qk_norm=True, floor_scale=4.0, router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
)  # fmt: skip


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(TINY)
    model.init_weights()
    return model


def loss_and_grads(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
    out = model(tokens[:, :-1])
    ce = F.cross_entropy(out.logits_BSV.flatten(0, 1), tokens[:, 1:].flatten())
    loss = ce + out.router_loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def count_attention_calls(model: Transformer) -> dict[int, int]:
    calls = dict.fromkeys(range(len(model.layers)), 0)
    for i, block in model.layers.items():

        def hook(*_, layer=int(i)):
            calls[layer] += 1

        block.attention.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize(
    ("every", "layers"), [(0, []), (1, [0, 1, 2, 3]), (2, [1, 3]), (3, [2]), (4, [3])]
)
def test_every_nth_block_is_selected(every, layers):
    assert checkpointed_layers(4, every) == layers


@pytest.mark.parametrize(("every", "mode"), [(1, "full"), (2, "every:2")])
def test_losses_and_gradients_equal_without_ac(every, mode):
    reference = tiny_model()
    model = copy.deepcopy(reference)
    assert ParallelConfig(activation_checkpointing=mode).checkpoint_every == every
    assert apply_activation_checkpointing(model, every) == checkpointed_layers(4, every)
    calls = count_attention_calls(model)
    tokens = torch.randint(0, TINY.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(reference, tokens)
    loss, grads = loss_and_grads(model, tokens)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, ref_grads[name]), name
    # Checkpointed blocks ran their forward twice (the recompute), the others once ...
    assert calls == {i: 2 if i in checkpointed_layers(4, every) else 1 for i in range(4)}
    # ... yet every MoE layer counted its tokens once: the recompute's side effects are undone.
    for layer, moe in model.moe_layers().items():
        assert torch.equal(moe.tokens_per_expert, reference.moe_layers()[layer].tokens_per_expert)
        assert moe.tokens_per_expert.sum() == tokens[:, :-1].numel() * TINY.top_k


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_saved_without_ac_loads_with_ac(tmp_path):
    saved = tiny_model(seed=0)
    dcp.save({"model": ModelState(saved)}, checkpoint_id=tmp_path)
    model = tiny_model(seed=1)
    apply_activation_checkpointing(model, 1)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in saved.named_parameters()]
    assert model.state_dict().keys() == saved.state_dict().keys()
    dcp.load({"model": ModelState(model)}, checkpoint_id=tmp_path)
    for name, tensor in saved.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("every:0", "got 'every:0'"),
        ("every", "got 'every'"),
        ("every:two", "got 'every:two'"),
        ("selective", '"none", "full" or "every:N" with N a positive integer'),
        ("every:5", "would checkpoint no block: the model has 4 .model.n_layers."),
    ],
)
def test_bad_modes_fail_clearly(mode, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_config(None, [f"--parallel.activation_checkpointing={mode}"])
    assert str(error.value).startswith("parallel.activation_checkpointing")


STEPS = ("--training.steps=3", "--data.num_workers=0")


def test_cli_full_ac_matches_and_resumes_a_checkpoint_saved_without_ac(tmp_path):
    """One run without AC (saving step 2), one with AC from scratch, one with AC resuming."""
    plain, with_ac, resumed = tmp_path / "plain", tmp_path / "ac", tmp_path / "resumed"
    run_trainer(plain, *STEPS, "--checkpoint.interval=2")
    run_trainer(
        with_ac, *STEPS, "--checkpoint.interval=0", "--parallel.activation_checkpointing=full"
    )
    reference = losses_by_step(plain)
    assert sorted(reference) == [1, 2, 3]
    assert losses_by_step(with_ac) == reference
    shutil.copytree(plain / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    result = run_trainer(
        resumed, *STEPS, "--checkpoint.interval=0", "--parallel.activation_checkpointing=full"
    )
    assert "resumed from" in result.stdout
    assert losses_by_step(resumed) == {3: reference[3]}
