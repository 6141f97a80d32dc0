"""`python -m launch slurm`: write a SLURM batch script that runs the trainer on N nodes.

    python -m launch slurm --nodes 4 --time 24:00:00 [--gpus-per-node 8] [--partition P]
        [--account A] [--job-name NAME] [--cpus-per-node C] [--signal-lead 300]
        [--max-restarts 3] [--shutdown-timeout 120] [--doctor] \\
        -- --config configs/scout.toml [--section.key=value ...] > job.sbatch
    sbatch job.sbatch

The script starts one `python -m launch` per node with srun; the first node of the allocation
hosts the c10d rendezvous (its hostname, a port derived from the job id), the job id is the
rendezvous id, and node 0 is named with --node-rank so it hosts the store whatever its names.

Stopping and resuming:
  - `#SBATCH --signal=B:USR1@<lead>`: SLURM sends SIGUSR1 to the batch shell only, <lead>
    seconds before the time limit. The shell forwards it once to srun, srun to the launcher of
    every node (which is the torchrun agent), and the agent to every worker; the trainer then
    finishes its step, writes a checkpoint and exits. The shell then requeues the job
    (`scontrol requeue`), and the requeued job resumes from the newest complete checkpoint.
    One delivery per worker: with `--signal=USR1@...` (no `B:`) SLURM would signal every
    process of the step itself, workers included, and torchrun would forward a second copy.
  - Preemption (PreemptMode=REQUEUE) and `scancel` send SIGTERM to every process of the job;
    the trainer checkpoints on SIGTERM the same way, and SLURM requeues a preempted job itself
    (`#SBATCH --requeue`); a cancelled job is not requeued.
  - A worker that dies is restarted by torchrun (--max-restarts), resuming from the newest
    complete checkpoint; a node whose agent gives up ends the step on every node
    (`srun --kill-on-bad-exit=1`).
  - The lead time must cover a step, a checkpoint save and the agent's --shutdown-timeout.
Logs append (`--open-mode=append`) so a requeued job continues its log file.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from launch.command import SHUTDOWN_TIMEOUT_S

REPO = Path(__file__).resolve().parents[1]

TEMPLATE = """\
#!/bin/bash
#SBATCH --job-name={job_name}
#SBATCH --nodes={nodes}
#SBATCH --ntasks-per-node=1
{resources}#SBATCH --time={time}
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@{signal_lead}
#SBATCH --open-mode=append
#SBATCH --output={output}
# Written by `python -m launch slurm` (launch/slurm.py explains the signal and requeue flow).

set -u
cd {workdir}
PYTHON=${{PYTHON:-{python}}}
# The first node hosts the rendezvous; the port follows the job id so jobs sharing a node differ.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV_PORT=$((29500 + SLURM_JOB_ID % 10000))
# Since SLURM 22.05 srun does not inherit --cpus-per-task from the batch allocation.
if [ -n "${{SLURM_CPUS_PER_TASK:-}}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi
echo "job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}): $SLURM_JOB_NUM_NODES nodes, \
rendezvous $HEAD_NODE:$RDZV_PORT"
{doctor}
STOP_REQUESTED=0
SRUN_PID=
forward_usr1() {{
    echo "SIGUSR1: the time limit is near; workers checkpoint and stop"
    STOP_REQUESTED=1
    [ -n "$SRUN_PID" ] && kill -USR1 "$SRUN_PID" 2>/dev/null
}}
trap forward_usr1 USR1

# One launcher (torchrun agent) per node; the trainer arguments arrive as "${{@:2}}", word by word.
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\
    bash -c 'exec "$0" -m launch --nnodes "$SLURM_JOB_NUM_NODES" --node-rank "$SLURM_NODEID" \\
        --rdzv-endpoint "$1" --rdzv-id "$SLURM_JOB_ID" {launch_options} -- "${{@:2}}"' \\
    "$PYTHON" "$HEAD_NODE:$RDZV_PORT" {trainer_args} &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives: wait again until srun has exited, then
# once more for its exit status (bash keeps it, also when srun ended as the signal came).
wait "$SRUN_PID"
while kill -0 "$SRUN_PID" 2>/dev/null; do
    wait "$SRUN_PID"
done
wait "$SRUN_PID"
STATUS=$?
if [ "$STOP_REQUESTED" = 1 ]; then
    echo "requeueing job $SLURM_JOB_ID: it resumes from the newest complete checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$STATUS"
"""

DOCTOR_STEP = """\
# Every node reports its environment first; a hard failure on any node ends the job here.
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \\
    "$PYTHON" -m launch doctor --run-dir {run_dir} --rdzv-endpoint "$HEAD_NODE:$RDZV_PORT" \\
    || exit 1
"""


def resources(args: argparse.Namespace) -> str:
    lines = []
    if args.gpus_per_node:
        lines.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_node:
        lines.append(f"--cpus-per-task={args.cpus_per_node}")
    for key in ("partition", "account"):
        if getattr(args, key):
            lines.append(f"--{key}={getattr(args, key)}")
    return "".join(f"#SBATCH {line}\n" for line in lines)


def render(args: argparse.Namespace, trainer_args: list[str]) -> str:
    launch_options = [
        f"--max-restarts {args.max_restarts}",
        f"--shutdown-timeout {args.shutdown_timeout}",
    ]
    doctor = DOCTOR_STEP.format(run_dir=shlex.quote(args.run_dir)) if args.doctor else ""
    return TEMPLATE.format(
        job_name=args.job_name,
        nodes=args.nodes,
        resources=resources(args),
        time=args.time,
        signal_lead=args.signal_lead,
        output=args.output,
        workdir=shlex.quote(str(args.workdir)),
        python=shlex.quote(args.python),
        doctor=doctor,
        launch_options=" ".join(launch_options),
        trainer_args=shlex.join(trainer_args),
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch slurm",
        description="Print a SLURM batch script; trainer arguments follow --.",
    )
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--time", default="24:00:00", help="the job's time limit")
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 for CPU nodes")
    p.add_argument("--cpus-per-node", type=int, default=0, help="0: leave to the cluster")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", default="fusiontrain")
    p.add_argument("--output", default="%x-%j.out", help="log file (appended on requeue)")
    p.add_argument("--signal-lead", type=int, default=300, help="seconds of SIGUSR1 warning")
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--shutdown-timeout", type=int, default=SHUTDOWN_TIMEOUT_S)
    p.add_argument("--doctor", action="store_true", help="run the doctor on every node first")
    p.add_argument("--run-dir", default="runs", help="for the doctor's disk check")
    p.add_argument("--workdir", default=str(REPO), help="the repository on the nodes")
    p.add_argument("--python", default=sys.executable, help="the interpreter on the nodes")
    return p


def main(argv: list[str]) -> None:
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser().parse_args(argv[:split])
    if args.nodes < 1:
        sys.exit("launch slurm: --nodes must be >= 1")
    if args.signal_lead <= args.shutdown_timeout:
        sys.exit(
            f"launch slurm: --signal-lead ({args.signal_lead} s) must exceed --shutdown-timeout "
            f"({args.shutdown_timeout} s): the workers need that long to stop before the limit"
        )
    sys.stdout.write(render(args, argv[split + 1 :]))
