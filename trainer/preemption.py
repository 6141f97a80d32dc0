"""Preemption: SIGTERM or SIGUSR1 ends training cleanly at the next step boundary.

Schedulers warn before they kill (SLURM's `--signal=USR1@120`, Kubernetes' SIGTERM with a grace
period). The handler only records the signal; after every step all ranks agree (an all-reduce
of the flag, so a signal that reached only some ranks, or reached them at different steps, still
stops every rank after the same step), write a checkpoint and return, so the process exits 0
and the restarted job resumes exactly.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def requested(self, device: torch.device) -> bool:
        """Whether any rank has been signalled; a collective: every rank calls it each step."""
        flag = torch.tensor([float(self.received is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
