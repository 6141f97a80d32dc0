"""`python -m launch [doctor | slurm] ...`: see launch/__init__.py."""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {"doctor": "launch.doctor", "slurm": "launch.slurm"}


def main(argv: list[str]) -> None:
    if argv[:1] and argv[0] in SUBCOMMANDS:
        importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
    else:
        importlib.import_module("launch.command").main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
