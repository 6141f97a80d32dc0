"""What every benchmark's JSON report starts with: the command, the date, versions, the machine.

Timings on a shared machine are only as good as its load, so the load average is recorded before
(`load_average()` at the start, passed in) and after (read here) the measured work.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from typing import Any

import torch


def all_cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_average() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def report_header(
    benchmark: str, load_before: tuple[float, float, float] | None, **versions: str
) -> dict[str, Any]:
    """The report's first keys; `versions` adds packages besides torch (e.g. transformers)."""
    return {
        "benchmark": benchmark,
        "command": shlex.join([sys.executable, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, **versions},
        "machine": {
            "cpu_count": os.cpu_count(),
            "cores_available": all_cores(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "loadavg_1_5_15_before": load_before,
            "loadavg_1_5_15_after": load_average(),
        },
    }
