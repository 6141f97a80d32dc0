"""`python -m launch`: build the torchrun command for this node and run it.

    python -m launch [--nnodes N] [--nproc-per-node P|auto] [--rdzv-endpoint HOST:PORT]
                     [--rdzv-id ID] [--node-rank R] [--rdzv-conf K=V,...] [--max-restarts K]
                     [--shutdown-timeout S] [--dry-run] -- --config configs/X.toml [--key=value ...]

Everything after `--` goes to `python -m trainer.train` unchanged. The config is loaded here
first, so a bad key fails before any process starts, and the parallel degrees are checked against
the world size the launch makes.

One node and no endpoint: `torchrun --standalone` (a private rendezvous on a free port). Many
nodes (or an explicit endpoint): a c10d rendezvous, run the same command on every node with the
same --rdzv-endpoint and --rdzv-id. With c10d, torchrun hands out ranks in the order agents join;
--node-rank only says which node hosts the rendezvous store (rank 0: `is_host=1`, others
`is_host=0`), where the hostname in the endpoint would otherwise be matched against the node's
own names.

Device and backend: the launch picks neither. The trainer resolves `training.device` ("auto":
cuda if available) and uses nccl on cuda, gloo on cpu (parallel/mesh.py `init_distributed`).
The launch only mirrors that rule to size the node: --nproc-per-node auto is the GPU count on
cuda and 1 on cpu (one process already uses every core through intra-op threads).

Environment (set only where the caller has not set it; --dry-run shows what is set):
    OMP_NUM_THREADS                 cpu: the node's cores / processes per node (torchrun would
                                    otherwise force 1 with more than one process)
    PYTHONFAULTHANDLER=1            Python stacks of every thread on a crash or fatal signal
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
                                    each restart of the group gets a fresh store: with the
                                    agent's shared store (torch's default) a restarted group
                                    reads the keys of the one before and its gloo/nccl init
                                    connects to dead ranks (pytorch/pytorch#135712; seen here
                                    with torch 2.13: a restart hung or failed in connectFullMesh)
    TORCH_NCCL_ASYNC_ERROR_HANDLING cuda: 3, a failed or timed-out collective ends the process
                                    (so torchrun restarts the group) instead of hanging
    TORCH_NCCL_DUMP_ON_TIMEOUT=1,   cuda: on a collective timeout every rank dumps its flight
    TORCH_NCCL_TRACE_BUFFER_SIZE,   recorder (the last collectives it entered) to
    TORCH_FR_DUMP_TEMP_FILE         run_dir/comm_traces/rank_N, which names the stuck collective
    PYTORCH_CUDA_ALLOC_CONF         cuda: expandable_segments:True (less fragmentation with the
                                    varying shapes of MoE token routing)

Signals: the command runs as torchrun itself (exec), so a signal to this process reaches the
torchrun agent, which forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT and SIGUSR1 to every worker and
waits --shutdown-timeout seconds for them to exit (to finish the step and save a checkpoint)
before SIGKILL. torchrun does not restart the group after a signal; it exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

TRAINER_MODULE = "trainer.train"
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""torchrun's defaults plus SIGUSR1, the signal SLURM jobs conventionally get before the end."""
SHUTDOWN_TIMEOUT_S = 120
FLIGHT_RECORDER_ENTRIES = 20000


class LaunchError(Exception):
    """A launch that cannot work as asked (the message says which option to change)."""


@dataclass(frozen=True)
class Hardware:
    device: str
    """"cuda" or "cpu": what the trainer will train on (its training.device, resolved)."""
    gpus: int
    cpus: int
    """Cores this process may run on (its affinity mask, which SLURM and taskset narrow)."""


@dataclass(frozen=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    """Only the variables the launch adds to the caller's environment."""

    def shell(self) -> str:
        """The command as one line a shell runs as is."""
        assignments = [f"{key}={shlex.quote(value)}" for key, value in sorted(self.env.items())]
        return " ".join([*assignments, shlex.join(self.argv)])


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def detect_hardware(device: str) -> Hardware:
    """`device` is training.device; "auto" resolves as trainer.train.resolve_device_type does."""
    import torch

    cuda = torch.cuda.is_available()
    if device == "auto":
        device = "cuda" if cuda else "cpu"
    if device == "cuda" and not cuda:
        raise LaunchError("training.device = cuda, but CUDA is not available")
    return Hardware(device, torch.cuda.device_count() if cuda else 0, available_cpus())


def resolve_nproc(value: str, hardware: Hardware) -> int:
    if value == "auto":
        return hardware.gpus if hardware.device == "cuda" else 1
    if not value.isdigit() or int(value) < 1:
        raise LaunchError(f"--nproc-per-node must be a positive number or auto; got {value!r}")
    nproc = int(value)
    if hardware.device == "cuda" and nproc > hardware.gpus:
        raise LaunchError(
            f"--nproc-per-node {nproc} exceeds the {hardware.gpus} GPUs of this node "
            "(each process trains on the GPU of its local rank)"
        )
    return nproc


def launch_env(
    hardware: Hardware, nproc: int, run_dir: str, environ: dict[str, str]
) -> dict[str, str]:
    """The variables this launch sets: the defaults the caller's environment does not set."""
    wanted = {"PYTHONFAULTHANDLER": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if hardware.device == "cpu":
        wanted["OMP_NUM_THREADS"] = str(max(1, hardware.cpus // nproc))
    else:
        wanted |= {
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
            "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_NCCL_TRACE_BUFFER_SIZE": str(FLIGHT_RECORDER_ENTRIES),
            "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
        }
        if "://" not in run_dir:  # the flight recorder writes local files only
            wanted["TORCH_FR_DUMP_TEMP_FILE"] = f"{run_dir.rstrip('/')}/comm_traces/rank_"
    return {key: value for key, value in wanted.items() if key not in environ}


def rendezvous_args(opts: argparse.Namespace) -> list[str]:
    if opts.nnodes == "1" and opts.rdzv_endpoint is None:
        return ["--standalone", "--nnodes=1"]
    if opts.rdzv_endpoint is None:
        raise LaunchError(f"--nnodes {opts.nnodes} needs --rdzv-endpoint HOST:PORT")
    args = [
        f"--nnodes={opts.nnodes}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={opts.rdzv_endpoint}",
        f"--rdzv-id={opts.rdzv_id}",
    ]
    conf = [opts.rdzv_conf] if opts.rdzv_conf else []
    if opts.node_rank is not None:
        conf.append(f"is_host={int(opts.node_rank == 0)}")
    return args + ([f"--rdzv-conf={','.join(conf)}"] if conf else [])


def torchrun_supports(option: str) -> bool:
    """Newer torchrun options (--signals-to-handle, --shutdown-timeout) are used where present."""
    from torch.distributed.run import get_args_parser

    return option in get_args_parser()._option_string_actions


def build_plan(
    opts: argparse.Namespace, hardware: Hardware, run_dir: str, environ: dict[str, str]
) -> LaunchPlan:
    nproc = resolve_nproc(opts.nproc_per_node, hardware)
    argv = [sys.executable, "-m", "torch.distributed.run", *rendezvous_args(opts)]
    argv += [f"--nproc-per-node={nproc}", f"--max-restarts={opts.max_restarts}"]
    env = launch_env(hardware, nproc, run_dir, environ)
    if torchrun_supports("--signals-to-handle"):
        argv.append(f"--signals-to-handle={FORWARDED_SIGNALS}")
    else:  # an older torchrun: it forwards SIGTERM and SIGINT; deliver SIGTERM, not SIGUSR1
        print(
            "launch: this torchrun cannot forward SIGUSR1; stop jobs with SIGTERM", file=sys.stderr
        )
    if torchrun_supports("--shutdown-timeout"):
        argv.append(f"--shutdown-timeout={opts.shutdown_timeout}")
    argv += ["-m", TRAINER_MODULE, *opts.trainer_args]
    return LaunchPlan(argv, env)


def check_world_size(parallel, nnodes: int, nproc: int) -> None:  # noqa: ANN001 (ParallelConfig)
    """The degrees must fit the world this launch makes (checked again by every rank)."""
    from parallel.mesh import ParallelDims

    p = parallel
    try:
        ParallelDims(p.dp_replicate, p.dp_shard, p.ep, p.cp, nnodes * nproc)
    except ValueError as e:
        raise LaunchError(f"{nnodes} node(s) x {nproc} processes: {e}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch",
        description="Run the trainer under torchrun on this node. Subcommands: "
        "`python -m launch doctor` (environment report), `python -m launch slurm` (batch script).",
        usage="python -m launch [options] -- --config configs/X.toml [--section.key=value ...]",
    )
    p.add_argument("--nnodes", default="1", help="nodes, or MIN:MAX for an elastic job")
    p.add_argument(
        "--nproc-per-node",
        default="auto",
        help="processes per node; auto: the GPU count on CUDA, 1 on CPU",
    )
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (many nodes)")
    p.add_argument("--rdzv-id", default="fusiontrain", help="job id, the same on every node")
    p.add_argument("--node-rank", type=int, help="0 on the node that hosts the rendezvous")
    p.add_argument("--rdzv-conf", help="more c10d settings, e.g. join_timeout=1800")
    p.add_argument("--max-restarts", type=int, default=0, help="group restarts after a failure")
    p.add_argument(
        "--shutdown-timeout",
        type=int,
        default=SHUTDOWN_TIMEOUT_S,
        help="seconds workers get after a signal (to checkpoint) before SIGKILL",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    split = argv.index("--") if "--" in argv else len(argv)
    opts = parser().parse_args(argv[:split])
    opts.trainer_args = argv[split + 1 :]
    if not re.fullmatch(r"\d+(:\d+)?", opts.nnodes):
        raise LaunchError(f"--nnodes must be N or MIN:MAX; got {opts.nnodes!r}")
    if opts.max_restarts < 0 or opts.shutdown_timeout < 0:
        raise LaunchError("--max-restarts and --shutdown-timeout must be >= 0")
    return opts


def plan_launch(opts: argparse.Namespace, environ: dict[str, str]) -> LaunchPlan:
    """Everything but running: the config checked, the hardware read, the command built."""
    from trainer.config import ConfigError, load_config, split_cli

    try:
        path, overrides = split_cli(opts.trainer_args)
        cfg = load_config(path, overrides)
    except ConfigError as e:
        raise LaunchError(f"config error: {e}") from None
    hardware = detect_hardware(cfg.training.device)
    if ":" not in opts.nnodes:  # an elastic job's world size is known only at rendezvous
        nproc = resolve_nproc(opts.nproc_per_node, hardware)
        check_world_size(cfg.parallel, int(opts.nnodes), nproc)
    return build_plan(opts, hardware, cfg.training.run_dir, environ)


def main(argv: list[str]) -> None:
    try:
        opts = parse_args(argv)
        plan = plan_launch(opts, dict(os.environ))
    except LaunchError as e:
        sys.exit(f"launch: {e}")
    if opts.dry_run:
        print(plan.shell())
        return
    print(f"launch: {plan.shell()}", file=sys.stderr, flush=True)
    if "TORCH_FR_DUMP_TEMP_FILE" in plan.env:
        Path(plan.env["TORCH_FR_DUMP_TEMP_FILE"]).parent.mkdir(parents=True, exist_ok=True)
    # exec: this process becomes the torchrun agent, so signals reach it unchanged.
    os.execve(plan.argv[0], plan.argv, {**os.environ, **plan.env})
