"""`python -m launch doctor`: what this machine offers a training job, as a table or JSON.

    python -m launch doctor [--run-dir DIR] [--rdzv-endpoint HOST:PORT] [--timeout S] [--json]

Run it on every node before a long job (the SLURM script can run it as a first step). Each check
reports ok, info (a fact, nothing to act on), warn (works, but not as well as it could) or fail.

Hard failures, and the only reasons for a non-zero exit (1):
  - torch.distributed is not available in this torch build;
  - the backend the trainer would use is missing: NCCL where CUDA is available, gloo where not;
  - the run directory cannot be written: neither it nor its nearest existing parent is writable;
  - --rdzv-endpoint was given and its host does not resolve, or a TCP connect to it times out
    (a refused connect is a warning: the host answers, the rendezvous store is not up yet);
  - a check itself raised (the message says where).
Missing CUDA, Transformer Engine or FP8 hardware are facts about the machine, not failures: the
trainer runs on CPU with gloo and has a torch-native FP8 backend.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
LOW_DISK_BYTES = 5 * 2**30
FP8_MIN_CAPABILITY = (8, 9)
"""Ada (8.9) and Hopper (9.0) and later have FP8 (E4M3/E5M2) tensor cores."""


@dataclass
class Check:
    name: str
    status: str
    summary: str
    facts: dict[str, Any] = field(default_factory=dict)


def check_host() -> Check:
    from launch.command import available_cpus

    facts = {
        "hostname": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": available_cpus(),
    }
    return Check("host", INFO, f"{facts['hostname']}, {facts['cpus']} CPUs, Python "
                 f"{facts['python']}", facts)  # fmt: skip


def check_torch() -> Check:
    import torch
    import torch.distributed as dist

    if torch.version.cuda:
        build = f"cuda {torch.version.cuda}"
    elif getattr(torch.version, "hip", None):
        build = f"rocm {torch.version.hip}"
    else:
        build = "cpu"
    facts = {"version": torch.__version__, "build": build, "distributed": dist.is_available()}
    if not facts["distributed"]:
        return Check("torch", FAIL, f"{torch.__version__}: torch.distributed unavailable", facts)
    return Check("torch", OK, f"{torch.__version__} ({build} build)", facts)


def check_cuda() -> Check:
    import torch

    facts: dict[str, Any] = {"available": torch.cuda.is_available(), "version": torch.version.cuda}
    if not facts["available"]:
        facts |= {"device_count": 0, "devices": []}
        return Check("cuda", INFO, "not available: training runs on CPU (gloo)", facts)
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append({
            "index": index,
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
        })  # fmt: skip
    facts |= {"device_count": len(devices), "devices": devices}
    names = ", ".join(sorted({d["name"] for d in devices}))
    return Check("cuda", OK, f"CUDA {torch.version.cuda}, {len(devices)} x {names}", facts)


def check_nccl() -> Check:
    import torch
    import torch.distributed as dist

    available = dist.is_available() and dist.is_nccl_available()
    version = ".".join(map(str, torch.cuda.nccl.version())) if available else None
    facts = {"available": available, "version": version}
    if available:
        return Check("nccl", OK, f"NCCL {version}", facts)
    if torch.cuda.is_available():
        return Check("nccl", FAIL, "CUDA without NCCL: the trainer needs nccl on cuda", facts)
    return Check("nccl", INFO, "not in this build (not needed without CUDA)", facts)


def check_gloo() -> Check:
    import torch
    import torch.distributed as dist

    available = dist.is_available() and dist.is_gloo_available()
    facts = {"available": available}
    if available:
        return Check("gloo", OK, "available (the cpu backend)", facts)
    status = WARN if torch.cuda.is_available() else FAIL
    return Check("gloo", status, "unavailable: the trainer needs gloo on cpu", facts)


def check_transformer_engine() -> Check:
    facts: dict[str, Any] = {"importable": False, "version": None, "error": None}
    try:
        facts["version"] = importlib.metadata.version("transformer_engine")
    except importlib.metadata.PackageNotFoundError:
        facts["error"] = "not installed"
        return Check("transformer_engine", INFO, "not installed (fp8 backend 'te')", facts)
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # noqa: BLE001 (TE fails in many ways without CUDA; report any)
        facts["error"] = f"{type(e).__name__}: {e}"
        return Check("transformer_engine", WARN, f"{facts['version']} installed, import "
                     f"fails: {facts['error'][:120]}", facts)  # fmt: skip
    facts["importable"] = True
    return Check("transformer_engine", OK, f"{facts['version']}", facts)


def scaled_mm_runs_on_cpu() -> bool:
    """One tiny FP8 GEMM through torch._scaled_mm (E4M3 operands, per-tensor scales)."""
    import torch

    a = torch.randn(16, 32).to(torch.float8_e4m3fn)
    b = torch.randn(16, 32).to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
    one = torch.ones((), dtype=torch.float32)
    out = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32)
    return out.shape == (16, 16) and bool(torch.isfinite(out).all())


def check_fp8() -> Check:
    import torch

    has_scaled_mm = hasattr(torch, "_scaled_mm")
    try:
        cpu_runs = has_scaled_mm and scaled_mm_runs_on_cpu()
    except (RuntimeError, NotImplementedError, TypeError):
        cpu_runs = False
    capabilities = [
        torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())
    ] if torch.cuda.is_available() else []  # fmt: skip
    gpu_fp8 = bool(capabilities) and all(c >= FP8_MIN_CAPABILITY for c in capabilities)
    facts = {
        "scaled_mm": has_scaled_mm,
        "scaled_mm_cpu": cpu_runs,
        "gpu_fp8": gpu_fp8,
        "capabilities": [f"{major}.{minor}" for major, minor in capabilities],
    }
    if gpu_fp8:
        return Check("fp8", OK, "E4M3/E5M2 tensor cores on every GPU", facts)
    if capabilities:
        return Check("fp8", WARN, "a GPU below compute capability 8.9: no FP8 tensor cores", facts)
    summary = "torch._scaled_mm runs on CPU (numerics only, no speed-up)" if cpu_runs else (
        "torch._scaled_mm unavailable on CPU")  # fmt: skip
    return Check("fp8", INFO, summary, facts)


def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_disk(run_dir: str) -> Check:
    if "://" in run_dir and not run_dir.startswith("file://"):
        facts = {"run_dir": run_dir, "local": False}
        return Check("disk", INFO, f"{run_dir}: not a local path, not checked", facts)
    existing = nearest_existing(Path(run_dir.removeprefix("file://")))
    usage = shutil.disk_usage(existing)
    writable = os.access(existing, os.W_OK)
    facts = {
        "run_dir": run_dir,
        "local": True,
        "checked_path": str(existing),
        "free_bytes": usage.free,
        "total_bytes": usage.total,
        "writable": writable,
    }
    summary = f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB at {existing}"
    if not writable:
        return Check("disk", FAIL, f"{existing} is not writable", facts)
    return Check("disk", WARN if usage.free < LOW_DISK_BYTES else OK, summary, facts)


def local_addresses() -> set[str]:
    names = {socket.gethostname(), socket.getfqdn(), "localhost"}
    addresses = set()
    for name in names:
        try:
            addresses.update(socket.gethostbyname_ex(name)[2])
        except OSError:
            continue
    return addresses


def check_rendezvous(endpoint: str | None, timeout: float) -> Check:
    if endpoint is None:
        return Check("rendezvous", INFO, "not checked (give --rdzv-endpoint HOST:PORT)")
    host, _, port_text = endpoint.rpartition(":")
    facts: dict[str, Any] = {"endpoint": endpoint, "reachable": False, "listening": False}
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return Check("rendezvous", FAIL, f"{endpoint!r} is not HOST:PORT", facts)
    try:
        address = socket.gethostbyname(host)
    except OSError as e:
        return Check("rendezvous", FAIL, f"{host} does not resolve: {e}", facts)
    local = address.startswith("127.") or address in local_addresses()
    facts |= {"address": address, "local": local}
    try:
        with socket.create_connection((address, int(port_text)), timeout=timeout):
            facts |= {"reachable": True, "listening": True}
            return Check("rendezvous", OK, f"{endpoint} ({address}) accepts connections", facts)
    except ConnectionRefusedError:
        facts["reachable"] = True
    except OSError as e:  # a timeout, or no route to the host
        return Check("rendezvous", FAIL, f"{endpoint} ({address}): {e or 'timed out'}", facts)
    if local:
        return Check("rendezvous", OK, f"{endpoint} is this host; port free for the store", facts)
    return Check("rendezvous", WARN, f"{host} answers, nothing listens on {port_text} yet "
                 "(start the node with --node-rank 0)", facts)  # fmt: skip


def run_checks(run_dir: str, endpoint: str | None, timeout: float) -> list[Check]:
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("host", check_host),
        ("torch", check_torch),
        ("cuda", check_cuda),
        ("nccl", check_nccl),
        ("gloo", check_gloo),
        ("transformer_engine", check_transformer_engine),
        ("fp8", check_fp8),
        ("disk", lambda: check_disk(run_dir)),
        ("rendezvous", lambda: check_rendezvous(endpoint, timeout)),
    ]
    results = []
    for name, check in checks:
        try:
            results.append(check())
        except Exception as e:  # noqa: BLE001 (a check that cannot run is reported, not raised)
            results.append(Check(name, FAIL, f"the check raised {type(e).__name__}: {e}"))
    return results


def report(checks: list[Check]) -> dict[str, Any]:
    failures = [c.name for c in checks if c.status == FAIL]
    entries = {c.name: {"status": c.status, "summary": c.summary, **c.facts} for c in checks}
    return {"ok": not failures, "failures": failures, "checks": entries}


def format_table(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  status  result"]
    lines += [f"{c.name:<{width}}  {c.status:<6}  {c.summary}" for c in checks]
    failures = [c.name for c in checks if c.status == FAIL]
    lines.append(f"\nFAILED: {', '.join(failures)}" if failures else "\nno hard failures")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m launch doctor", description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", default="runs", help="where checkpoints will be written")
    p.add_argument("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous to try")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for the TCP connect")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    checks = run_checks(args.run_dir, args.rdzv_endpoint, args.timeout)
    print(json.dumps(report(checks), indent=2) if args.json else format_table(checks))
    sys.exit(1 if any(c.status == FAIL for c in checks) else 0)
