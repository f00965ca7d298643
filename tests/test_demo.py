"""The README's main job: the demonstration runs and every step behaves as it says."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_green() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qubes_seal.sim.demo"], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "demo: every step behaved as expected" in proc.stdout
    assert "UNEXPECTED" not in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
