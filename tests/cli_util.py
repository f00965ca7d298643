"""Running the real ``qubes-seal`` command, as a user would, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run(tcti: str, state_dir: Path, *args: str, stdin: str | None = None,
        env: dict[str, str] | None = None) -> Result:  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", "qubes_seal", "--tpm", tcti, "--state-dir", str(state_dir), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr)
