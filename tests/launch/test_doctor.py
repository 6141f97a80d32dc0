"""`python -m launch doctor` on this machine: sane values, JSON shape, the hard-failure rule."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from trainer_runs import REPO

from launch.doctor import FAIL, OK, WARN, check_disk, check_rendezvous, main, report, run_checks

KEYS = ("host", "torch", "cuda", "nccl", "gloo", "transformer_engine", "fp8", "disk", "rendezvous")


def doctor(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "launch", "doctor", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_json_report_of_this_machine(tmp_path):
    result = doctor("--json", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["failures"] == []
    checks = data["checks"]
    assert set(KEYS) <= set(checks)
    assert all(
        c["status"] in ("ok", "info", "warn", "fail") and c["summary"] for c in checks.values()
    )
    assert checks["torch"]["version"] == torch.__version__
    assert checks["torch"]["build"] == (
        f"cuda {torch.version.cuda}" if torch.version.cuda else "cpu"
    )
    assert checks["cuda"]["available"] == torch.cuda.is_available()
    assert checks["cuda"]["device_count"] == torch.cuda.device_count()
    assert checks["gloo"]["available"] is True
    assert checks["fp8"]["scaled_mm"] is True
    assert checks["disk"]["checked_path"] == str(tmp_path)  # run/ does not exist yet
    assert checks["disk"]["free_bytes"] > 0 and checks["disk"]["writable"] is True
    assert checks["rendezvous"]["status"] == "info"  # no endpoint given


def run_main(capsys, *args: str) -> tuple[int, str]:
    """The doctor's CLI in this process (the JSON test above runs it as `python -m launch`)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().out


def test_table_names_every_check(tmp_path, capsys):
    code, out = run_main(capsys, "--run-dir", str(tmp_path))
    assert code == 0
    rows = {line.split()[0] for line in out.splitlines() if line.strip()}
    assert set(KEYS) <= rows
    assert "no hard failures" in out


def test_rendezvous_listening_refused_and_unresolvable():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        listening = check_rendezvous(f"127.0.0.1:{port}", timeout=2)
    assert listening.status == OK and listening.facts["listening"] is True
    refused = check_rendezvous(f"127.0.0.1:{port}", timeout=2)  # closed again: a local free port
    assert refused.status == OK and refused.facts == {**refused.facts, "listening": False}
    assert check_rendezvous("no-such-host.invalid:29400", timeout=2).status == FAIL
    assert check_rendezvous("localhost", timeout=2).status == FAIL  # not HOST:PORT


def test_hard_failures_set_the_exit_code(tmp_path, capsys):
    endpoint = "no-such-host.invalid:29400"
    code, out = run_main(capsys, "--run-dir", str(tmp_path), "--rdzv-endpoint", endpoint)
    assert code == 1
    assert "FAILED: rendezvous" in out


def test_unwritable_run_dir_is_a_failure_and_low_disk_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert check_disk(str(tmp_path / "run")).status == FAIL
    monkeypatch.undo()
    monkeypatch.setattr("launch.doctor.LOW_DISK_BYTES", 2**80)
    assert check_disk(str(tmp_path)).status == WARN
    assert check_disk("s3://bucket/run").facts["local"] is False


def test_a_check_that_raises_is_reported_as_a_failure(tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr("launch.doctor.check_gloo", broken)
    data = report(run_checks(str(tmp_path), None, timeout=1))
    assert data["ok"] is False and data["failures"] == ["gloo"]
    assert "driver exploded" in data["checks"]["gloo"]["summary"]
