"""The boot chain in a real VM: our initramfs, swtpm as the VM's TPM, the kernel's dm-crypt.

The build machines have no device-mapper; this test boots the installed Debian kernel in QEMU
(TCG) with an initramfs built by dracut with ``90qubes-seal`` and the test-only module
``tests/vm/dracut/99qubes-seal-vmtest``, a swtpm on a unix socket as the VM's ``tpm-tis``
device, ``/dev/vda`` = our container and ``/dev/vdb`` = a LUKS2 volume standing for dom0's
root, and drives the serial console as a user would.  docs/VM-TEST.md says what it proves.

The swtpm state is provisioned from the host (``qubes-seal init``, ``attest setup``) with a
TCP swtpm on the same state directory, which is then given to the VM's swtpm: same state
directory, same TPM.  TXT cannot be simulated in QEMU, so the container is sealed to PCR 13
only, with the explicitly unsafe test options (``--unsafe-no-measured-launch`` at init,
``unsafe_no_measured_launch`` + ``unsafe_test_mode`` in the VM's boot.toml).

Every QEMU and swtpm process started here is stopped on every path; each boot is killed after
``BOOT_TIMEOUT`` seconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cli_util import run
from test_dracut import MODULE_DIR, MODULES

from qubes_seal import chain
from qubes_seal.luks.container import Container
from qubes_seal.secret import Secret
from qubes_seal.sim.swtpm import Swtpm

# One group for both VM modules (pytest-xdist, ./run-tests): one VM at a time, on one worker.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

HERE = Path(__file__).resolve().parent
TEST_MODULE = HERE / "dracut" / "99qubes-seal-vmtest"
QEMU = "qemu-system-x86_64"
PASSPHRASE = "vm passphrase"
WRONG = "not the passphrase"
PROOF = "kingfisher on the willow"
ROOT_NAME = "luks-dom0root"
ROOT_UUID = "6f1b0b3a-5eed-4c4c-9d9d-00000000d0e0"
CHEAP_KDF = ["--kdf-memory", "8192", "--kdf-time", "20"]
BOOT_TIMEOUT = 120.0
# systemd's tty agent prints the prompt, then turns the echo off (tcsetattr): what arrives
# before that is echoed in clear. A person is never that fast; the test waits as long.
HUMAN_DELAY = 0.5
STAMP = r"\[qubes-seal +(\d+\.\d+)\] "
BOOT_TOML = """\
# TEST ONLY (tests/vm/test_vm.py): QEMU's TIS has no locality-4 hash start, no TXT launch.
[boot]
container = "/dev/vda"
tpm = "device:/dev/tpmrm0"
ask = "systemd"
backend = "dm-crypt"
tries = 1
timeout = 60.0
unsafe_no_measured_launch = true
unsafe_test_mode = true
"""


def _kernel() -> tuple[str, Path] | None:
    """The newest /boot/vmlinuz-KVER that has its modules in /lib/modules/KVER."""

    def version(p: Path) -> list[Any]:
        return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", p.name[8:])]

    for path in sorted(Path("/boot").glob("vmlinuz-*"), key=version, reverse=True):
        kver = path.name[len("vmlinuz-") :]
        if Path("/lib/modules", kver).is_dir():
            return kver, path
    return None


def _skip_reason() -> str | None:
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian package qemu-system-x86)"
    if _kernel() is None:
        return "no /boot/vmlinuz-* kernel with its /lib/modules (Debian package linux-image-amd64)"
    return None


# -- the serial console -------------------------------------------------------------------


class SerialConsole:
    """QEMU's stdio (the VM's ttyS0): everything it printed, with the host time it arrived."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stdin is not None
        self.proc = proc
        self.text = ""
        self.chunks: list[tuple[int, float]] = []  # (end offset in text, arrival time)
        self.pos = 0
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            with self._cond:
                if data:
                    self.text += data.decode("utf-8", "replace").replace("\r", "")
                    self.chunks.append((len(self.text), time.monotonic()))
                else:
                    self.chunks.append((len(self.text), -1.0))  # end of output
                self._cond.notify_all()
            if not data:
                return

    @property
    def closed(self) -> bool:
        return bool(self.chunks) and self.chunks[-1][1] < 0

    def arrival(self, offset: int) -> float:
        """When the character at ``offset`` arrived on the host (time.monotonic())."""
        for end, when in self.chunks:
            if end > offset and when >= 0:
                return when
        return time.monotonic()

    def expect(self, pattern: str, deadline: float, *, what: str = "") -> re.Match[str]:
        """The next match of ``pattern`` after the previous one; fails at ``deadline``."""
        regex = re.compile(pattern)
        with self._cond:
            while True:
                m = regex.search(self.text, self.pos)
                if m is not None:
                    self.pos = m.end()
                    return m
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.closed:
                    why = "the VM stopped" if self.closed else "timed out"
                    raise AssertionError(
                        f"{why} waiting for {what or pattern!r}; console tail:\n"
                        + self.text[-3000:]
                    )
                self._cond.wait(min(remaining, 0.5))

    def type(self, text: str) -> float:
        """Type ``text`` on the VM's serial console; returns when it was sent."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()
        return time.monotonic()

    def prompt(self, message: str, deadline: float) -> float:
        """Wait for systemd's console prompt ``message`` (to its end), then as a person would;
        returns when the prompt arrived."""
        m = self.expect(re.escape(message) + r"[^\n]*?\(press TAB for no echo\) (?:\x1b\[0m)?",
                        deadline, what=message)  # fmt: skip
        shown = self.arrival(m.start())
        time.sleep(HUMAN_DELAY)
        return shown

    def splash_prompt(self, message: str, deadline: float) -> float:
        """Wait for Plymouth's prompt ``message`` (its details plugin on the serial console,
        at a line's start: no stamp, so Plymouth drew it), then as a person would."""
        m = self.expect(r"(?m)^" + re.escape(message), deadline, what=f"Plymouth's {message}")
        shown = self.arrival(m.start())
        time.sleep(HUMAN_DELAY)
        return shown

    def join(self, timeout: float) -> None:
        self._reader.join(timeout)


# -- the machine: disks, TPM state, image --------------------------------------------------


@dataclass
class Machine:
    dir: Path
    image: Path
    kver: str
    kernel: Path
    build_seconds: float
    boots: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def state(self) -> Path:
        return self.dir / "tpm"

    @property
    def container(self) -> Path:
        return self.dir / "container.img"

    @property
    def root(self) -> Path:
        return self.dir / "root.img"

    @property
    def pw(self) -> Path:
        return self.dir / "pw"

    @property
    def rk(self) -> Path:
        return self.dir / "rk"

    @contextmanager
    def host_tpm(self) -> Iterator[Swtpm]:
        """The VM's TPM on the host (TCP swtpm, same state directory), for provisioning."""
        tpm = Swtpm(self.state)
        tpm.start()
        try:
            yield tpm
            tpm.tpm2_shutdown()  # an orderly shutdown, as the VM's kernel does
        finally:
            tpm.stop()

    def cli(self, tpm: Swtpm, *args: str) -> Any:
        res = run(tpm.tcti, self.dir / "cli-state", *args)
        assert res.code == 0, res.err
        return res

    @contextmanager
    def vm(
        self, name: str, *, plymouth: bool = False, append: str = "",
        qemu_args: tuple[str, ...] = (), timeout: float = BOOT_TIMEOUT,
    ) -> Iterator[tuple[SerialConsole, float]]:  # fmt: skip
        """Boot the VM (a new swtpm on the state, as at power-on); yields (console, deadline).

        ``plymouth``: Plymouth runs (the image has it; ``plymouth.enable=0`` otherwise), its
        details plugin on the serial console (forced there: no ``plymouth.ignore-serial-
        consoles``), its debug log in the VM's /run for the check unit (the test module's
        drop-in for plymouth-start.service).  ``append``: more kernel parameters;
        ``qemu_args``: more QEMU options (test_dom0.py).  QEMU and swtpm are stopped on
        every path; the serial log is kept in DIR/NAME.log.
        """
        sock = self.state / "sock"
        sock.unlink(missing_ok=True)
        procs: list[subprocess.Popen[bytes]] = []
        console: SerialConsole | None = None
        log = (self.dir / f"{name}.swtpm.log").open("ab")
        try:
            swtpm = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state},mode=0600",
                 "--ctrl", f"type=unixio,path={sock}", "--log", "level=1"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            procs.append(swtpm)
            deadline = time.monotonic() + 10
            while not sock.exists():
                assert swtpm.poll() is None, f"swtpm exited ({swtpm.returncode})"
                assert time.monotonic() < deadline, "swtpm did not create its socket"
                time.sleep(0.02)
            cmdline = (
                f"console=ttyS0 panic=1 rd.luks.name={ROOT_UUID}={ROOT_NAME} "
                "rd.shell=0 rd.emergency=poweroff systemd.show_status=1 "
                + ("" if plymouth else "plymouth.enable=0 ")
                + append
            ).strip()
            qemu = subprocess.Popen(
                [QEMU, "-m", "1024", "-smp", "2", "-nographic", "-no-reboot",
                 "-kernel", str(self.kernel), "-initrd", str(self.image), "-append", cmdline,
                 "-chardev", f"socket,id=chrtpm,path={sock}",
                 "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                 "-device", "tpm-tis,tpmdev=tpm0", "-nic", "none",
                 "-drive", f"file={self.container},if=virtio,format=raw",
                 "-drive", f"file={self.root},if=virtio,format=raw", *qemu_args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            procs.append(qemu)
            started = time.monotonic()
            console = SerialConsole(qemu)
            yield console, started + timeout
            # The check unit powers the VM off: QEMU exits by itself.
            qemu.wait(timeout=max(1.0, started + timeout - time.monotonic()))
            self.boots.setdefault(name, {})["seconds"] = time.monotonic() - started
        finally:
            for proc in reversed(procs):  # QEMU first, then its swtpm
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
                if proc.stdin is not None:
                    proc.stdin.close()
            if console is not None:
                console.join(5)
                (self.dir / f"{name}.log").write_text(console.text)
            log.close()


def _build_image(
    work: Path,
    boot_toml: Path,
    kver: str,
    test_modules: tuple[Path, ...] = (TEST_MODULE,),
    *,
    plymouth: bool = True,
) -> tuple[Path, float]:
    """dracut with our module and the test module(s) (and Plymouth), for the installed kernel."""
    base = work / "dracut"
    shutil.copytree("/usr/lib/dracut", base, symlinks=True)
    shutil.copytree(MODULE_DIR, base / "modules.d" / MODULE_DIR.name)
    for module in test_modules:
        shutil.copytree(module, base / "modules.d" / module.name)
    names = " ".join(module.name.lstrip("0123456789") for module in test_modules)
    if plymouth:
        names = f"plymouth {names}"
    out = work / "initramfs.img"
    env = dict(os.environ, dracutbasedir=str(base), QUBES_SEAL_PYTHON=sys.executable,
               QUBES_SEAL_BOOT_CONFIG=str(boot_toml))  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(
        ["dracut", "--no-hostonly", "--no-compress", "--no-early-microcode",
         "-m", f"{MODULES} {names}", "--kver", kver, "-f", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Including module: qubes-seal" in proc.stderr + proc.stdout
    assert plymouth == ("Including module: plymouth" in proc.stderr + proc.stdout)
    return out, seconds


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    why = _skip_reason()
    if why:
        pytest.skip(why)
    found = _kernel()
    assert found is not None
    kver, kernel = found
    work = tmp_path_factory.mktemp("vm")
    boot_toml = work / "boot.toml"
    boot_toml.write_text(BOOT_TOML)
    image, seconds = _build_image(work, boot_toml, kver)
    m = Machine(work, image, kver, kernel, seconds)
    provision(m)
    yield m
    print("\nVM test summary:", json.dumps({"image_build_s": round(m.build_seconds, 1),
                                            **m.boots}, indent=1))  # fmt: skip


def provision(m: Machine) -> None:
    """The VM's TPM and disks, from the host: the container (PCR 13), the proof, dom0's root."""
    m.pw.write_text(PASSPHRASE + "\n")
    # Provisioning from the host, against the VM's TPM state: as the CLI does it.
    with m.host_tpm() as tpm:
        m.cli(tpm, "init", "--container", str(m.container), "--passphrase-file", str(m.pw),
              "--recovery-key-file", str(m.rk), "--dom0-root-volume", ROOT_NAME,
              "--pcrs", "13", "--unsafe-pcr-selection", "--unsafe-no-measured-launch",
              *CHEAP_KDF)  # fmt: skip
        m.cli(tpm, "attest", "setup", "--text", PROOF, "--container", str(m.container))
    # dom0's root volume, with the keystore's "dom0" key as a keyslot (read with the recovery
    # key: no TPM involved), cheap PBKDF: systemd-cryptsetup runs under TCG.
    unlocked = chain.recover(m.container, recovery_key=Secret(m.rk.read_bytes().strip()),
                             keyring=None)  # fmt: skip
    try:
        dom0_key = unlocked.keystore.get("dom0").key.reveal()
    finally:
        unlocked.close()
    with open(m.root, "wb") as f:
        f.truncate(20 << 20)
    subprocess.run(
        ["cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2", "--uuid", ROOT_UUID,
         "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", "-",
         str(m.root)],
        input=dom0_key, check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def _vm_result(console: SerialConsole, deadline: float) -> dict[str, Any]:
    m = console.expect(r"\[vmtest\] RESULT (\{.*\})\n", deadline, what="the check's RESULT")
    result: dict[str, Any] = json.loads(m.group(1))
    assert "error" not in result, result["error"]
    return result


def _message_gap(console: SerialConsole) -> float:
    """Seconds between the sequence's "TXT event log" and "unlocking" lines (its clock): one
    message written, and with Plymouth one ``plymouth display-message`` call, between them."""
    stamps = []
    for what in ("TXT event log", "unlocking the container"):
        m = re.search(STAMP + re.escape(what), console.text)
        assert m is not None, what
        stamps.append(float(m.group(1)))
    return stamps[1] - stamps[0]


def _unit_overhead(result: dict[str, Any], result_stamp: float) -> float:
    """Seconds from the unlock unit's start to the sequence's clock zero (interpreter start,
    imports), in the VM's clock: the unit's run time minus the RESULT line's stamp."""
    times = result["unlock_times"]
    run_s = times["ExecMainExitTimestampMonotonic"] - times["ExecMainStartTimestampMonotonic"]
    return max(0.0, run_s / 1e6 - result_stamp)


# -- the three boots ---------------------------------------------------------------------------


def test_boot_proof_passphrase_dm_crypt_cap_root_handover(machine: Machine) -> None:
    with machine.vm("boot1") as (console, deadline):
        unit = console.expect(r"Starting .{0,40}qubes-seal-unlock", deadline,
                              what="systemd starting qubes-seal-unlock.service")  # fmt: skip
        proof = console.expect(STAMP + r"proof of a clean boot \(your text\): (.*)\n", deadline,
                               what="the proof of a clean boot")  # fmt: skip
        assert proof.group(2) == PROOF
        prompt_at = console.prompt("qubes-seal passphrase:", deadline)
        typed_at = console.type(PASSPHRASE + "\n")
        opened = console.expect(STAMP + r"container open: (\d+) domain key", deadline,
                                what="container open")  # fmt: skip
        final = console.expect(STAMP + r"RESULT: (.*)\n", deadline, what="the boot's RESULT")
        result = _vm_result(console, deadline)
    print("\nboot 1:", final.group(2), "\n", json.dumps(result, indent=1))
    assert final.group(2).startswith("unlocked with the TPM and passphrase"), final.group(2)
    # The container through the kernel's dm-crypt (backend = "dm-crypt": no fall-back), seen
    # by udev as a CRYPT-LUKS2 mapping, closed again after the keystore was read.
    assert result["backend"] == "dm-crypt"
    assert result["container_via_dm_crypt"], result["dm_events"]
    assert result["container_mapping_closed"], result["dm_now"]
    assert int(opened.group(2)) >= 1  # the keystore: at least dom0's root key
    # PCR 13 capped; the proof (same PCR, no passphrase) cannot be unsealed any more.
    assert result["pcr13"] == "capped"
    assert result["unseal_after_boot"].startswith("refused"), result["unseal_after_boot"]
    # dom0's root volume opened by systemd-cryptsetup with our key file; the hand-over.
    assert result["root_key_file"]
    assert result["root_opened"] and result["root_is_dm_crypt"], result
    assert "ActiveState=active" in result["root_unit"], result["root_unit"]
    assert result["handover"] and result["proc_keys_vk"]
    assert "Please enter passphrase" not in console.text  # systemd-cryptsetup did not ask
    assert PASSPHRASE not in console.text  # never echoed on the console
    # Plymouth in the image but off (plymouth.enable=0): no daemon, the console agent asked,
    # nothing went to a splash; the proof on the console as before.
    ply = result["plymouth"]
    assert not ply["running"] and not ply["requests"], ply
    assert "ActiveState=active" in ply["console_agent"], ply
    assert "ActiveState=active" not in ply["plymouth_agent"], ply
    # Timing: the unit's start to the container open, without the typing.
    typing = typed_at - prompt_at
    overhead = _unit_overhead(result, float(final.group(1)))
    to_open = overhead + float(opened.group(1)) - typing
    # Cross-check on the host's clock: systemd's "Starting" line to "container open".
    on_host = console.arrival(opened.start()) - console.arrival(unit.start()) - typing
    machine.boots["boot1"].update(
        unit_start_to_container_open_s=round(to_open, 3),
        same_seen_on_the_host_s=round(on_host, 3),
        interpreter_and_imports_s=round(overhead, 3),
        typing_excluded_s=round(typing, 3),
        one_message_s=round(_message_gap(console), 3),
        sequence=final.group(2),
    )
    print(f"boot 1: unit start -> container open {to_open:.2f} s (interpreter start and "
          f"imports {overhead:.2f} s, typing {typing:.2f} s excluded; on the host's clock "
          f"{on_host:.2f} s)")  # fmt: skip


def _assert_through_plymouth(result: dict[str, Any], console: SerialConsole) -> list[str]:
    """Plymouth ran, our messages reached it through its client, and every password request
    came from systemd's Plymouth agent (the console agent did not run)."""
    ply = result["plymouth"]
    assert ply["running"], ply
    assert "ActiveState=active" in ply["plymouth_agent"], ply
    assert "ActiveState=active" not in ply["console_agent"], ply
    requests: list[str] = ply["requests"]
    messages = [
        r for r in requests if r.startswith("show message: ") and "plymouth display-message" in r
    ]
    assert messages, requests
    asked = [r for r in requests if r.startswith("password: ")]
    assert asked and all("ask-password-agent" in r for r in asked), requests
    assert "(press TAB for no echo)" not in console.text  # systemd's console agent
    return requests


def test_wrong_passphrase_then_recovery_key_through_plymouth(machine: Machine) -> None:
    """Boot 2, under Plymouth (details plugin on the serial console): the proof, the refusal
    with its reason and both prompts on the splash, the answers through the Plymouth agent."""
    rkey = machine.rk.read_text().strip()
    with machine.vm("boot2", plymouth=True) as (console, deadline):
        # Plymouth draws our message at a line's start (the console's copy has the stamp).
        console.expect(r"(?m)^proof of a clean boot \(your text\): " + re.escape(PROOF)
                       + r"\nIf this is not the proof you set up", deadline,
                       what="the proof on the splash")  # fmt: skip
        console.splash_prompt("qubes-seal passphrase:", deadline)
        console.type(WRONG + "\r")
        console.expect(STAMP + r"wrong passphrase \(attempt 1 of 1\)", deadline,
                       what="the refusal")  # fmt: skip
        console.expect(r"(?m)^REFUSED: (.*)\nEnter the recovery key", deadline,
                       what="the refusal and the recovery advice on the splash")  # fmt: skip
        console.splash_prompt("qubes-seal recovery key:", deadline)
        console.type(rkey + "\r")
        console.expect(STAMP + r"container open with the recovery key", deadline,
                       what="container open")  # fmt: skip
        final = console.expect(STAMP + r"RESULT: (.*)\n", deadline, what="the boot's RESULT")
        result = _vm_result(console, deadline)
    print("\nboot 2:", final.group(2), "\n", json.dumps(result, indent=1))
    assert final.group(2).startswith("unlocked with the recovery key")
    assert result["handover"] and result["proc_keys_vk"]
    assert result["root_opened"] and result["root_key_file"], result
    requests = _assert_through_plymouth(result, console)
    assert len([r for r in requests if r.startswith("password: ")]) == 2  # both prompts
    assert any(PROOF in r for r in requests)  # the proof in the client's argv: docs/BOOT.md
    # ... and on the splash only: never on the console, whose lines Plymouth keeps in its
    # boot log (boot 1, without Plymouth, has it on the console as before).
    assert not re.search(STAMP + "proof of a clean boot", console.text)
    assert WRONG not in console.text and rkey not in console.text  # never echoed
    assert not any(WRONG in r or rkey in r for r in requests)  # nor in any argv
    machine.boots["boot2"]["sequence"] = final.group(2)
    machine.boots["boot2"]["plymouth_requests"] = len(requests)
    machine.boots["boot2"]["one_message_s"] = round(_message_gap(console), 3)
    # Recorded, not asserted: the recovery path does not cap PCR 13 (docs/VM-TEST.md).
    machine.boots["boot2"]["pcr13_after_recovery"] = result["pcr13"]
    machine.boots["boot2"]["unseal_after_recovery"] = result["unseal_after_boot"]


def test_rolled_back_header_is_refused(machine: Machine) -> None:
    """An old header (old keyslots) with the current token: PCR 13 differs, the TPM refuses.

    As tests/test_chain.py::test_header_rollback_is_refused, with the reseal done from the
    host against the VM's TPM state, then the boot in the VM.
    """
    c = Container(machine.container)
    old_header = machine.container.read_bytes()[: c.data_offset]
    with machine.host_tpm() as tpm:
        machine.cli(tpm, "recover", "--container", str(machine.container),
                    "--recovery-key-file", str(machine.rk), "--reseal", "--keyring", "none",
                    "--passphrase-file", str(machine.pw), "--unsafe-no-measured-launch",
                    *CHEAP_KDF)  # fmt: skip
        # The proof was sealed to the old header's PCR 13: set up again, as the reseal says.
        machine.cli(tpm, "attest", "setup", "--text", PROOF, "--container",
                    str(machine.container))  # fmt: skip
    (token_id,) = c.find_tokens("qubes-seal")
    current_token = c.export_token(token_id)
    with open(machine.container, "r+b") as f:
        f.write(old_header)
    current_token["keyslots"] = ["0"]  # cryptsetup wants the token's keyslots to exist
    Container(machine.container).import_token(current_token, token_id=token_id, replace=True)

    rkey = machine.rk.read_text().strip()
    with machine.vm("boot3", plymouth=True) as (console, deadline):
        refused = console.expect(STAMP + r"REFUSED: (.*)\n", deadline, what="the refusal")
        before_refusal = console.text[: refused.start()]
        # On the splash: the refusal with its reason, and the prompt (Plymouth's agent).
        on_splash = console.expect(r"(?m)^REFUSED: (.*)\nEnter the recovery key", deadline,
                                   what="the refusal on the splash")  # fmt: skip
        console.splash_prompt("qubes-seal recovery key:", deadline)
        console.type(rkey + "\r")
        final = console.expect(STAMP + r"RESULT: (.*)\n", deadline, what="the boot's RESULT")
        result = _vm_result(console, deadline)
    print("\nboot 3: REFUSED:", refused.group(2), "\n", final.group(2))
    # Refused before the passphrase was asked: the proof (PCR 13) could not be unsealed.
    assert "qubes-seal passphrase:" not in before_refusal
    assert "PCR 13 differs" in refused.group(2)
    # Explained by component (issue 15), before the recovery prompt, with its caveat.
    explained = console.text[refused.start() : on_splash.end()]
    assert "why the TPM refused, by component" in explained, explained
    assert "the container's header changed (PCR 13)" in explained, explained
    assert "no measured launch" not in explained, explained  # the state does not cover 17
    assert "the TPM's refusal stands either way" in explained, explained
    assert "measurements do not match" in on_splash.group(1)
    _assert_through_plymouth(result, console)
    assert PROOF not in console.text
    assert final.group(2).startswith("unlocked with the recovery key")
    machine.boots["boot3"]["refused"] = refused.group(2)
    machine.boots["boot3"]["sequence"] = final.group(2)
    assert result["root_volume"] == ROOT_NAME
