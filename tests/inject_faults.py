"""The training CLI with injected numerical faults (tests of trainer/health.py).

    FAULT_NAN_BATCHES=3,4 python -m tests.inject_faults --config X [--section.key=value ...]
    FAULT_CRASH_AFTER_SAVE=4 python -m tests.inject_faults ...

Runs `trainer.train` exactly, except that
  - the logits of the listed batches (1-based numbers of the batches a stage draws from its
    loader) are multiplied by NaN, so their loss and gradients are NaN as after an overflow (a
    batch that a rollback marked is never drawn again, so it can fault only once);
  - the process dies (exit code 3, no cleanup) right after the save of the given step has been
    started: with asynchronous checkpointing, while its thread may still be writing.
"""

from __future__ import annotations

import os
import sys

from trainer import train as training
from trainer.config import load_config, split_cli
from trainer.model.transformer import ModelOutput


def poison(module, args, output: ModelOutput) -> ModelOutput:
    return ModelOutput(output.logits_BSV * float("nan"), output.router_loss)


def main() -> None:
    faulty = {int(b) for b in os.environ.get("FAULT_NAN_BATCHES", "").split(",") if b}
    honest_step = training.train_step

    def train_step(trainer, rows):
        if trainer.state.batches not in faulty:
            return honest_step(trainer, rows)
        handle = trainer.model.register_forward_hook(poison)
        try:
            return honest_step(trainer, rows)
        finally:
            handle.remove()

    # train_loop looks train_step up at call time: the run is the CLI's, plus the fault.
    training.train_step = train_step
    crash_step = int(os.environ.get("FAULT_CRASH_AFTER_SAVE", "0"))
    honest_save = training.save

    def save(trainer, step):
        seconds = honest_save(trainer, step)
        if step == crash_step:
            os._exit(3)
        return seconds

    training.save = save
    path, overrides = split_cli(sys.argv[1:])
    training.train(load_config(path, overrides))


if __name__ == "__main__":
    main()
