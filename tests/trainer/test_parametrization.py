"""MetaP: formulas, groups, the coordinate check across widths, and checkpoints that record it.

The coordinate check (Tensor Programs V, sec. 9 / the `mup` package's coord check): a few Adam
steps at one lr on widths 64 -> 512, then the RMS of every block's output. Under MetaP it stays
flat (within 2x); under the standard parametrisation it grows with width. Run with `-s` to see the
tables.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from trainer_runs import run_trainer

from trainer.checkpoint import OptimizerState
from trainer.config import ConfigError, OptimConfig, load_config
from trainer.model.config import ModelConfig, VisionConfig
from trainer.model.moe import grouped_matmul
from trainer.model.transformer import Transformer
from trainer.optim import build_optimizer, parameter_groups, set_lr
from trainer.parametrization import (
    build_parametrization,
    classify,
    describe,
    init_weights,
    recorded_parametrization,
    refuse_other_parametrization,
)

# DCP warns that it saves and loads in one process: that is what these tests do.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
WIDTHS = (64, 128, 256, 512)
BASE = dict(base_width=64, base_depth=2)


def coord_config(width: int) -> ModelConfig:
    """Two layers (dense, then MoE with router, routed and shared experts; the second NoPE);
    head_dim stays 16 and the heads scale with the width, as MetaP assumes."""
    return ModelConfig(
        vocab_size=256, dim=width, n_layers=2, n_heads=width // 16, n_kv_heads=width // 32,
        head_dim=16, dense_ffn_dim=2 * width, expert_ffn_dim=width, n_experts=2,
        interleave_moe_layer_step=2, nope_layer_interval=2, attention_chunk_size=0,
    )  # fmt: skip


def build(
    width: int, kind: str, lr: float, batch_size: int = 4, base_batch_size: int = 0
) -> tuple[Transformer, torch.optim.Optimizer]:
    model_cfg = coord_config(width)
    optim_cfg = OptimConfig(
        lr=lr, weight_decay=0.0, parametrization=kind, base_batch_size=base_batch_size, **BASE
    )
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    model.init_weights()
    parametrization = build_parametrization(model, model_cfg, optim_cfg, batch_size)
    init_weights(model, parametrization)
    optimizer = build_optimizer(model, optim_cfg, parametrization)
    set_lr(optimizer, lr)
    return model, optimizer


def random_tokens(rows: int, length: int) -> torch.Tensor:
    return torch.randint(0, 256, (rows, length + 1), generator=torch.Generator().manual_seed(1))


def adam_step(model: Transformer, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
    logits = model(tokens[:, :-1]).logits_BSV
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


def spread(values: list[float]) -> float:
    return max(values) / min(values)


@dataclass
class Measured:
    first_update: dict[str, float]
    """RMS of dW x for every matrix of the blocks after step 1, x its step-1 input."""
    blocks: list[tuple[float, float]]
    """Per block after STEPS steps: RMS of its output and of what it adds to its input."""


STEPS = 4


@functools.cache
def measure(width: int, kind: str) -> Measured:
    """STEPS Adam steps at lr 1e-2 on one batch of 16 random tokens.

    With far fewer tokens than the width, dW x is dominated by its part correlated with x, the
    part muP keeps width-independent (many more tokens add a part that falls as 1/sqrt(width)).
    """
    model, optimizer = build(width, kind, lr=1e-2)
    tokens = random_tokens(1, 16)
    with first_update_recorded(model) as first_update:
        adam_step(model, optimizer, tokens)
    for _ in range(STEPS - 1):
        adam_step(model, optimizer, tokens)
    blocks = []

    def record(module: nn.Module, args: tuple, output: tuple) -> None:
        blocks.append((rms(output[0]), rms(output[0] - args[0])))

    hooks = [block.register_forward_hook(record) for block in model.layers.values()]
    with torch.no_grad():
        model(tokens[:, :-1])
    for hook in hooks:
        hook.remove()
    return Measured(first_update, blocks)


@contextlib.contextmanager
def first_update_recorded(model: Transformer) -> Iterator[dict[str, float]]:
    """Fills the yielded dict with RMS(dW x) of every block matrix over the step run inside."""
    linears = {n: m for n, m in model.layers.named_modules() if isinstance(m, nn.Linear)}
    experts = {n: m for n, m in model.layers.named_modules() if n.endswith(".experts")}
    before = {n: p.detach().clone() for n, p in model.layers.named_parameters()}
    inputs: dict[str, tuple] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            inputs.setdefault(name, tuple(a.detach() for a in args))

        return hook

    hooks = [m.register_forward_pre_hook(keep(n)) for n, m in {**linears, **experts}.items()]
    sizes: dict[str, float] = {}
    yield sizes
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        for name, linear in linears.items():
            delta = linear.weight - before[f"{name}.weight"]
            sizes[name] = rms(F.linear(inputs[name][0], delta))
        for name, module in experts.items():
            x_RD, tokens_per_expert = inputs[name]
            offsets = torch.cumsum(tokens_per_expert, 0, dtype=torch.int32)
            for weight in ("w1_EDF", "w3_EDF"):
                delta = getattr(module, weight) - before[f"{name}.{weight}"]
                sizes[f"{name}.{weight}"] = rms(grouped_matmul(x_RD, delta, offsets))


def test_coordinate_check_flat_under_metap_drifts_under_standard():
    """After 4 Adam steps at lr 1e-2. Measured, widths 64 -> 512 (block output / branch RMS):
    MetaP 1.10-1.13 / 0.49-0.53 (layer 0), 1.37-1.46 / 0.51-0.57 (layer 1), at most 1.11x apart;
    standard 1.14 -> 5.64 / 0.57 -> 5.54 and 1.34 -> 6.15 / 0.37 -> 1.35 (3.6x to 9.7x)."""
    spreads = {}
    for kind in ("standard", "metap"):
        by_width = {width: measure(width, kind).blocks for width in WIDTHS}
        print(f"\n{kind}: RMS of each block's output / of its residual branch, after {STEPS} steps")
        for width, layers in by_width.items():
            print(f"  width {width:4d}: " + "  ".join(f"{o:.3f} / {b:.3f}" for o, b in layers))
        spreads[kind] = [
            tuple(spread([by_width[w][layer][i] for w in WIDTHS]) for i in (0, 1))
            for layer in range(len(by_width[WIDTHS[0]]))
        ]
    for output_spread, branch_spread in spreads["metap"]:
        assert output_spread < 2.0 and branch_spread < 2.0, spreads["metap"]
    for output_spread, branch_spread in spreads["standard"]:
        assert output_spread > 2.0 and branch_spread > 2.0, spreads["standard"]


def test_first_update_size_does_not_depend_on_width_under_metap():
    """Measured: MetaP within 1.26x across 64 -> 512 for every matrix (q/k/v/w1/w3/router
    0.15-0.17 -> 0.13, routed experts 0.10 -> 0.09, wo ~0.02, w2 0.0016); standard grows 7x (q/k/v,
    w1/w3, router) to 60x (w2)."""
    for kind in ("standard", "metap"):
        print(f"\n{kind}: RMS of dW x after step 1, widths {WIDTHS}")
        for name in measure(WIDTHS[0], kind).first_update:
            sizes = [measure(w, kind).first_update[name] for w in WIDTHS]
            print(f"  {name:38s}" + " ".join(f"{size:.4f}" for size in sizes))
            if kind == "metap":
                assert spread(sizes) < 1.5, name
            else:
                assert spread(sizes) > 3.0, name


# --------------------------------------------------------------------------- the rules


def test_standard_keeps_its_two_groups_and_draws_nothing():
    cfg = ModelConfig(interleave_moe_layer_step=2)
    model = Transformer(cfg)
    torch.manual_seed(0)
    model.init_weights()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    parametrization = build_parametrization(model, cfg, OptimConfig(), global_batch_size=16)
    rng = torch.get_rng_state()
    init_weights(model, parametrization)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    optimizer = build_optimizer(model, OptimConfig(), parametrization)
    expected = parameter_groups(model, 0.1)
    assert [g["name"] for g in optimizer.param_groups] == ["decay", "no_decay"]
    for group, want in zip(optimizer.param_groups, expected, strict=True):
        assert group["params"] == want["params"] and "lr_mult" not in group
    set_lr(optimizer, 0.25)
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25]


def test_metap_multipliers_follow_the_formulas():
    """Width 256 against base 64 (w = 1/4 where fan_in = dim), depth 8 against 2 (r = 4),
    batch 16 against 4 (g = 2)."""
    model_cfg = ModelConfig(
        dim=256, n_layers=8, n_heads=8, n_kv_heads=4, dense_ffn_dim=1024, expert_ffn_dim=512,
        interleave_moe_layer_step=2, init_std=0.02,
    )  # fmt: skip
    optim_cfg = OptimConfig(parametrization="metap", base_width=64, base_depth=2, base_batch_size=4)
    model = Transformer(model_cfg)
    rules = build_parametrization(model, model_cfg, optim_cfg, global_batch_size=16).rules
    g, s = 2.0, 0.02
    expected = {  # name: (fan_in, init std, lr multiplier)
        "tok_embeddings.weight": (None, None, g),
        "layers.0.attention.wq.weight": (256, s / 2, g / 4 / 2),
        "layers.0.attention.wo.weight": (256, s / 2 / 2, g / 4 / 4),
        "layers.0.feed_forward.w1.weight": (256, s / 2, g / 4 / 2),
        "layers.0.feed_forward.w2.weight": (1024, s / 4 / 2, g / 16 / 4),
        "layers.1.feed_forward.router.gate.weight": (256, s / 4, g / 4 / 2),
        "layers.1.feed_forward.experts.w1_EDF": (256, s / 2, g / 4 / 2),
        "layers.1.feed_forward.experts.w2_EFD": (512, s / math.sqrt(8) / 2, g / 8 / 4),
        "layers.1.feed_forward.shared_expert.w2.weight": (512, s / math.sqrt(8) / 2, g / 8 / 4),
        "layers.1.ffn_norm.weight": (None, None, g / 2),
        "norm.weight": (None, None, g),
        "output.weight": (256, 64**-0.5 / 4, g / 4),
    }
    for name, (fan_in, std, lr_mult) in expected.items():
        rule = rules[name]
        assert rule.fan_in == fan_in, name
        assert rule.init_std == pytest.approx(std) if std else rule.init_std is None, name
        assert rule.lr_mult == pytest.approx(lr_mult), name
    parametrization = build_parametrization(model, model_cfg, optim_cfg, global_batch_size=16)
    optimizer = build_optimizer(model, optim_cfg, parametrization)
    for group in optimizer.param_groups:
        decays = group["name"] not in ("embedding", "block_norms", "final_norm")
        expected_decay = optim_cfg.weight_decay / group["lr_mult"] if decays else 0.0
        assert group["weight_decay"] == pytest.approx(expected_decay), group["name"]
    set_lr(optimizer, 1e-3)
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_mult"]) for g in optimizer.param_groups)


def test_every_parameter_has_a_rule_and_exactly_one_group():
    vision = VisionConfig(
        enabled=True, dim=64, n_layers=2, n_heads=4, ffn_dim=256, adapter_dim=128, output_dim=128
    )
    model_cfg = ModelConfig(interleave_moe_layer_step=2, vision=vision)
    model = Transformer(model_cfg)
    optim_cfg = OptimConfig(parametrization="metap")
    parametrization = build_parametrization(model, model_cfg, optim_cfg, global_batch_size=16)
    optimizer = build_optimizer(model, optim_cfg, parametrization)
    ids = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    table = describe(parametrization, model, optim_cfg)
    for group in optimizer.param_groups:
        assert group["name"] in table and group["parametrization"].startswith("metap(")
    names = {group["name"] for group in optimizer.param_groups}
    assert {"router", "experts.out", "shared_expert.out", "output", "vision.projector"} <= names
    assert {"vision.adapter.in", "vision.adapter.out", "vision.patch_embedding"} <= names


def test_a_parameter_without_a_rule_is_an_error():
    with pytest.raises(ValueError, match=re.escape("no rule for parameter 'layers.0.new.weight'")):
        classify("layers.0.new.weight")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--optim.parametrization=mup", "optim.parametrization must be one of standard, metap"),
        ("--optim.base_width=0", "optim.base_width must be positive, got 0"),
        ("--optim.base_depth=-2", "optim.base_depth must be positive, got -2"),
        ("--optim.base_batch_size=-1", "optim.base_batch_size must be >= 0"),
        (
            "--optim.base_widht=64",
            "unknown config key 'optim.base_widht'; did you mean optim.base_width?",
        ),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


# --------------------------------------------------------------------------- checkpoints


def save_optimizer(path, kind: str, **batch: int) -> tuple[Transformer, torch.optim.Optimizer]:
    model, optimizer = build(64, kind, lr=1e-3, **batch)
    adam_step(model, optimizer, random_tokens(1, 8))
    dcp.save({"optim": OptimizerState(model, optimizer)}, checkpoint_id=path, no_dist=True)
    return model, optimizer


def test_checkpoint_records_the_parametrization(tmp_path):
    save_optimizer(tmp_path / "metap", "metap")
    save_optimizer(tmp_path / "standard", "standard")
    label = "metap(base_width=64, base_depth=2, base_batch_size=0)"
    assert recorded_parametrization(str(tmp_path / "metap")) == label
    assert recorded_parametrization(str(tmp_path / "standard")) == "standard"
    model, _ = build(64, "standard", lr=1e-3)
    metap = build_parametrization(
        model, coord_config(64), OptimConfig(**BASE, parametrization="metap"), 4
    )
    refuse_other_parametrization(str(tmp_path / "metap"), metap)  # the same: accepted
    with pytest.raises(ConfigError, match=re.escape(f"= {label!r}, but this run has 'standard'")):
        standard = build_parametrization(model, coord_config(64), OptimConfig(), 4)
        refuse_other_parametrization(str(tmp_path / "metap"), standard)


def test_metap_optimizer_resumes_with_this_runs_multipliers(tmp_path):
    """A later stage with 4x the batch: the same label, every multiplier doubled (sqrt rule);
    the moments come from the checkpoint, the multipliers and decays from this run."""
    saved_model, saved = save_optimizer(tmp_path, "metap", batch_size=4, base_batch_size=4)
    model, optimizer = build(64, "metap", lr=1e-3, batch_size=16, base_batch_size=4)
    model.load_state_dict(saved_model.state_dict())
    dcp.load({"optim": OptimizerState(model, optimizer)}, checkpoint_id=tmp_path, no_dist=True)
    for group, old in zip(optimizer.param_groups, saved.param_groups, strict=True):
        assert group["name"] == old["name"] and group["lr_mult"] == 2 * old["lr_mult"]
        params = zip(group["params"], old["params"], strict=True)
        assert all(
            torch.equal(optimizer.state[p]["exp_avg"], saved.state[q]["exp_avg"]) for p, q in params
        )


def test_resume_with_another_parametrization_fails(tmp_path):
    """The trainer CLI: a standard run's checkpoint refuses a MetaP resume, naming both."""
    small = (
        "--training.steps=1", "--checkpoint.interval=1", "--training.seq_len=64",
        "--training.global_batch_size=2", "--model.vision.enabled=false", "--data.num_workers=0",
        "--data.sources=data/sample/sample-00000-of-00004.jsonl.zst",
    )  # fmt: skip
    first = run_trainer(tmp_path, *small, "--metrics.tensorboard=true")
    assert "parametrization: standard" in first.stdout
    events = b"".join(path.read_bytes() for path in (tmp_path / "tb").iterdir())
    assert b"parametrization" in events
    second = run_trainer(
        tmp_path, *small, "--training.steps=2", "--optim.parametrization=metap", check=False
    )
    assert second.returncode != 0
    assert (
        "was trained with optim.parametrization = 'standard', but this run has "
        "'metap(base_width=128, base_depth=4, base_batch_size=0)'" in second.stderr
    )
