"""Numerical trouble: skip non-finite updates; roll back on repeated trouble or a loss spike.

Before each optimizer step the trainer asks `TrainingHealth.verdict` with the step's global loss
and gradient norm (identical on every rank, so every rank decides alike):

    "apply"     the update goes ahead;
    "skip"      the loss or the gradient norm is not finite: the gradients are dropped and the
                step counts as done (the batch is consumed), `max_nonfinite_steps` in a row at most;
    "rollback"  the `max_nonfinite_steps`-th non-finite step in a row, or a loss above
                `loss_spike_factor` x the mean of the last `loss_spike_window` good losses: the
                trainer reloads the newest checkpoint and skips the offending batches (recorded in
                the checkpointed train state, so a later resume does not replay them either).

A spike is only judged once the window is full, so the early, fast-falling losses never count.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

APPLY, SKIP, ROLLBACK = "apply", "skip", "rollback"


@dataclass
class TrainingHealth:
    max_nonfinite_steps: int
    loss_spike_factor: float
    loss_spike_window: int
    nonfinite_in_a_row: int = 0
    offending: list[int] = field(default_factory=list)
    """Batch numbers of the current run of trouble: what a rollback skips."""
    recent: deque = field(default_factory=deque)
    skipped_steps: int = 0
    rollbacks: int = 0

    def verdict(self, loss: float, grad_norm: float, batch: int) -> str:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.skipped_steps += 1
            self.nonfinite_in_a_row += 1
            self.offending.append(batch)
            return ROLLBACK if self.nonfinite_in_a_row >= self.max_nonfinite_steps else SKIP
        self.nonfinite_in_a_row = 0
        self.offending = []
        if self._is_spike(loss):
            self.offending = [batch]
            return ROLLBACK
        self.recent.append(loss)
        if len(self.recent) > self.loss_spike_window:
            self.recent.popleft()
        return APPLY

    def _is_spike(self, loss: float) -> bool:
        if not self.loss_spike_factor or len(self.recent) < self.loss_spike_window:
            return False
        return loss > self.loss_spike_factor * (sum(self.recent) / len(self.recent))

    def rolled_back(self) -> list[int]:
        """Record a rollback; return the batches to skip from now on and start afresh."""
        skipped, self.offending = self.offending, []
        self.rollbacks += 1
        self.nonfinite_in_a_row = 0
        self.recent.clear()  # the replayed steps refill it with the same losses
        return skipped

    def metrics(self) -> dict[str, float]:
        return {
            "health/nonfinite_skipped_steps": float(self.skipped_steps),
            "health/rollbacks": float(self.rollbacks),
        }
