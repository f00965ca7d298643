"""Smoke test of the unseal benchmark: ``benchmarks/unseal.py --quick`` runs and prints its table.

The figures themselves are not asserted (they depend on the machine); only that the benchmark
runs end to end on a swtpm, exits 0 (qubes-seal worked) and prints a row for every tool.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "unseal.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.swtpm,
    pytest.mark.skipif(
        shutil.which("swtpm") is None, reason="the swtpm binary is not on PATH (package swtpm)"
    ),
]


def run_benchmark(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=BENCHMARK.parent.parent,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def test_quick_run_prints_the_table() -> None:
    out = run_benchmark("--quick").stdout
    header = next(line for line in out.splitlines() if line.startswith("tool "))
    for column in ("TPM cmds", "median ms", "min ms", "cmds vs ours", "time vs ours"):
        assert column in header
    for row in ("qubes-seal unseal --check", "clevis decrypt", "systemd-creds decrypt"):
        assert any(line.startswith(row) for line in out.splitlines()), row
    assert "fewer TPM commands than both" in out
    assert "faster than clevis decrypt" in out
    assert "import of the unseal path" in out


def test_json_output_counts_our_five_commands() -> None:
    doc = json.loads(run_benchmark("--json", "--runs", "1").stdout)
    ours = doc["tools"][0]
    assert ours["tool"] == "qubes-seal"
    assert ours["status"] == "ok"
    assert ours["tpm_commands"] == 5
    assert len(ours["times_ms"]) == 1
    assert {t["tool"] for t in doc["tools"]} == {"qubes-seal", "clevis", "systemd-creds"}
    for target in doc["targets"].values():
        assert target["status"] in {"met", "not met", "not measured"}
