"""Transformer Engine backend: TE's `Linear` and `GroupedLinear` under TE's autocast.

Written against TE's documented PyTorch API (`transformer_engine.pytorch.Linear`,
`GroupedLinear`, `Fp8Padding`/`Fp8Unpadding`, `autocast(recipe=..., amax_reduction_group=...)`,
formerly `fp8_autocast(fp8_recipe=..., fp8_group=...)`, and the recipes `DelayedScaling`,
`Float8CurrentScaling`, `Float8BlockScaling`, `MXFP8BlockScaling`). TE is imported only when this
backend is chosen; it needs CUDA. Its tests skip where TE cannot be imported.

Parameter names stay ours. A dense layer becomes a `te.pytorch.Linear` with the same `weight`
(out, in); TE adds `_extra_state` (its FP8 scaling state) to the state dict, which checkpoints
carry. The routed experts keep w1_EDF / w3_EDF / w2_EFD: each forward hands TE's GroupedLinear
(whose own weight parameters are removed) per-expert (out, in) copies of them, so gradients flow
to our stacked parameters.

Note: TE reduces delayed-scaling amaxes when the autocast region exits; the model's forward is
wrapped in one region (`fp8_context`). An activation-checkpoint recompute runs in backward,
outside that region, so with activation checkpointing the recompute must enter `fp8_context(model)`
as well (parallel/fsdp.py's `recompute_context`); TE recommends `te.pytorch.checkpoint` for
delayed scaling.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.model.moe import GroupedExperts


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError):  # not installed, or no CUDA libraries
        return False
    return True


def _te() -> Any:
    try:
        import transformer_engine.pytorch as te
    except (ImportError, OSError, RuntimeError) as e:
        raise ImportError(
            'precision.fp8.backend = "te" needs Transformer Engine (pip install '
            f"'fusiontrain[te]', on a CUDA machine): {e}"
        ) from e
    return te


def te_recipe(recipe: str, fmt: str, margin: int, history_len: int, algo: str) -> Any:
    """The TE recipe object for `precision.fp8.recipe` and its settings."""
    _te()  # a clear error when TE is missing
    from transformer_engine.common import recipe as te_recipes

    fp8_format = te_recipes.Format.HYBRID if fmt == "hybrid" else te_recipes.Format.E4M3
    if recipe == "delayed":
        return te_recipes.DelayedScaling(
            margin=margin,
            fp8_format=fp8_format,
            amax_history_len=history_len,
            amax_compute_algo=algo,
        )
    classes = {
        "current": te_recipes.Float8CurrentScaling,
        "blockwise": te_recipes.Float8BlockScaling,
        "mxfp8": te_recipes.MXFP8BlockScaling,
    }
    return classes[recipe](fp8_format=fp8_format)


def te_linear(linear: nn.Linear) -> nn.Module:
    """A `te.pytorch.Linear` holding a copy of `linear`'s weight under the same name."""
    te = _te()
    weight = linear.weight
    converted = te.Linear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        params_dtype=weight.dtype,
        device=weight.device,
    )
    with torch.no_grad():
        converted.weight.copy_(weight)
        if linear.bias is not None:
            converted.bias.copy_(linear.bias)
    return converted


class TeGroupedExperts(GroupedExperts):
    """Routed experts on TE's GroupedLinear; our stacked parameters, TE's FP8 GEMMs."""

    @classmethod
    def from_experts(cls, experts: GroupedExperts, n_local: int) -> TeGroupedExperts:
        """`n_local`: the experts one rank will hold (E / parallel.ep), TE's GEMM count."""
        te = _te()
        _, dim, hidden = experts.w1_EDF.shape
        with torch.device("meta"):
            converted = cls(n_local, dim, hidden)
        converted.w1_EDF, converted.w3_EDF = experts.w1_EDF, experts.w3_EDF
        converted.w2_EFD = experts.w2_EFD
        device, dtype = experts.w1_EDF.device, experts.w1_EDF.dtype
        shapes = {"te_w1": (dim, hidden), "te_w3": (dim, hidden), "te_w2": (hidden, dim)}
        for name, (n_in, n_out) in shapes.items():
            grouped = te.GroupedLinear(
                n_local, n_in, n_out, bias=False, params_dtype=dtype, device=device
            )
            for i in range(n_local):  # the weights come from our stacks at each forward
                del grouped._parameters[f"weight{i}"]
            setattr(converted, name, grouped)
        converted.pad, converted.unpad = te.Fp8Padding(n_local), te.Fp8Unpadding(n_local)
        return converted

    def forward(self, x_RD: torch.Tensor, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        splits = tokens_per_expert_E.tolist()  # note: a host sync; TE takes Python splits
        x_RD, padded = self.pad(x_RD, splits)
        gate = self._grouped(self.te_w1, self.w1_EDF, x_RD, padded)
        up = self._grouped(self.te_w3, self.w3_EDF, x_RD, padded)
        out = self._grouped(self.te_w2, self.w2_EFD, torch.nn.functional.silu(gate) * up, padded)
        return self.unpad(out, splits)

    @staticmethod
    def _grouped(
        grouped: nn.Module, w_EIO: torch.Tensor, x: torch.Tensor, splits: list[int]
    ) -> torch.Tensor:
        if w_EIO.shape[0] != len(splits):
            raise ValueError(
                f"TE experts were built for {len(splits)} local experts but hold "
                f"{w_EIO.shape[0]}; pass apply_fp8(..., ep_size=parallel.ep)"
            )
        for i in range(w_EIO.shape[0]):
            object.__setattr__(grouped, f"weight{i}", w_EIO[i].t().contiguous())  # (out, in)
        return grouped(x, splits)


def fp8_context(model: nn.Module) -> contextlib.AbstractContextManager:
    """TE's autocast with the model's recipe and amax group; a null context without TE."""
    settings = getattr(model, "_te_fp8", None)
    if settings is None:
        return contextlib.nullcontext()
    te = _te()
    recipe, group = settings
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe, amax_reduction_group=group)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe, fp8_group=group)


def wrap_forward(model: nn.Module, recipe: Any, amax_group: dist.ProcessGroup | None) -> None:
    """Run `model.forward` inside TE's autocast (replaced on the instance, names unchanged)."""
    model._te_fp8 = (recipe, amax_group)
    forward = model.forward

    @functools.wraps(forward)
    def fp8_forward(*args, **kwargs):
        with fp8_context(model):
            return forward(*args, **kwargs)

    model.forward = fp8_forward
