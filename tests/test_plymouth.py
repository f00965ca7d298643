"""The graphical boot against a real plymouthd on the host (docs/BOOT.md, "The graphical boot").

``plymouthd --no-daemon`` runs in a private mount namespace where a pseudo-terminal of this
test is bind-mounted over ``/dev/ttyS0``, the console named by a private copy of
``/sys/class/tty/console/active``: Plymouth takes it for a serial console and forces its
``details`` plugin there, as in the VM (tests/vm/test_vm.py).  The test reads what Plymouth
draws and types on that terminal as a user would; Plymouth's debug log (``--debug-file``)
names every client's command line and request.  Its socket, the abstract
``/org/freedesktop/plymouthd`` (the boot sequence uses the installed ``plymouth`` client), is
in a network namespace of the test's own (``private_network``): other tests running
meanwhile never see this splash, and a plymouthd of the host never sees these tests.

The boot sequence runs as in the initramfs (``python -m qubes_seal.boot``) against swtpm and
a LUKS2 container on a file (tests/test_boot.py's machine).
"""

from __future__ import annotations

import ctypes
import fcntl
import io
import os
import pty
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_boot import PASSPHRASE, Machine, new_machine, shut_down

from qubes_seal.boot.sequence import Console
from qubes_seal.boot.splash import (
    MAX_MESSAGE_BYTES,
    MAX_TEXT_BYTES,
    Plymouth,
    splash_messages,
    splash_text,
)
from qubes_seal.sim.swtpm import Swtpm

PROOF = "blue heron over the lake"
TIMEOUT = 60.0


# -- messages made safe: no daemon needed --------------------------------------------------


def test_splash_text_drops_control_characters_and_keeps_lines() -> None:
    # An escape sequence (clear the screen, set the title), a bidi override, a NUL, a bell:
    # text a hostile header can put in an error message must not drive the terminal.
    hostile = "REFUSED: token \x1b[2J\x1b]0;owned\x07 \u202eevil\x00\nsecond\tline  "
    clean = splash_text(hostile)
    assert "\x1b" not in clean and "\x07" not in clean and "\x00" not in clean
    assert "\u202e" not in clean
    assert clean.splitlines() == ["REFUSED: token ?[2J?]0;owned? ?evil?", "second line"]


def test_splash_text_fits_plymouths_one_byte_length() -> None:
    # Plymouth's client asserts strlen(argument) <= 255 and aborts past it (one length byte
    # in its protocol): a prompt is cut to MAX_MESSAGE_BYTES of UTF-8, on a character.
    for text in ("x" * 600, "é" * 300, "proof: " + "€" * 200):
        clean = splash_text(text)
        assert len(clean.encode()) <= MAX_MESSAGE_BYTES < 255
        assert clean.endswith("...")
        clean.encode().decode("utf-8")  # no character cut in two
    assert splash_text("short") == "short"


def test_long_text_is_split_into_messages_that_fit() -> None:
    # A proof text may be 256 bytes, a refusal's advice longer than a message: nothing of
    # it is lost, each message fits the protocol, the whole is bounded (client calls).
    proof = "proof of a clean boot (your text): " + "willow " * 36 + "\nIf this is not..."
    messages = splash_messages(proof)
    assert len(messages) >= 2
    assert all(len(m.encode()) <= MAX_MESSAGE_BYTES for m in messages)
    assert " ".join(" ".join(messages).split()) == " ".join(proof.split())
    for text in ("x" * 600, "é" * 3000, "REFUSED \x1b[2J " * 500):
        messages = splash_messages(text)
        assert all(len(m.encode()) <= MAX_MESSAGE_BYTES for m in messages)
        assert sum(len(m.encode()) + 1 for m in messages) <= MAX_TEXT_BYTES + 4
        assert not any("\x1b" in m for m in messages)
    assert splash_messages("x" * 600) == ["\n".join(["x" * 100] * 2)] * 3
    assert splash_messages("é" * 3000)[-1] == "..."
    assert splash_messages("one\n\n  two\n\n") == ["one\n\n  two"]


def test_without_plymouth_the_console_is_as_before(tmp_path: Path) -> None:
    assert Plymouth.detect(None) is None  # no client in the image: no splash
    out = io.StringIO()
    console = Console(out)
    assert console.splash is None
    console.say("proof of a clean boot (your text): x\nIf this is not the proof")
    console.clear_splash()  # nothing to clear
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(re.match(r"\[qubes-seal +\d+\.\d{3}\] ", x) for x in lines)
    # A client whose daemon does not answer is not used: the console alone.
    absent = tmp_path / "plymouth"
    absent.write_text("#!/bin/sh\nexit 1\n")
    absent.chmod(0o755)
    assert Plymouth.detect(str(absent)) is None
    # The proof (private): on the console when no splash shows it, a splash that fails
    # included (the daemon gone: the client fails, the splash is off for the rest).
    console = Console(out, splash=Plymouth(str(absent)))
    console.say("proof of a clean boot (your text): heron", private=True)
    assert console.splash is not None and not console.splash.alive
    assert "heron" in out.getvalue()
    Console(out).say("proof of a clean boot (your text): egret", private=True)
    assert "egret" in out.getvalue()


# -- a real plymouthd ----------------------------------------------------------------------


class Plymouthd:
    """plymouthd with this test's pty as its serial console; what it draws, its debug log."""

    def __init__(self, root: Path) -> None:
        self.debug = root / "plymouth-debug.log"
        self.master, slave = pty.openpty()
        self.tty = os.ttyname(slave)
        # plymouthd's "local console": it writes its debug trace there, read and dropped
        # (a full pty would block it).
        self._dummy_master, dummy = pty.openpty()
        self._fds = [slave, dummy]
        active = root / "console-active"
        active.write_text("ttyS0\n")
        bind = (
            'mount --bind "$1" /sys/class/tty/console/active && mount --bind "$2" /dev/ttyS0 '
            '&& shift 2 && exec "$@"'
        )
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--", "sh", "-c", bind, "sh", str(active), self.tty,
             "plymouthd", "--no-daemon", "--debug", f"--debug-file={self.debug}",
             f"--tty={os.ttyname(dummy)}", "--no-boot-log", "--mode=boot",
             "--kernel-command-line=splash"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.text = ""
        self.pos = 0
        self._cond = threading.Condition()
        self._stop = False  # stopped: the daemon and the reader
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop or self.proc.poll() is None:
            ready, _, _ = select.select([self.master, self._dummy_master], [], [], 0.1)
            if self._dummy_master in ready:
                try:
                    os.read(self._dummy_master, 65536)
                except OSError:
                    return
            if self.master not in ready:
                continue
            try:
                data = os.read(self.master, 4096)
            except OSError:
                return
            with self._cond:
                self.text += data.decode("utf-8", "replace").replace("\r", "")
                self._cond.notify_all()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while subprocess.run(["plymouth", "--ping"], check=False).returncode != 0:
            assert self.proc.poll() is None, "plymouthd exited"
            assert time.monotonic() < deadline, "plymouthd does not answer --ping"
            time.sleep(0.05)
        subprocess.run(["plymouth", "show-splash"], check=True, timeout=10)

    def expect(self, pattern: str, *, what: str = "") -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + TIMEOUT
        with self._cond:
            while True:
                m = regex.search(self.text, self.pos)
                if m is not None:
                    self.pos = m.end()
                    return m
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no {what or pattern!r} on the splash:\n{self.text[-2000:]}"
                self._cond.wait(min(remaining, 0.5))

    def type(self, text: str) -> None:
        time.sleep(0.3)  # as a person would, after the prompt
        os.write(self.master, text.encode())

    def requests(self) -> list[str]:
        """Each request in the debug log as "KIND: CLIENT'S COMMAND LINE".  plymouthd writes
        its debug log when it quits: this stops it first."""
        self.stop()
        found, client = [], "?"
        text = self.debug.read_text("utf-8", "replace") if self.debug.exists() else ""
        # A client's command line with a newline (a message of two lines) continues on the
        # next lines of the log, which start without a time stamp: join them.
        text = re.sub(r"\n(?!\d\d:\d\d:\d\d\.\d{3} )", " / ", text)
        for line in text.splitlines():
            m = re.search(r"connection is from pid \d+ \((.*)", line)
            if m:
                client = m.group(1)
            m = re.search(r": got (.*) request$", line)
            if m:
                found.append(f"{m.group(1)}: {client}")
        return found

    def stop(self) -> None:
        """SIGTERM, as systemd stops it: plymouthd quits and writes its debug log."""
        if self._stop:
            return
        self._stop = True
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(2)
        for fd in (*self._fds, self.master, self._dummy_master):
            os.close(fd)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "a private mount namespace for plymouthd needs root"
    for tool in ("plymouthd", "plymouth", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package plymouth, util-linux, mount)"
    if not Path("/dev/ttyS0").exists() or not Path("/sys/class/tty/console/active").exists():
        return "no /dev/ttyS0 or /sys/class/tty/console/active to stand in for"
    return None


CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


@pytest.fixture
def private_network() -> Iterator[None]:
    """This test in a network namespace of its own, its loopback up: plymouthd's abstract
    socket, the clients that find it and the test's swtpm (on the loopback) are private.

    Abstract sockets belong to a network namespace.  Without one, the boot sequence of any
    other test running meanwhile (pytest-xdist runs the suite on every core) would find this
    plymouthd and talk to the splash; and this test would talk to any plymouthd of the host.
    unshare(2) moves the calling thread only (pytest's, where fixtures, tests and the
    processes they start run); setns(2) brings it back afterwards."""
    why = _skip_reason()
    if why:
        pytest.skip(why)
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            pytest.fail(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                ifreq = fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sH14x", b"lo", 0))
                flags = struct.unpack("16sH14x", ifreq)[1]
                fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                pytest.fail(f"setns back to the host's network: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(home)


@pytest.fixture
def plymouthd(private_network: None, tmp_path: Path) -> Iterator[Plymouthd]:
    daemon = Plymouthd(tmp_path)
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture
def machine(private_network: None, swtpm: Swtpm, tmp_path: Path) -> Iterator[Machine]:
    """The machine (its swtpm on the loopback) in this test's network namespace."""
    (tmp_path / "machine").mkdir()
    m = new_machine(swtpm, tmp_path / "machine")
    yield m
    shut_down(m)


def _boot(machine: Machine, **config: object) -> subprocess.Popen[str]:
    """``python -m qubes_seal.boot`` as the initramfs runs it, in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "qubes_seal.boot", "--config", str(machine.config(**config))],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    return proc.returncode, err


def test_proof_and_passphrase_on_the_splash(plymouthd: Plymouthd, machine: Machine) -> None:
    """``ask = "tty"`` with Plymouth holding the console: ``plymouth ask-for-password``."""
    assert machine.cli("attest", "setup", "--text", PROOF).code == 0  # type: ignore[attr-defined]
    machine.swtpm.reboot()
    from qubes_seal.sim.txt_launch import sample_modules, txt_launch

    txt_launch(machine.swtpm, sample_modules())
    proc = _boot(machine, ask="tty", recovery_ask="tty")
    # The details plugin draws each message at a line's start: the proof with its advice.
    plymouthd.expect(r"(?m)^proof of a clean boot \(your text\): " + re.escape(PROOF)
                     + r"\nIf this is not the proof you set up", what="the proof")  # fmt: skip
    plymouthd.expect(r"qubes-seal passphrase:", what="the prompt")
    plymouthd.type(PASSPHRASE + "\r")
    code, err = _finish(proc)
    console = machine.console.read_text()
    assert code == 0, console + err
    assert "RESULT: unlocked with the TPM and passphrase" in console
    # The proof on the splash only: Plymouth keeps the console's lines in its boot log
    # (/var/log/boot.log on dom0's disk), and a text proof must not outlive the boot.
    assert PROOF not in console
    assert re.search(r"\] unlocking the container of domain keys", console)  # the rest as before
    requests = plymouthd.requests()
    shown = [
        r for r in requests if r.startswith("show message: ") and "plymouth display-message" in r
    ]
    assert any(PROOF in r for r in shown), requests
    # Answered, the proof and the rest are hidden; the password came through Plymouth.
    assert any(r.startswith("hide message: ") and PROOF in r for r in requests), requests
    assert any(r.startswith("password: ") and "plymouth ask-for-password" in r for r in requests)
    # The passphrase: masked on the splash, never in any client's argv (the debug log
    # names them), never on the console.
    assert PASSPHRASE not in plymouthd.text
    assert "*" * len(PASSPHRASE) in plymouthd.text
    assert PASSPHRASE not in plymouthd.debug.read_text("utf-8", "replace")
    assert PASSPHRASE not in console


def test_refusal_and_recovery_prompt_on_the_splash(plymouthd: Plymouthd, machine: Machine) -> None:
    """No measured launch: the refusal with its reason on the splash, then Plymouth's
    recovery-key prompt."""
    machine.swtpm.reboot()  # no launch: PCR 17 all 0xFF
    proc = _boot(machine, ask="tty", recovery_ask="tty")
    refused = plymouthd.expect(r"(?m)^REFUSED: (.*)\nEnter the recovery key", what="refusal")
    assert "no TXT measured launch" in refused.group(1)
    plymouthd.expect(r"qubes-seal recovery key:", what="the recovery prompt")
    rkey = machine.rk.read_text().strip()
    plymouthd.type(rkey + "\r")
    code, err = _finish(proc)
    console = machine.console.read_text()
    assert code == 0, console + err
    assert "RESULT: unlocked with the recovery key" in console
    requests = plymouthd.requests()  # plymouthd stopped: its debug log written
    assert rkey not in plymouthd.text and rkey not in plymouthd.debug.read_text()
    assert any(r.startswith("password: ") and "plymouth ask-for-password" in r for r in requests)


def test_systemd_agent_answers_through_plymouth(plymouthd: Plymouthd, machine: Machine) -> None:
    """``ask = "systemd"`` (the unit's default path): systemd-ask-password, answered by
    ``systemd-tty-ask-password-agent --plymouth``, Plymouth's agent in the initramfs.  Both
    run in a private mount namespace with its own /run/systemd/ask-password."""
    if shutil.which("systemd-tty-ask-password-agent") is None:
        pytest.skip("systemd-tty-ask-password-agent is not installed")
    machine.swtpm.reboot()
    from qubes_seal.sim.txt_launch import sample_modules, txt_launch

    txt_launch(machine.swtpm, sample_modules())
    cfg = machine.config(ask="systemd", recovery_ask="systemd")
    script = (
        "mkdir -p /run/systemd/ask-password && mount -t tmpfs -o mode=0755 tmpfs "
        "/run/systemd/ask-password || exit 99; "
        "systemd-tty-ask-password-agent --watch --plymouth & agent=$!; "
        '"$@"; rc=$?; kill $agent; wait $agent; exit $rc'
    )
    proc = subprocess.Popen(
        ["unshare", "--mount", "--", "sh", "-c", script, "sh",
         sys.executable, "-m", "qubes_seal.boot", "--config", str(cfg)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        plymouthd.expect(r"qubes-seal passphrase:", what="the prompt")
        plymouthd.type(PASSPHRASE + "\r")
        code, err = _finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    console = machine.console.read_text()
    assert code == 0, console + err
    assert "RESULT: unlocked with the TPM and passphrase" in console
    requests = plymouthd.requests()
    asked = [r for r in requests if r.startswith("password: ")]
    assert asked and all("systemd-tty-ask-password-agent" in r for r in asked), requests
    assert PASSPHRASE not in plymouthd.text
    assert PASSPHRASE not in plymouthd.debug.read_text("utf-8", "replace")


def test_hostile_and_long_messages_reach_the_splash_safely(plymouthd: Plymouthd) -> None:
    """An error text with escape sequences (an evil maid writes the header the messages
    quote) reaches the terminal without them; a text past Plymouth's 255-byte limit is
    split into messages that fit, and the splash stays on (the client would abort on it)."""
    splash = Plymouth.detect(shutil.which("plymouth"))
    assert splash is not None
    out = io.StringIO()
    console = Console(out, splash=splash)
    console.say("REFUSED: token \x1b]0;owned\x07\x1b[2Jgarbage")
    console.say("LONG " + "abcdefghij" * 60)
    console.say("after the long one")
    plymouthd.expect(r"(?m)^REFUSED: token \?\]0;owned\?\?\[2Jgarbage", what="the cleaned text")
    # 605 characters with no space: lines of 100, two to a message, all of it shown.
    long = plymouthd.expect(r"(?m)^LONG [a-j\n]+\n", what="the long text")
    assert long.group(0).replace("\n", "") == "LONG " + "abcdefghij" * 60
    plymouthd.expect(r"(?m)^after the long one", what="the next message")
    assert splash.alive
    assert "\x1b]0;owned" not in plymouthd.text and "\x1b[2Jgarbage" not in plymouthd.text
    assert len(splash.shown) == 1 + 3 + 1  # 7 lines of 100 characters or fewer, 2-3 a message
    console.clear_splash()
    assert splash.shown == []
    mine = f"with parent pid {os.getpid()} "  # this test's clients, not another test's boot
    hidden = [r for r in plymouthd.requests() if r.startswith("hide message") and mine in r]
    assert len(hidden) == 5, plymouthd.requests()


# -- the dracut module: plymouth used when present, never required --------------------------


def test_dracut_module_never_requires_plymouth() -> None:
    """Without plymouth the image builds and boots on the console (tests/test_dracut.py
    builds one so); with it, the client is installed and the unit ordered after it."""
    module = Path(__file__).resolve().parent.parent / "dracut-module" / "90qubes-seal"
    deps = subprocess.run(
        ["bash", "-c", 'source "$1"; depends', "bash", str(module / "module-setup.sh")],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert "plymouth" not in deps and deps, deps
    setup = (module / "module-setup.sh").read_text()
    assert 'if dracut_module_included "plymouth"; then\n        inst_multiple -o plymouth' in setup
    unit = (module / "qubes-seal-unlock.service").read_text()
    assert "After=plymouth-start.service" in unit
    assert not re.search(r"^(Requires|Wants|BindsTo|Requisite)=.*plymouth", unit, re.M)
