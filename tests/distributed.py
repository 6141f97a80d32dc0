"""Run a function on N gloo ranks in spawned processes and collect what each rank returns.

    results = run_distributed(check_something, world_size=4, args=(x,))

`fn(rank, world_size, *args)` runs inside an initialised process group (gloo, CPU); an
exception on any rank fails the call with that rank's traceback. Results must be picklable
(tensors are fine).
"""

from __future__ import annotations

import os
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 (reported to the parent with the traceback)
        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, args: tuple = ()) -> list[Any]:
    with mp.Manager() as manager:
        results = manager.dict()
        try:
            mp.spawn(_entry, args=(world_size, _free_port(), fn, args, results), nprocs=world_size)
        except mp.ProcessRaisedException:
            errors = [r[1] for r in results.values() if r[0] == "error"]
            raise AssertionError("a rank failed:\n" + "\n".join(errors)) from None
        return [results[rank][1] for rank in range(world_size)]
