"""How a job is started: torchrun for one node or many, a SLURM batch script, an environment doctor.

    python -m launch [options] -- --config configs/X.toml [--section.key=value ...]   (command.py)
    python -m launch slurm --nodes N [options] -- <trainer args> > job.sbatch         (slurm.py)
    python -m launch doctor [--run-dir DIR] [--rdzv-endpoint HOST:PORT] [--json]      (doctor.py)

The launch chooses no device or backend: the trainer does (parallel/mesh.py). It only sizes the
node, sets the environment, and makes signals and restarts reach the workers.
"""
