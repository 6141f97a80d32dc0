"""The scaling state of one FP8 module, kept in buffers so checkpoints carry it.

Every FP8 GEMM quantises three tensors, its *roles*: the input, the weight and (in backward) the
output gradient. A module with G GEMMs (a linear layer: 1; the routed experts: 3) has C = 3 * G
columns of state, column `3 * gemm + role`.

Delayed scaling (Transformer Engine's `DelayedScaling`, per tensor):
- `amax_history` (history_len, C), persistent. Row 0 is the current step's slot: every
  quantisation max-accumulates its tensor's amax there (over micro-batches, and over the
  activation-checkpoint recompute, which sees the same values).
- `scale` (C,), persistent. What forward and backward multiply by. It changes only in `update`.
- `update(amax_C)` runs once per OPTIMIZER STEP (`trainer.precision.update_fp8_scales`): row 0
  becomes the amax reduced (MAX) over the amax group, the scale is recomputed from the history
  ("max" over it, or the "most_recent" row 0) as fp8_max / amax / 2^margin, kept unchanged where
  that amax is 0 or not finite, then the history rolls by one and row 0 is zeroed. This is TE's
  update rule (`nvte_delayed_scaling_recipe_amax_and_scale_update`) run per step instead of per
  forward: the same thing with one micro-batch per step, and with several it makes the scales
  independent of how a step is split into micro-batches, and the recompute of an activation
  checkpoint bit-identical to the forward it replays.
- A column whose scale is still 0 (before the first update) is scaled from its own amax (reduced
  over the amax group, so that every rank uses the same scale): the first step is current-scaled
  instead of starting, as TE does, from scale 1, which flushes small gradients to zero.

Current and blockwise scaling keep no persistent state: their scales come from the tensor (or
tile, or block) being quantised. All recipes keep non-persistent statistics for metrics (the
amax seen, the scale used, overflow and underflow counts) until `pop_stats`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from trainer.precision.fp8 import (
    Quantised,
    Recipe,
    Saturation,
    fp8_max,
    quantise_blocks,
    quantise_tensorwise,
    quantise_tiles,
    scale_from_amax,
)

INPUT, WEIGHT, GRAD_OUTPUT = 0, 1, 2
ROLES = ("input", "weight", "grad_output")


class Fp8Scaling(nn.Module):
    """Scales and statistics of the FP8 GEMMs of one module; see the module docstring."""

    def __init__(
        self,
        recipe: Recipe,
        gemms: tuple[str, ...],
        amax_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        self.recipe, self.gemms, self.amax_group = recipe, gemms, amax_group
        columns = 3 * len(gemms)
        self.dtypes = [self.dtype(c % 3) for c in range(columns)]
        if recipe.scaling == "delayed":
            history = torch.zeros(recipe.amax_history_len, columns, device=device)
            self.register_buffer("amax_history", history)
            self.register_buffer("scale", torch.zeros(columns, device=device))
        for name, dtype in (("seen_amax", None), ("seen_scale", None), ("overflow", torch.int64)):
            self.register_buffer(name, torch.zeros(columns, dtype=dtype, device=device), False)
        self.register_buffer("underflow", torch.zeros_like(self.overflow), persistent=False)
        self._ready: list[bool] | None = None
        """Host copy of `scale > 0` per column (delayed); None: read it at the next use."""

    @property
    def delayed(self) -> bool:
        return self.recipe.scaling == "delayed"

    @property
    def blockwise(self) -> bool:
        return self.recipe.scaling == "blockwise"

    def dtype(self, role: int) -> torch.dtype:
        return self.recipe.backward_dtype if role == GRAD_OUTPUT else self.recipe.forward_dtype

    def column_names(self) -> list[str]:
        return [f"{gemm}.{role}" if len(self.gemms) > 1 else role
                for gemm in self.gemms for role in ROLES]  # fmt: skip

    def reset(self) -> None:
        """Zero every buffer: no history, no scales (after `to_empty`, or to start over)."""
        with torch.no_grad():
            for buffer in self.buffers():
                buffer.zero_()
        self._ready = None

    # ----------------------------------------------------------------------- quantisation

    def quantise(self, x: torch.Tensor, column: int) -> Quantised:
        """Per-tensor scaling (delayed or current) of `x` for state column `column`."""
        dtype = self.dtypes[column]
        amax = _amax(x)
        if self.delayed and self.ready(column):
            scale = self.scale[column]
        else:
            if self.delayed and self.amax_group is not None:
                amax = amax.clone()
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.amax_group)
            scale = _nonzero(scale_from_amax(amax, dtype, self.recipe.margin))
        q, stats = quantise_tensorwise(
            x, scale, dtype, self.recipe.track_saturation, amax, may_overflow=self.delayed
        )
        self._record(column, stats, amax)
        return q

    def quantise_tiles(self, x_MC: torch.Tensor, column: int, record: bool = True) -> Quantised:
        """Blockwise scaling of an activation or gradient: 1x128 tiles along the last dim."""
        q, stats = quantise_tiles(
            x_MC, self.dtypes[column], self.recipe.margin, record and self.recipe.track_saturation
        )
        if record:
            self._record(column, stats, stats.amax)
        return q

    def quantise_blocks(self, w: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blockwise scaling of a weight (or a stack of them): 128x128 blocks."""
        q, scales, stats = quantise_blocks(
            w, self.dtypes[column], self.recipe.margin, self.recipe.track_saturation
        )
        self._record(column, stats, stats.amax)
        return q, scales

    def ready(self, column: int) -> bool:
        if self._ready is None:
            self._ready = (self.scale > 0).tolist()  # note: a host sync, once per update
        return self._ready[column]

    @torch.no_grad()
    def _record(self, column: int, stats: Saturation, amax: torch.Tensor) -> None:
        if self.delayed:
            history = self.amax_history
            history[0, column] = torch.maximum(history[0, column], amax)
        self.seen_amax[column] = torch.maximum(self.seen_amax[column], stats.amax)
        self.seen_scale[column] = stats.scale
        if stats.overflow is not None:
            self.overflow[column] += stats.overflow
            self.underflow[column] += stats.underflow

    # ----------------------------------------------------------------------- delayed update

    def current_amax(self) -> torch.Tensor:
        """This step's amax per column (row 0 of the history), before any reduction."""
        return self.amax_history[0]

    @torch.no_grad()
    def update(self, amax_C: torch.Tensor) -> torch.Tensor:
        """Close a step with `amax_C` (reduced over ranks); returns the new `scale > 0` mask."""
        history = self.amax_history
        history[0] = amax_C
        if self.recipe.amax_compute_algo == "max":
            amax = history.amax(0)
        else:
            amax = history[0]
        limits = torch.tensor([fp8_max(d) for d in self.dtypes], device=amax.device)
        ok = (amax > 0) & torch.isfinite(amax)
        fresh = limits / torch.where(ok, amax, 1.0) / 2.0**self.recipe.margin
        self.scale.copy_(torch.where(ok, fresh, self.scale))
        history.copy_(torch.roll(history, -1, 0))
        history[0] = 0
        self._ready = None
        return self.scale > 0

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = None

    # ----------------------------------------------------------------------- metrics

    @torch.no_grad()
    def pop_stats(self) -> torch.Tensor:
        """(4, C) float64: amax seen, scale used, overflow and underflow counts; then reset."""
        stats = torch.stack(
            [self.seen_amax.double(), self.seen_scale.double(),
             self.overflow.double(), self.underflow.double()]
        )  # fmt: skip
        for name in ("seen_amax", "seen_scale", "overflow", "underflow"):
            getattr(self, name).zero_()
        return stats

    def extra_repr(self) -> str:
        r = self.recipe
        return f"{r.scaling}, gemms={self.gemms}, fwd={r.forward_dtype}, bwd={r.backward_dtype}"


def _amax(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if x.numel() == 0:
            return torch.zeros((), device=x.device)
        return x.detach().abs().amax().float()


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """A zero tensor has no amax; any scale quantises it exactly: take 1."""
    return torch.where(scale > 0, scale, 1.0)
