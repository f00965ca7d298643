"""The key service's systemd unit, checked by systemd itself: ``systemd-analyze verify`` is
clean, and ``systemd-analyze security --offline=true`` rates its exposure OK (<= 2.0)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "qubes-seal-keyd.service"

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not on PATH"
)


def test_unit_verifies(tmp_path: Path) -> None:
    # verify checks that ExecStart's binary exists: point it at one that does, nothing else.
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/qubes-seal serve\n" in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("ExecStart=/usr/bin/qubes-seal", "ExecStart=/bin/true"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", proc.stderr


def test_unit_exposure_is_ok() -> None:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True, text=True, cwd=UNIT.parent, timeout=60,
    )  # fmt: skip
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    score, rating = float(m.group(1)), m.group(2)
    assert score <= 2.0, proc.stdout
    assert rating in ("OK", "SAFE"), rating


def test_unit_keeps_what_the_daemon_needs() -> None:
    text = UNIT.read_text()
    assert "RestrictAddressFamilies=AF_UNIX" in text
    assert "RuntimeDirectory=qubes-seal" in text and "RuntimeDirectoryMode=0750" in text
    # The boot's TXT event log lives there: a stop must not remove it (the reseal needs it).
    assert "RuntimeDirectoryPreserve=yes" in text
    assert "ReadWritePaths=/var/lib/qubes-seal" in text
    assert "PrivateUsers" not in text.replace("Not PrivateUsers=", "")  # keyrings need root
    filt = subprocess.run(["systemd-analyze", "syscall-filter", "@system-service"],
                          capture_output=True, text=True, timeout=60).stdout  # fmt: skip
    assert "@keyring" in filt  # add_key, keyctl: the hand-over


def test_unit_drops_the_hand_over_at_shutdown_only(tmp_path: Path) -> None:
    """ExecStopPost= runs 'qubes-seal lock' when the system is stopping, and only then: a
    stop or a restart resumes from the hand-over.  Its shell line, run with stand-ins for
    systemctl and qubes-seal; tests/vm/test_dom0.py proves it under a real systemd (no
    qubes-seal key left in /proc/keys after the poweroff stopped the daemon)."""
    (line,) = [x for x in UNIT.read_text().splitlines() if x.startswith("ExecStopPost=")]
    argv = line.removeprefix("ExecStopPost=").replace("$$", "$")
    assert argv.startswith("/bin/sh -c '") and argv.endswith("'")
    script = argv[len("/bin/sh -c '") : -1]
    assert "/usr/bin/qubes-seal lock" in script
    script = script.replace("/usr/bin/qubes-seal", str(tmp_path / "qubes-seal"))
    (tmp_path / "qubes-seal").write_text('#!/bin/sh\necho "locked $*"\n')
    (tmp_path / "qubes-seal").chmod(0o755)
    for state, expected in (("stopping", "locked lock\n"), ("running", ""),
                            ("degraded", ""), ("starting", "")):  # fmt: skip
        (tmp_path / "systemctl").write_text(f"#!/bin/sh\necho {state}\n")
        (tmp_path / "systemctl").chmod(0o755)
        proc = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                              env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, timeout=30)  # fmt: skip
        assert proc.returncode == 0 and proc.stdout == expected, (state, proc)
