"""The dracut module: a real initramfs is built, inspected, unpacked, and booted in a chroot.

The image is built once per module (about 5 to 30 s) from a copy of /usr/lib/dracut with
``dracut-module/90qubes-seal`` added under ``modules.d``, with ``QUBES_SEAL_PYTHON`` set to
this interpreter (a virtual environment's python: its site-packages are used).

The chroot test is the proof that the image is self-sufficient: the boot sequence runs with
the image's own interpreter, modules and libraries (``chroot DIR /usr/bin/python3 -m
qubes_seal.boot``), against swtpm on loopback (the chroot shares the host's network), and the
passphrase arrives through systemd-ask-password's agent protocol, with this test as the agent.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_util import run

from qubes_seal import chain, handover
from qubes_seal.luks.container import Container
from qubes_seal.luks.header import header_digest
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch
from qubes_seal.tpm.device import Tpm

# The image is built once per module: its tests stay on one pytest-xdist worker (./run-tests).
pytestmark = pytest.mark.xdist_group("dracut")

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "dracut-module" / "90qubes-seal"
HELPER = MODULE_DIR / "qubes-seal-modules.py"
MODULES = "base systemd systemd-initrd dracut-systemd crypt qubes-seal"
PASSPHRASE = "initramfs passphrase"
CHEAP_KDF = ["--kdf-memory", "8192", "--kdf-time", "20"]
UNIT = "qubes-seal-unlock.service"


def _missing_tools() -> str | None:
    if os.geteuid() != 0:
        return "building and chrooting into an initramfs needs root"
    for tool in ("dracut", "lsinitrd", "chroot", "mount", "umount", "systemd-ask-password"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path("/usr/lib/dracut/modules.d").is_dir():
        return "/usr/lib/dracut is missing (Debian packages dracut-core, dracut)"
    return None


@dataclass
class Image:
    path: Path
    seconds: float
    listing: str


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    why = _missing_tools()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("dracut")
    base = work / "dracut"
    shutil.copytree("/usr/lib/dracut", base, symlinks=True)
    shutil.copytree(MODULE_DIR, base / "modules.d" / MODULE_DIR.name)
    out = work / "initramfs.img"
    env = dict(os.environ, dracutbasedir=str(base), QUBES_SEAL_PYTHON=sys.executable)
    started = time.monotonic()
    proc = subprocess.run(
        ["dracut", "--no-hostonly", "--no-kernel", "--no-compress", "--no-early-microcode",
         "-m", MODULES, "-f", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Including module: qubes-seal" in proc.stderr + proc.stdout
    listing = subprocess.run(["lsinitrd", str(out)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    return Image(out, seconds, listing)


# -- the module list ----------------------------------------------------------------------------


def test_module_list_is_computed_from_the_boot_path() -> None:
    proc = subprocess.run([sys.executable, str(HELPER), "--json"], capture_output=True,
                          text=True, check=True)  # fmt: skip
    closure = json.loads(proc.stdout)
    ours = set(closure["qubes_seal"])
    # Imported lazily, inside functions, on the boot path: found by the AST walk.
    for name in ("qubes_seal.chain", "qubes_seal.attest", "qubes_seal.tpm.unseal",
                 "qubes_seal.tpm.esys", "qubes_seal.luks.payload", "qubes_seal.recovery",
                 "qubes_seal.kdf.derivation", "qubes_seal.keystore.slots"):  # fmt: skip
        assert name in ours, name
    # The TXT event-log capture (boot/capture.py): the heap reader and the log parser.
    assert {"qubes_seal.boot.capture", "qubes_seal.measure.txt_heap",
            "qubes_seal.measure.eventlog"} <= ours  # fmt: skip
    # Not on the boot path: the CLI, the simulator, the service, tboot's digests (gzip, lzma),
    # and sealing (imports marked "# not on the boot path": it needs tpm2-pytss's ESAPI).
    elsewhere = ("qubes_seal.cli", "qubes_seal.sim", "qubes_seal.service", "qubes_seal.measure.",
                 "qubes_seal.tpm.seal", "qubes_seal.tpm.device")  # fmt: skip
    capture = {"qubes_seal.measure.txt_heap", "qubes_seal.measure.eventlog",
               "qubes_seal.measure.explain"}  # a refusal explained at the prompt  # fmt: skip
    assert not [n for n in ours - capture if n.startswith(elsewhere)]
    assert {"pyudev", "argon2.low_level", "tomllib", "getpass"} <= set(closure["imports"])
    # The boot path reaches the TPM through ctypes and does its own AES-XTS and HKDF: the
    # tpm2-pytss and cryptography wheels (20 MiB with what they link) stay out of the image.
    assert not [m for m in closure["imports"] if m.startswith(("tpm2_pytss", "cryptography"))]


def test_manifest_maps_every_module_under_the_image_stdlib(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(HELPER), "--pyc-dir", str(tmp_path),
                           "--no-sources"], capture_output=True, text=True, check=True)  # fmt: skip
    records = [line.split("\t") for line in proc.stdout.splitlines()]
    kinds = {r[0] for r in records}
    assert kinds <= {"interpreter", "dir", "file", "native", "library"}
    interpreter = next(r[1] for r in records if r[0] == "interpreter")
    assert not Path(interpreter).is_symlink()  # a venv's python resolved to the real one
    lib = f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}"
    dests = [r[2] for r in records if r[0] in ("file", "native")]
    assert all(d.startswith(lib + "/") for d in dests)
    assert f"{lib}/os.pyc" in dests  # the interpreter's prefix landmark
    assert f"{lib}/qubes_seal/boot/sequence.pyc" in dests
    assert not [d for d in dests if "/qubes_seal/cli/" in d or "_distutils_hack" in d]
    assert not [d for d in dests if "/tpm2_pytss/" in d or "/cryptography/" in d]


# -- the image --------------------------------------------------------------------------------


@pytest.mark.slow
def test_lsinitrd_shows_everything_the_boot_needs(image: Image) -> None:
    text = image.listing
    lib = f"usr/lib/python{sys.version_info.major}.{sys.version_info.minor}"
    for needle in (
        " usr/bin/python3",
        f"{lib}/os.pyc",
        f"{lib}/qubes_seal/boot/sequence.pyc",
        f"{lib}/qubes_seal/boot/__main__.pyc",
        f"{lib}/qubes_seal/tpm/unseal.pyc",
        f"{lib}/qubes_seal/tpm/esys.pyc",
        f"{lib}/_argon2_cffi_bindings/_ffi",
        f"{lib}/pyudev/",
        "usr/sbin/cryptsetup",
        "libcryptsetup.so.12",
        "libtss2-tcti-device.so.0",
        "libtss2-tcti-swtpm.so.0",
        "libtss2-esys.so.0",
        "libtss2-mu.so.0",
        "libtss2-tctildr.so.0",
        "libcrypto.so.3",
        "libudev.so.1",
        "usr/bin/systemd-ask-password",
        f"usr/lib/systemd/system/{UNIT}",
        f"etc/systemd/system/initrd.target.wants/{UNIT}",
    ):
        assert needle in text, needle
    # Not the CLI, nor the sources (sourceless .pyc by default), nor the build host's hooks.
    assert "qubes_seal/cli" not in text
    assert "qubes_seal/boot/sequence.py\n" not in text
    assert "_distutils_hack" not in text
    assert "site-packages" not in text


@pytest.mark.slow
def test_unit_is_ordered_before_cryptsetup(image: Image) -> None:
    unit = subprocess.run(["lsinitrd", "-f", f"usr/lib/systemd/system/{UNIT}", str(image.path)],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    keys: dict[str, str] = {}  # repeated keys accumulate, as systemd reads them
    for line in unit.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            keys[key.strip()] = (keys.get(key.strip(), "") + " " + value.strip()).strip()
    assert keys["DefaultDependencies"] == "no"
    assert "cryptsetup-pre.target" in keys["Before"].split()
    assert "cryptsetup-pre.target" in keys["Wants"].split()
    assert "systemd-udev-trigger.service" in keys["After"].split()
    assert keys["ExecStart"].startswith("/usr/bin/python3 -I -m qubes_seal.boot")
    assert keys["StandardOutput"] == "journal+console"


# -- booting the unpacked image in a chroot ----------------------------------------------------


class Chroot:
    """The unpacked image with /dev, /proc and a fresh /run mounted; unmounted by close()."""

    def __init__(self, image: Path, root: Path) -> None:
        self.root = root
        self.mounts: list[Path] = []
        root.mkdir()
        subprocess.run(["lsinitrd", "--unpack", str(image)], cwd=root, check=True,
                       capture_output=True)  # fmt: skip
        try:
            self._mount(["--bind", "/dev"], root / "dev")
            self._mount(["-t", "proc", "proc"], root / "proc")
            self._mount(["-t", "tmpfs", "-o", "mode=0755", "tmpfs"], root / "run")
        except BaseException:
            self.close()
            raise

    def _mount(self, args: list[str], target: Path) -> None:
        target.mkdir(exist_ok=True)
        proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount in this sandbox ({proc.stderr.strip()})")
        self.mounts.append(target)

    def close(self) -> None:
        # Anything the boot mounted below ours first (the ramfs of the runtime key files).
        mounted = Path("/proc/self/mountinfo").read_text().splitlines()
        inner = sorted({Path(line.split()[4]) for line in mounted
                        if line.split()[4].startswith(str(self.root) + "/")},
                       key=lambda p: len(str(p)), reverse=True)  # fmt: skip
        for target in inner:
            if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(target)], capture_output=True)
        self.mounts.clear()


def answer_ask_password(root: Path, secret: str, proc: subprocess.Popen[str],
                        timeout: float = 60.0) -> dict[str, str]:  # fmt: skip
    """Act as a systemd password agent for the chroot: answer the first question asked.

    systemd's "Password Agents" protocol: the asking process writes an INI file
    ``/run/systemd/ask-password/ask.XXXX`` with ``Socket=``; an agent sends ``+PASSWORD`` as
    one datagram to that AF_UNIX socket (``-`` to cancel).
    """
    folder = root / "run/systemd/ask-password"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError("the boot ended before asking the passphrase")
        for ask in sorted(folder.glob("ask.*")) if folder.is_dir() else []:
            parsed = configparser.ConfigParser(interpolation=None)
            try:
                parsed.read_string(ask.read_text())
            except (OSError, configparser.Error):
                continue  # being written
            if "Ask" not in parsed or "Socket" not in parsed["Ask"]:
                continue
            fields = dict(parsed["Ask"])
            sock_path = root / fields["socket"].lstrip("/")
            # sun_path holds 108 bytes: reach the socket through a descriptor of its folder.
            dirfd = os.open(sock_path.parent, os.O_PATH)
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                    sock.sendto(b"+" + secret.encode(), f"/proc/self/fd/{dirfd}/{sock_path.name}")
            finally:
                os.close(dirfd)
            return fields
        time.sleep(0.02)
    raise AssertionError("no ask-password request appeared")


@pytest.fixture
def chroot(image: Image, tmp_path: Path) -> Iterator[Chroot]:
    c = Chroot(image.path, tmp_path / "root")
    try:
        yield c
    finally:
        c.close()


@pytest.mark.slow
def test_boot_sequence_runs_inside_the_unpacked_image(chroot: Chroot, swtpm: Swtpm,
                                                      tmp_path: Path) -> None:  # fmt: skip
    # On the host, as tests/test_boot.py does: a TXT launch, then `qubes-seal init`.
    host = tmp_path / "host"
    host.mkdir()
    (host / "pw").write_text(PASSPHRASE + "\n")
    container = host / "keys.luks"
    txt_launch(swtpm, sample_modules())
    res = run(swtpm.tcti, host / "state", "init", "--container", str(container),
              "--passphrase-file", str(host / "pw"), "--recovery-key-file", str(host / "rk"),
              "--dom0-root-volume", "luks-dom0root", *CHEAP_KDF)  # fmt: skip
    assert res.code == 0, res.err
    res = run(swtpm.tcti, host / "state", "attest", "setup", "--text", "otter in the reeds",
              "--container", str(container))  # fmt: skip
    assert res.code == 0, res.err

    # The next boot: a fresh TPM boot and launch; the image has only its own files.
    root = chroot.root
    shutil.copy2(container, root / "keys.luks")
    (root / "etc/qubes-seal").mkdir(parents=True, exist_ok=True)
    (root / "etc/qubes-seal/boot.toml").write_text(
        "[boot]\n"
        'container = "/keys.luks"\n'
        f'tpm = "{swtpm.tcti}"\n'
        'ask = "systemd"\n'
        'console = "/console.log"\n'
        'txt_mem = "/mem.img"\n'
        "timeout = 10.0\n"
    )
    chain.lock(container)  # a reboot: root's keyring starts empty (init's hand-over is gone)
    swtpm.reboot()
    # The launch leaves the TXT registers and heap in memory: the image's /dev/mem.
    launch = txt_launch(swtpm, sample_modules(), image_path=root / "mem.img")
    uuid = Container(container).uuid
    assert handover.get(uuid) is None

    started = time.monotonic()
    proc = subprocess.Popen(
        ["chroot", str(root), "/usr/bin/python3", "-I", "-m", "qubes_seal.boot",
         "--config", "/etc/qubes-seal/boot.toml"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "TSS2_LOG": "all+NONE"},
    )  # fmt: skip
    try:
        asked = answer_ask_password(root, PASSPHRASE, proc)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    seconds = time.monotonic() - started
    console = (root / "console.log").read_text()
    try:
        assert asked["message"] == "qubes-seal passphrase:"
        assert asked["id"] == "qubes-seal:unlock"
        assert proc.returncode == 0, console + out + err
        assert "Traceback" not in err, err
        assert "No module named" not in console + err
        assert console.index("otter in the reeds") < console.index("container open")
        assert "RESULT: unlocked with the TPM and passphrase" in console
        # This boot's TXT event log, captured, checked against PCR 17/18, in /run.
        assert "TXT event log captured" in console, console
        assert (root / "run/qubes-seal/txt-event.log").read_bytes() == launch.log
        # dom0's root volume key, on the ramfs the boot mounted in the chroot's /run.
        key = root / "run/cryptsetup-keys.d/luks-dom0root.key"
        assert key.stat().st_mode & 0o777 == 0o400
        assert len(key.read_bytes()) == 64
        # PCR 13 capped: extended with the header digest, then with the separator.
        header_only = chain.pcr13_after_extend(header_digest(container))
        with Tpm(swtpm.tcti) as tpm:
            pcr13 = tpm.read_pcrs([13])[13]
        assert pcr13 not in (bytes(32), header_only)
        assert handover.get(uuid) is not None  # in root's user keyring
        print(f"\nchroot boot: {seconds:.2f} s wall; {console.strip().splitlines()[-1]}")
    finally:
        assert chain.lock(container)
    assert handover.get(uuid) is None
