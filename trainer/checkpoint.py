"""Distributed checkpoints: `run_dir/checkpoints/step-N/`, complete only once marked so.

Layout: each checkpoint is a `torch.distributed.checkpoint` directory (every rank writes its own
shards; `.metadata` describes them) plus a `COMPLETE` marker that rank 0 writes after every rank
has finished. Works on local paths and fsspec URLs.

Note: a crash in the middle of a save leaves a directory without `COMPLETE`. Such a directory is
never resumed from, and the next save of that step replaces it. Renaming a directory into place
would also be atomic on a local disk, but object stores have no atomic rename; a marker written
last works everywhere.

Note: the state is independent of the world size and of the parallel layout (dp_replicate,
dp_shard, ep). Model and optimizer go through `get_state_dict`/`set_state_dict`, and every
parameter, with its optimizer moments, is stored under its unsharded name and full shape, so DCP
reshards it on load; the trainer state (step, data-loader position, RNG) is the same on every
rank. Routed expert weights under parallel.ep > 1 are the one case where a rank's tensor does
not say where it lies in the full one (a DTensor over the expert FSDP mesh, shaped like the
rank's E / ep experts): `ExpertRows` places its rows in the full (E, ...) tensor for DCP.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map_only

from parallel.expert import ExpertParallel, sharded_expert_names
from trainer.precision.apply import is_fp8_state_key

COMPLETE_MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ExpertRows(torch.Tensor):
    """Rows [first, first + n) of a full (E, ...) expert tensor, as DCP saves and loads them.

    With expert parallelism a rank's expert weight (or Adam moment) is a DTensor over the expert
    FSDP mesh whose global shape is that of the rank's ep slice, (E / ep, ...): DCP would store
    slices of different ep ranks under one name and shape and keep one. This wrapper reports the
    full shape instead and implements DCP's `_Checkpointable` protocol (as DTensor does) with one
    chunk at the rank's offset in it: the ep slice's first expert plus the FSDP chunk's offset
    (`torch.chunk` over the expert dim, so possibly no rows at all). The checkpoint then holds
    the same full tensors as under ep = 1, readable by any layout and by trainer.convert. Ranks
    of different replicas (HSDP) announce the same chunk; DCP's save plan keeps one of them and
    every replica reads it back. Loads write into `local`, which is the DTensor's own storage.
    """

    local: torch.Tensor
    first: int
    source: torch.Tensor
    """The tensor the state dict held: handed back to `set_*_state_dict` after a load."""

    @staticmethod
    def __new__(cls, source: torch.Tensor, ep: ExpertParallel) -> ExpertRows:
        if isinstance(source, DTensor):  # FSDP-sharded: the chunk's offset in the ep slice
            (chunk,) = source.__create_chunk_list__()
            local, offset = source.to_local(), chunk.offsets[0]
        else:
            local, offset = source, 0
        full = torch.Size((ep.n_experts, *source.shape[1:]))
        rows = torch.Tensor._make_wrapper_subclass(
            cls, full, dtype=local.dtype, device=local.device
        )
        rows.local, rows.source = local, source
        rows.first = ep.ep_rank * ep.n_local + offset
        return rows

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        # A placeholder with no storage of its own: DCP only asks it for chunks and `local`.
        raise TypeError(f"ExpertRows is a checkpoint placeholder and does not support {func}")

    def copied(self) -> ExpertRows:
        """The same rows over a copy of the data, for a save that runs while training goes on."""
        rows = torch.Tensor._make_wrapper_subclass(
            ExpertRows, self.shape, dtype=self.local.dtype, device=self.local.device
        )
        rows.local, rows.first, rows.source = self.local.detach().clone(), self.first, None
        return rows

    def _chunks(self) -> list[ChunkStorageMetadata]:
        if not self.local.shape[0]:
            return []  # this rank's FSDP chunk of its experts is empty: nothing to save or load
        offsets = torch.Size((self.first, *[0] * (self.local.dim() - 1)))
        return [ChunkStorageMetadata(offsets=offsets, sizes=self.local.shape)]

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        properties = TensorProperties.create_from_tensor(self.local)
        return [
            WriteItem(
                index=MetadataIndex(fqn, chunk.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk=chunk, properties=properties, size=self.shape),
            )
            for chunk in self._chunks()
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return self._chunks()

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.local


def _expert_rows(value: Any, ep: ExpertParallel | None) -> Any:
    """`value` wrapped as `ExpertRows` if it is a tensor of an EP-sharded expert weight.

    Adam's moments are shaped like their parameter, with the expert dim first; its step count is
    a 0-d tensor, the same for every expert, stored as is.
    """
    if ep is None or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    return ExpertRows(value, ep)


def _source(value: Any) -> Any:
    return value.source if isinstance(value, ExpertRows) else value


class ModelState(Stateful):
    """Model weights keyed by unsharded parameter names, in full shapes (reshardable).

    `weights_only` leaves out the FP8 scaling state (trainer/precision): it belongs to a run,
    and a checkpoint written without FP8 (or by trainer.convert) has none.
    """

    def __init__(self, model: nn.Module, weights_only: bool = False):
        self.model = model
        self.experts = sharded_expert_names(model)
        self.weights_only = weights_only

    def state_dict(self) -> dict[str, Any]:
        state = get_model_state_dict(self.model)
        return {
            name: _expert_rows(value, self.experts.get(name))
            for name, value in state.items()
            if not (self.weights_only and is_fp8_state_key(name))
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        weights = {name: _source(value) for name, value in state.items()}
        options = StateDictOptions(strict=not self.weights_only)
        set_model_state_dict(self.model, weights, options=options)


class OptimizerState(Stateful):
    """Optimizer state keyed by unsharded parameter names, in full shapes (reshardable)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.experts = sharded_expert_names(model)

    def state_dict(self) -> dict[str, Any]:
        state = get_optimizer_state_dict(self.model, self.optimizer)
        per_param = {
            name: {key: _expert_rows(value, self.experts.get(name)) for key, value in kept.items()}
            for name, kept in state["state"].items()
        }
        return {**state, "state": per_param}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        per_param = {
            name: {key: _source(value) for key, value in kept.items()}
            for name, kept in state["state"].items()
        }
        set_optimizer_state_dict(self.model, self.optimizer, {**state, "state": per_param})


def load_model_weights(path: str, model: nn.Module) -> None:
    """Only the model weights of a checkpoint (a run's or one written by trainer.convert)."""
    dcp.load({"model": ModelState(model, weights_only=True)}, storage_reader=_reader(path))


@dataclass
class _PendingSave:
    """A checkpoint being written by a background thread: not complete until `_finish`."""

    future: Future
    step: int
    marker: dict[str, Any]


class CheckpointManager:
    """Saves, finds and loads the run's checkpoints; with `async_save`, writes in the background.

    An asynchronous save copies the state (the copy is what is written, so training may change
    the originals at once) and hands it to a thread, which writes it over a process group of
    its own (gloo, so training's collectives never interleave with it). The trainer calls
    `poll()` after every step: once every rank's thread is done, rank 0 writes the marker. At
    most one save is in flight (a new one first waits for the last), and `wait()` finishes it
    at the end. A crash before the marker leaves a directory that is never resumed from.
    """

    def __init__(self, run_dir: str, keep: int, rank: int, async_save: bool = False):
        self.root = f"{run_dir.rstrip('/')}/checkpoints"
        self.keep = keep
        self.rank = rank
        self.fs, self.fs_root = fsspec.core.url_to_fs(self.root)
        self._pending: _PendingSave | None = None
        self._writer_group = dist.new_group(backend="gloo") if async_save else None
        self._thread = ThreadPoolExecutor(max_workers=1) if async_save else None

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

    def save(
        self, step: int, state: dict[str, Stateful], stage: str = "", stage_end: bool = False
    ) -> None:
        """Write `state` for `step`; the marker names the stage, and a stage's last checkpoint
        (`stage_end`) is kept whatever checkpoint.keep says: the next stage starts from it."""
        self.wait()
        path = self.step_dir(step)
        _, fs_path = fsspec.core.url_to_fs(path)
        if self.rank == 0 and self.fs.exists(fs_path):
            self.fs.rm(fs_path, recursive=True)  # an incomplete earlier attempt at this step
        dist.barrier()
        marker = {"step": step, "world_size": dist.get_world_size(), "stage": stage}
        marker["stage_end"] = stage_end
        if self._thread is None:
            dcp.save(state, storage_writer=_writer(path))
            self._finish(step, marker)
            return
        staged = {name: _staged_copy(value.state_dict()) for name, value in state.items()}
        future = self._thread.submit(
            dcp.save, staged, storage_writer=_writer(path), process_group=self._writer_group
        )
        self._pending = _PendingSave(future, step, marker)

    def poll(self) -> None:
        """Complete a background save once every rank has written its part (a collective)."""
        if self._pending is None:
            return
        done = torch.tensor([float(self._pending.future.done())])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)  # the default group: this thread's
        if done.item():
            self.wait()

    def wait(self) -> None:
        """Block until the save in flight (if any) is written, then mark it complete."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        pending.future.result()  # a failed write raises here, on the rank that failed
        self._finish(pending.step, pending.marker)

    def _finish(self, step: int, marker: dict[str, Any]) -> None:
        dist.barrier()  # every rank's shards are on storage before the marker says so
        if self.rank == 0:
            _, fs_path = fsspec.core.url_to_fs(self.step_dir(step))
            with self.fs.open(f"{fs_path}/{COMPLETE_MARKER}", "w") as f:
                json.dump(marker, f)
            self._prune()
        dist.barrier()

    def load(self, step: int, state: dict[str, Stateful]) -> None:
        dcp.load(state, storage_reader=_reader(self.step_dir(step)))

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for step in self.complete_steps()[: -self.keep]:
            _, fs_path = fsspec.core.url_to_fs(self.step_dir(step))
            with self.fs.open(f"{fs_path}/{COMPLETE_MARKER}") as f:
                if json.load(f).get("stage_end"):
                    continue
            self.fs.rm(fs_path, recursive=True)


def _staged_copy(state: Any) -> Any:
    """The same nested state with every tensor copied (DTensors stay DTensors of the copy)."""

    def copy(tensor: torch.Tensor) -> torch.Tensor:
        if isinstance(tensor, ExpertRows):
            return tensor.copied()
        return tensor.detach().clone()

    return tree_map_only(torch.Tensor, copy, state)


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
