"""Distributed checkpoints: `run_dir/checkpoints/step-N/`, complete only once marked so.

Layout: each checkpoint is a `torch.distributed.checkpoint` directory (every rank writes its own
shards; `.metadata` describes them) plus a `COMPLETE` marker that rank 0 writes after every rank
has finished. Works on local paths and fsspec URLs.

Note: a crash in the middle of a save leaves a directory without `COMPLETE`. Such a directory is
never resumed from, and the next save of that step replaces it. Renaming a directory into place
would also be atomic on a local disk, but object stores have no atomic rename; a marker written
last works everywhere.

Note: the state is world-size independent. Model and optimizer go through
`get_state_dict`/`set_state_dict`, which store each parameter under its unsharded name and shape,
so DCP reshards them on load; the trainer state (step, data-loader position, RNG) is the same on
every rank. Exception: with parallel.ep > 1 the expert weights are stored as per-ep-rank slices
(`_ep_keys`) and resume only under the same ep.
"""

from __future__ import annotations

import json
import re
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from parallel.expert import sharded_expert_names

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _ep_keys(model: nn.Module) -> dict[str, str]:
    """Storage key of each EP-sharded expert weight: its name plus `.ep{rank}of{size}`.

    With expert parallelism a rank's expert weight is its ep slice under the full name (a
    DTensor over the expert FSDP mesh, shaped like the slice): ranks of different ep groups would
    write different data under one key, and DCP would keep one. The suffix keeps each slice
    apart; such a checkpoint resumes only under the same parallel.ep (the trainer checks).
    """
    return {
        name: f"{name}.ep{ep.ep_rank}of{ep.ep_size}"
        for name, ep in sharded_expert_names(model).items()
    }


class _StorageKeys:
    """Parameter name <-> storage key; only EP-sharded expert weights differ (`_ep_keys`)."""

    def __init__(self, model: nn.Module):
        self.key_of = _ep_keys(model)
        self.name_of = {key: name for name, key in self.key_of.items()}

    def to_storage(self, by_name: dict[str, Any]) -> dict[str, Any]:
        return {self.key_of.get(name, name): value for name, value in by_name.items()}

    def from_storage(self, by_key: dict[str, Any]) -> dict[str, Any]:
        return {self.name_of.get(key, key): value for key, value in by_key.items()}


class ModelState(Stateful):
    """Model weights keyed by unsharded parameter names (reshardable, except EP experts)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.keys = _StorageKeys(model)

    def state_dict(self) -> dict[str, Any]:
        return self.keys.to_storage(get_model_state_dict(self.model))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, self.keys.from_storage(state))


class OptimizerState(Stateful):
    """Optimizer state keyed by unsharded parameter names (reshardable, except EP experts)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.keys = _StorageKeys(model)

    def state_dict(self) -> dict[str, Any]:
        state = get_optimizer_state_dict(self.model, self.optimizer)
        return {**state, "state": self.keys.to_storage(state["state"])}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        per_param = self.keys.from_storage(state["state"])
        set_optimizer_state_dict(self.model, self.optimizer, {**state, "state": per_param})


def load_model_weights(path: str, model: nn.Module) -> None:
    """Only the model weights of a checkpoint (a run's or one written by trainer.convert)."""
    if _ep_keys(model):
        raise ValueError(
            "checkpoint.init_from cannot load weights into a model with parallel.ep > 1 yet "
            "(expert weights are per-ep-rank slices); start with parallel.ep = 1"
        )
    dcp.load({"model": ModelState(model)}, storage_reader=_reader(path))


class CheckpointManager:
    def __init__(self, run_dir: str, keep: int, rank: int):
        self.root = f"{run_dir.rstrip('/')}/checkpoints"
        self.keep = keep
        self.rank = rank
        self.fs, self.fs_root = fsspec.core.url_to_fs(self.root)

    def step_dir(self, step: int) -> str:
        return f"{self.root}/step-{step}"

    def complete_steps(self) -> list[int]:
        """Steps with a finished checkpoint, oldest first."""
        if not self.fs.exists(self.fs_root):
            return []
        steps = []
        for path in self.fs.ls(self.fs_root, detail=False):
            match = _STEP_DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match and self.fs.exists(f"{path.rstrip('/')}/{COMPLETE_MARKER}"):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict[str, Stateful]) -> None:
        path = self.step_dir(step)
        _, fs_path = fsspec.core.url_to_fs(path)
        if self.rank == 0 and self.fs.exists(fs_path):
            self.fs.rm(fs_path, recursive=True)  # an incomplete earlier attempt at this step
        dist.barrier()
        dcp.save(state, storage_writer=_writer(path))
        dist.barrier()  # every rank's shards are on storage before the marker says so
        if self.rank == 0:
            with self.fs.open(f"{fs_path}/{COMPLETE_MARKER}", "w") as f:
                json.dump({"step": step, "world_size": dist.get_world_size()}, f)
            self._prune()
        dist.barrier()

    def load(self, step: int, state: dict[str, Stateful]) -> None:
        """Load the entries of `state` in turn: an early one can refuse before the rest is read."""
        for key, value in state.items():
            dcp.load({key: value}, storage_reader=_reader(self.step_dir(step)))

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for step in self.complete_steps()[: -self.keep]:
            _, fs_path = fsspec.core.url_to_fs(self.step_dir(step))
            self.fs.rm(fs_path, recursive=True)


def _writer(path: str) -> dcp.StorageWriter:
    if "://" in path:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(path)
    return dcp.FileSystemWriter(path)


def _reader(path: str) -> dcp.StorageReader:
    if "://" in path:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(path)
    return dcp.FileSystemReader(path)
