"""Convert a built Transformer to FP8, step its delayed scales, and read its FP8 metrics.

    summary = apply_fp8(model, cfg.precision.fp8, amax_group=dist.group.WORLD, ep_size=p.ep)
    ...  # parallelize_model, optimizer; then every step, after the last backward:
    update_fp8_scales(model)          # delayed recipe: one all-reduce (MAX) of all amaxes
    ...  # at the log interval, on every rank:
    scalars = fp8_scalars(fp8_metrics(model))

Conversion swaps modules in place and keeps every parameter object and name, so optimizer groups,
checkpoints and HF conversion see the same weights. What it adds are the `*.fp8.*` buffers
(`amax_history`, `scale`) of the delayed recipe (TE: `*._extra_state`); every other recipe adds
nothing to the state dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from trainer.config import FP8Config
from trainer.model.moe import FeedForward, GroupedExperts, MoE
from trainer.precision import te as te_backend
from trainer.precision.experts import Fp8GroupedExperts
from trainer.precision.fp8 import E4M3, E5M2, Recipe
from trainer.precision.linear import Fp8Linear
from trainer.precision.scaling import Fp8Scaling

STAT_NAMES = ("amax", "scale", "overflow", "underflow")


@dataclass
class Fp8Summary:
    backend: str
    recipe: str
    converted: list[str] = field(default_factory=list)
    """Names of the modules that now run in FP8."""
    kept: list[str] = field(default_factory=list)
    """Names of the linear layers (and grouped experts) left in the compute dtype."""

    def __str__(self) -> str:
        if self.backend == "off":
            return "fp8: off"
        return (
            f"fp8: {self.backend} backend, {self.recipe} scaling; {len(self.converted)} layers "
            f"in FP8, {len(self.kept)} kept in higher precision"
        )


def recipe_from(cfg: FP8Config) -> Recipe:
    if cfg.recipe == "mxfp8":
        raise ValueError(
            'precision.fp8.recipe = "mxfp8" needs precision.fp8.backend = "te" (Blackwell)'
        )
    return Recipe(
        scaling=cfg.recipe,
        forward_dtype=E4M3,
        backward_dtype=E5M2 if cfg.format == "hybrid" else E4M3,
        margin=cfg.margin,
        amax_history_len=cfg.amax_history_len,
        amax_compute_algo=cfg.amax_compute_algo,
        track_saturation=cfg.track_saturation,
    )


def apply_fp8(
    model: nn.Module,
    cfg: FP8Config,
    amax_group: dist.ProcessGroup | None = None,
    ep_size: int = 1,
) -> Fp8Summary:
    """Convert the layers `cfg.layers` selects of a built `Transformer`, in place.

    Call after `init_weights()` and before `parallelize_model` (expert parallelism hooks and
    FSDP wrap the modules this swaps). `amax_group`: the ranks whose delayed-scaling amaxes are
    reduced (MAX) so that all use the same scales; pass every rank that sees other data or holds
    other experts (the default group), or None for one process. `ep_size`: parallel.ep, the TE
    backend's per-rank expert count (the torch backend's state does not depend on it).
    """
    summary = Fp8Summary(cfg.backend, cfg.recipe)
    if cfg.backend == "off":
        return summary
    _check_not_parallelized(model)
    chosen = _select_layers(model, set(cfg.layers))
    if cfg.backend == "torch":
        recipe = recipe_from(cfg)

        def convert(module: nn.Module) -> nn.Module:
            if isinstance(module, GroupedExperts):
                return Fp8GroupedExperts.from_experts(module, recipe, amax_group)
            return Fp8Linear.from_linear(module, recipe, amax_group)

    else:
        te_recipe = te_backend.te_recipe(
            cfg.recipe, cfg.format, cfg.margin, cfg.amax_history_len, cfg.amax_compute_algo
        )

        def convert(module: nn.Module) -> nn.Module:
            if isinstance(module, GroupedExperts):
                return te_backend.TeGroupedExperts.from_experts(
                    module, module.w1_EDF.shape[0] // ep_size
                )
            return te_backend.te_linear(module)

    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, convert(model.get_submodule(name)))
    if cfg.backend == "te":
        te_backend.wrap_forward(model, te_recipe, amax_group)
    summary.converted = chosen
    summary.kept = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, GroupedExperts)) and name not in chosen
        and not isinstance(module, (Fp8Linear, Fp8GroupedExperts))
    ]  # fmt: skip
    return summary


def _select_layers(model: nn.Module, kinds: set[str]) -> list[str]:
    """Module names of the layer kinds chosen: "attention", "dense_ffn", "shared_expert",
    "experts", "output"."""
    names = []
    for i, block in model.layers.items():
        prefix = f"layers.{i}"
        if "attention" in kinds:
            names += [f"{prefix}.attention.{w}" for w in ("wq", "wk", "wv", "wo")]
        ffn = block.feed_forward
        if isinstance(ffn, FeedForward) and "dense_ffn" in kinds:
            names += [f"{prefix}.feed_forward.{w}" for w in ("w1", "w3", "w2")]
        if isinstance(ffn, MoE) and "shared_expert" in kinds:
            names += [f"{prefix}.feed_forward.shared_expert.{w}" for w in ("w1", "w3", "w2")]
        if isinstance(ffn, MoE) and "experts" in kinds:
            names.append(f"{prefix}.feed_forward.experts")
    if "output" in kinds:
        names.append("output")
    return names


def _check_not_parallelized(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "_expert_parallel") or isinstance(module, (Fp8Linear, Fp8Scaling)):
            raise ValueError(
                "apply_fp8 must run once, on the plain model, before parallelize_model "
                "(expert parallelism and FSDP wrap the modules it replaces)"
            )
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("apply_fp8 must run before FSDP (the parameters are already DTensors)")


# --------------------------------------------------------------------------- per step


def fp8_states(model: nn.Module) -> list[tuple[str, Fp8Scaling]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Fp8Scaling)]


@torch.no_grad()
def update_fp8_scales(model: nn.Module) -> None:
    """Close the step for delayed scaling: reduce every amax (one all-reduce), roll, rescale.

    Call on every rank once per optimizer step, after the last backward of the step. A no-op
    for other recipes and for the TE backend (TE updates its own state).
    """
    states = [m for _, m in fp8_states(model) if m.delayed]
    if not states:
        return
    amax = torch.cat([m.current_amax() for m in states])
    group = states[0].amax_group
    if group is not None:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    ready = []
    for state, part in zip(states, amax.split([m.scale.numel() for m in states]), strict=True):
        ready.append(state.update(part))
    flags = torch.cat(ready).tolist()  # note: a host sync, once per step
    start = 0
    for state in states:
        state._ready = flags[start : start + state.scale.numel()]
        start += state.scale.numel()


def is_fp8_state_key(name: str) -> bool:
    """True for the state-dict entries FP8 adds: our `*.fp8.*` buffers and TE's `_extra_state`.

    Loading weights only (`checkpoint.init_from`, HF export) should skip them: the scaling
    state belongs to a run, and a checkpoint written without FP8 has none.
    """
    return ".fp8." in name or name.startswith("fp8.") or name.endswith("_extra_state")


def reset_fp8_state(model: nn.Module) -> None:
    """Zero all FP8 scaling state (e.g. after `to_empty` on a model converted on meta)."""
    for _, state in fp8_states(model):
        state.reset()


# --------------------------------------------------------------------------- metrics


def fp8_metrics(model: nn.Module, reduce: bool = True) -> dict[str, dict[str, float]]:
    """Per FP8 layer, per tensor: amax, scale, overflow and underflow counts since the last call.

    Keys: layer name -> {"input_amax", "weight_scale", "grad_output_overflow", ...}; the routed
    experts prefix the GEMM ("w1.input_amax"). For blockwise scaling "scale" is the smallest
    tile/block scale used. With `reduce` and an amax group, amaxes are the MAX and counts the SUM
    over ranks (two collectives: call on every rank); scales are this rank's. Resets the counts.
    """
    states = fp8_states(model)
    if not states:
        return {}
    stats = torch.cat([m.pop_stats() for _, m in states], dim=1)  # (4, all columns)
    group = states[0][1].amax_group
    if reduce and group is not None:
        dist.all_reduce(stats[0], op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(stats[2:], op=dist.ReduceOp.SUM, group=group)
    values = stats.tolist()  # note: a host sync, at the log interval only
    metrics, column = {}, 0
    for name, state in states:
        layer = {}
        for tensor in state.column_names():
            for row, stat in enumerate(STAT_NAMES):
                layer[f"{tensor}_{stat}"] = values[row][column]
            column += 1
        metrics[name.removesuffix(".fp8")] = layer
    return metrics


def fp8_scalars(metrics: dict[str, dict[str, float]], prefix: str = "fp8") -> dict[str, float]:
    """Flat TensorBoard scalars `fp8/<layer>/<stat>`, plus overflow/underflow totals."""
    scalars = {
        f"{prefix}/{layer}/{k}": v for layer, stats in metrics.items() for k, v in stats.items()
    }
    for kind in ("overflow", "underflow"):
        scalars[f"{prefix}/{kind}_total"] = sum(
            v for stats in metrics.values() for k, v in stats.items() if k.endswith(kind)
        )
    return scalars
