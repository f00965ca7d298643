"""The boot sequence (python -m qubes_seal.boot) on the host, against swtpm and cryptsetup."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from cli_util import run

from qubes_seal import attest, chain
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch
from qubes_seal.tpm.device import Tpm

PASSPHRASE = "boot passphrase"
CHEAP_KDF = ["--kdf-memory", "8192", "--kdf-time", "20"]


class Machine:
    def __init__(self, swtpm: Swtpm, root: Path) -> None:
        self.swtpm = swtpm
        self.root = root
        self.container = root / "keys.luks"
        self.pw = root / "pw"
        self.pw.write_text(PASSPHRASE + "\n")
        self.rk = root / "rk"
        self.console = root / "console.log"
        self.keys = root / "cryptsetup-keys.d"

    def cli(self, *args: str) -> object:
        return run(self.swtpm.tcti, self.root / "state", *args, "--container", str(self.container))

    def config(self, **extra: object) -> Path:
        values = {
            "container": str(self.container),
            "tpm": self.swtpm.tcti,
            "ask": f"file:{self.pw}",
            "recovery_ask": f"file:{self.rk}",
            "console": str(self.console),
            "keys_dir": str(self.keys),
            "timeout": 5.0,
            **extra,
        }
        lines = ["[boot]"]
        for k, v in values.items():
            lines.append(f"{k} = {v!r}".replace("'", '"') if not isinstance(v, bool)
                         else f"{k} = {str(v).lower()}")  # fmt: skip
        path = self.root / "boot.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def boot(self, *, launch: bool = True, **changes: str) -> tuple[int, str]:
        self.swtpm.reboot()
        if launch:
            txt_launch(self.swtpm, sample_modules(**changes))
        return self.run_sequence()

    def run_sequence(self) -> tuple[int, str]:
        """``python -m qubes_seal.boot`` with this machine's boot.toml; (exit code, console)."""
        if self.console.exists():
            self.console.unlink()
        proc = subprocess.run(
            [sys.executable, "-m", "qubes_seal.boot", "--config", str(self.config())],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.returncode, self.console.read_text() if self.console.exists() else ""


def new_machine(swtpm: Swtpm, tmp_path: Path) -> Machine:
    """A launch, then ``init`` with dom0's root volume (a cheap KDF)."""
    m = Machine(swtpm, tmp_path)
    txt_launch(swtpm, sample_modules())
    res = run(swtpm.tcti, tmp_path / "state", "init", "--container", str(m.container),
              "--passphrase-file", str(m.pw), "--recovery-key-file", str(m.rk),
              "--dom0-root-volume", "luks-dom0root", *CHEAP_KDF)  # fmt: skip
    assert res.code == 0, res.err
    return m


def shut_down(m: Machine) -> None:
    """No hand-over left in root's keyring, no ramfs left mounted."""
    chain.lock(m.container)
    if os.path.ismount(m.keys):  # the boot mounts a ramfs there, as in the initramfs
        subprocess.run(["umount", str(m.keys)], check=True)


@pytest.fixture
def machine(swtpm: Swtpm, tmp_path: Path):  # type: ignore[no-untyped-def]
    m = new_machine(swtpm, tmp_path)
    yield m
    shut_down(m)


def test_genuine_boot_shows_the_proof_then_unlocks(machine: Machine) -> None:
    res = machine.cli("attest", "setup", "--text", "blue heron over the lake")
    assert res.code == 0, res.err  # type: ignore[attr-defined]
    code, out = machine.boot()
    assert code == 0, out
    proof_at = out.index("blue heron over the lake")
    assert "do NOT type your passphrase" in out
    assert out.index("container open") > proof_at
    assert "RESULT: unlocked with the TPM and passphrase" in out
    # dom0's root volume key, for systemd-cryptsetup, mode 0400.
    key = machine.keys / "luks-dom0root.key"
    assert key.stat().st_mode & 0o777 == 0o400
    assert len(key.read_bytes()) == 64
    # PCR 13 is capped: the proof cannot be shown again in this boot.
    with Tpm(machine.swtpm.tcti) as tpm:
        assert tpm.read_pcrs([13])[13] != bytes(32)
    assert machine.cli("attest", "show").code == 3  # type: ignore[attr-defined]


def test_totp_proof_matches_the_phone(machine: Machine) -> None:
    res = machine.cli("attest", "setup", "--totp", "--json")
    uri = res.json()["otpauth_uri"]  # type: ignore[attr-defined]
    seed = parse_qs(urlparse(uri).query)["secret"][0]
    seed_bytes = base64.b32decode(seed + "=" * (-len(seed) % 8))
    code, out = machine.boot()
    assert code == 0, out
    shown = re.search(r"TOTP code now\): (\d{6})", out)
    assert shown is not None, out
    now = time.time()
    assert shown.group(1) in {attest.totp(seed_bytes, at=now - d) for d in (0, 30, 60)}


def test_no_measured_launch_asks_for_the_recovery_key(machine: Machine) -> None:
    code, out = machine.boot(launch=False)
    assert code == 0, out
    assert "no TXT measured launch" in out
    assert "recovery key" in out
    assert "RESULT: unlocked with the recovery key" in out
    assert "Nothing was resealed" in out
    with Tpm(machine.swtpm.tcti) as tpm:  # capped after the recovery too (13 was never
        # extended: the launch check refused first), so PCR 13 = H(0 || cap separator)
        assert tpm.read_pcrs([13])[13] == chain.pcr13_after_extend(chain.CAP_DIGEST)


def test_tampered_boot_refused_and_bad_recovery_key_fails(machine: Machine) -> None:
    machine.rk.write_text("cbcbcb-cbcbcb-cbcbcb-cbcbcb-cbcbcb-cbcbcb-cbcbcb-cbcbcb\n")
    machine.cli("attest", "setup", "--text", "blue heron")
    code, out = machine.boot(xen_version="evil")
    assert code == 3, out
    assert "measurements do not match" in out
    assert "blue heron" not in out  # no proof in a tampered boot
    assert "recovery key refused" in out


def test_wrong_passphrases_then_recovery(machine: Machine) -> None:
    machine.pw.write_text("wrong\n")
    code, out = machine.boot()
    assert code == 0, out
    assert out.count("wrong passphrase") >= 1
    assert "RESULT: unlocked with the recovery key" in out


def test_unsafe_option_needs_test_mode(machine: Machine, tmp_path: Path) -> None:
    cfg = machine.config(unsafe_no_measured_launch=True)
    proc = subprocess.run([sys.executable, "-m", "qubes_seal.boot", "--config", str(cfg)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode != 0
    assert "unsafe_test_mode" in proc.stderr
    assert os.environ.get("QUBES_SEAL_BOOT_UNSAFE_TEST_MODE") is None


def test_forget_root_key_removes_only_what_the_unlock_wrote(tmp_path: Path) -> None:
    """The unit's ExecStop (at the switch-root) removes dom0's root volume key file: root's
    read-only *.key files only, overwritten first; anything else in the directory is kept."""
    from qubes_seal.boot.sequence import forget_root_key, main

    keys = tmp_path / "cryptsetup-keys.d"
    keys.mkdir(mode=0o700)
    ours = keys / "luks-dom0root.key"
    fd = os.open(ours, os.O_WRONLY | os.O_CREAT, 0o400)
    os.write(fd, b"k" * 64)
    os.close(fd)
    foreign = keys / "swap.key"  # an admin's own key file (0600): not ours
    foreign.write_bytes(b"x")
    foreign.chmod(0o600)
    (keys / "notes.txt").write_text("kept")
    (keys / "link.key").symlink_to(ours)
    assert forget_root_key(keys) == ["luks-dom0root.key"]
    assert sorted(p.name for p in keys.iterdir()) == ["link.key", "notes.txt", "swap.key"]
    assert forget_root_key(tmp_path / "absent") == []
    # The command line the unit runs, with the configuration's keys_dir.
    fd = os.open(ours, os.O_WRONLY | os.O_CREAT, 0o400)
    os.close(fd)
    cfg = tmp_path / "boot.toml"
    cfg.write_text(f'[boot]\ncontainer = "/dev/null"\nkeys_dir = "{keys}"\n')
    assert main(["--config", str(cfg), "--forget-root-key"]) == 0
    assert not ours.exists()
