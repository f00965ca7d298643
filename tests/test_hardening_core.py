"""No core dumps from a process that holds secrets (issue 13).

A crashing ``qubes-seal`` once left a core file holding the recovery key and the domain keys.
Each entry point (the ``qubes-seal`` command, the boot sequence ``python -m qubes_seal.boot``,
the key daemon ``qubes-seal serve``, ``qubes-seal-storage-agent``) is started here as a user
would start it, as user 65534 in a directory that user may write, and held at a point where it
waits (a FIFO, a child that sleeps).  From outside, as an attacker would look:

* ``/proc/PID/limits``: "Max core file size" 0 (soft and hard);
* ``/proc/PID/status`` belongs to root, not to the process's user: the kernel does that for
  a process that is not dumpable (``PR_SET_DUMPABLE`` 0, proc(5));
* SIGABRT: the process dies and no core file appears, where a plain Python process of the
  same user, in the same directory, leaves one (the control: this host writes cores).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as user 65534")


#: The interpreter behind this virtual environment (a venv's python is a link to it): user
#: 65534 can run it wherever the checkout lives (a CI clone may sit in a 0700 directory).
PYTHON = os.path.realpath(sys.executable)


@pytest.fixture
def den() -> Iterator[Path]:
    """A directory of user 65534 (a test's tmp_path sits in a 0700 directory), holding a copy
    of the package that user can read: the checkout itself may not be reachable."""
    path = Path(tempfile.mkdtemp(prefix="qs-core-"))
    os.chmod(path, 0o755)
    shutil.copytree(ROOT / "qubes_seal", path / "lib" / "qubes_seal",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for d in (path / "lib", *(path / "lib").rglob("*")):
        d.chmod(0o755 if d.is_dir() else 0o644)
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def start(argv: list[str], den: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    full = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(den / "lib"), "HOME": str(den),
            **(env or {})}  # fmt: skip
    return subprocess.Popen(
        argv, cwd=den, env=full, user=NOBODY, group=NOBODY, extra_groups=[],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: the agent's children end with it
        preexec_fn=lambda: __import__("resource").setrlimit(
            __import__("resource").RLIMIT_CORE, (-1, -1)),  # cores on, as a careless shell
    )  # fmt: skip


def owner_of_status(pid: int) -> int:
    return os.stat(f"/proc/{pid}/status").st_uid


def core_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])
    raise AssertionError("no core limit line")


def cores(den: Path) -> list[str]:
    return sorted(p.name for p in den.iterdir() if p.name.startswith("core"))


def check_hardened(proc: subprocess.Popen[bytes], den: Path) -> None:
    """Wait until ``proc`` has hardened itself (its /proc files turn root's), check, crash it."""
    deadline = time.monotonic() + 30
    while owner_of_status(proc.pid) != 0:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline, "the process never made itself non-dumpable"
        time.sleep(0.02)
    time.sleep(0.2)  # at its waiting point (it stays there until the test ends it)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
    assert core_limit(proc.pid) == "0 0"
    proc.send_signal(signal.SIGABRT)
    assert proc.wait(timeout=10) == -signal.SIGABRT
    assert cores(den) == []


def test_control_a_plain_process_does_dump_core(den: Path) -> None:
    proc = start([PYTHON, "-c", "import time; print(flush=True); time.sleep(60)"], den)
    time.sleep(0.5)
    assert owner_of_status(proc.pid) == NOBODY
    assert core_limit(proc.pid) == "unlimited unlimited"
    proc.send_signal(signal.SIGABRT)
    proc.wait(timeout=10)
    if not cores(den):  # core_pattern pipes to a helper (systemd-coredump, apport)
        pytest.skip(
            "this host writes no core file into the working directory: the SIGABRT "
            "checks of the other tests prove less here (their /proc checks still hold)"
        )


def fifo(den: Path, name: str) -> Path:
    path = den / name
    os.mkfifo(path, 0o666)
    return path


def test_the_qubes_seal_command(den: Path) -> None:
    # Any command: the hardening comes first in main(); this one waits to read a FIFO.
    path = fifo(den, "event.log")
    check_hardened(start([PYTHON, "-m", "qubes_seal", "eventlog", "show", str(path)],
                         den), den)  # fmt: skip


def test_the_console_script(den: Path) -> None:
    script = Path(sys.executable).parent / "qubes-seal"
    if not script.exists():
        pytest.skip("no qubes-seal console script next to this Python")
    reachable = subprocess.run(["test", "-x", str(script)], user=NOBODY, check=False)
    if reachable.returncode != 0:
        pytest.skip(
            f"user {NOBODY} cannot reach this checkout's console script ({script}: "
            "a CI clone in a 0700 directory); the other entry points are checked"
        )
    path = fifo(den, "event.log")
    check_hardened(start([str(script), "eventlog", "show", str(path)], den), den)


def test_the_boot_sequence(den: Path) -> None:
    console = fifo(den, "console")  # opening the console for writing waits for a reader
    # As the initramfs unit starts it, less -I (which would ignore PYTHONPATH, this checkout).
    proc = start([PYTHON, "-m", "qubes_seal.boot", "--config", str(den / "none")],
                 den, env={"QUBES_SEAL_BOOT_CONSOLE": str(console)})  # fmt: skip
    check_hardened(proc, den)


def test_the_key_daemon(den: Path) -> None:
    config = den / "config.toml"
    config.write_text('[storage-domains]\nsys-storage = ["work"]\n')
    proc = start([PYTHON, "-m", "qubes_seal", "serve", "--socket", str(den / "run/s"),
                  "--config", str(config), "--container", str(den / "none.luks")], den)  # fmt: skip
    check_hardened(proc, den)


def test_the_storage_agent(den: Path) -> None:
    sleeper = den / "sleeper"
    sleeper.write_text("#!/bin/sh\nexec sleep 60\n")
    sleeper.chmod(0o755)
    volume = den / "volume.img"
    volume.write_bytes(bytes(4096))
    code = "import sys; from qubes_seal.service.agent import main; sys.exit(main())"
    proc = start([PYTHON, "-c", code, "open", "work", "--volume", str(volume)], den,
                 env={"QUBES_SEAL_QREXEC_CLIENT": str(sleeper),
                      "QUBES_SEAL_CRYPTSETUP": str(sleeper)})  # fmt: skip
    try:
        check_hardened(proc, den)
    finally:
        with contextlib.suppress(ProcessLookupError):  # its children, in its process group
            os.killpg(proc.pid, signal.SIGKILL)
