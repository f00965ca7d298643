"""Vouching: the unattended reseal approves only what dom0's encrypted root vouches for.

The attack (issue 12, item 3): an evil maid drops a kernel and initramfs into the plaintext
/boot; the next routine update regenerates grub.cfg, her kernel is the newest entry, and the
reseal path unit used to predict and sign it unattended.  Here the files are vouched for by
a real RPM database (packages built with rpmbuild, registered with ``rpm --justdb`` in a
private database) and by digests recorded through the kernel-install plugin; the command
lines by an /etc/default/grub.  Each attack is run through the path unit's script with the
real CLI on swtpm: refused, exit 7, the sealed state byte for byte unchanged.  A human at a
terminal (a pty here) can still approve, after typing the confirmation.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_util import run
from rpm_util import Package, default_grub, needs_rpmbuild, packaged
from test_grub_snippets import DEFAULT_GRUB, ODD_GRUB, ODD_LINUX_WORDS, XEN_WORDS, run_snippet
from test_reseal_units import FIRST, REPO, run_wrapper, setup_machine

from qubes_seal.errors import UsageError
from qubes_seal.measure import vouch
from qubes_seal.measure.tboot import grub_module_string
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch

KV = "6.12.9-1.qubes.fc37.x86_64"
EVIL_KV = "6.13.0-evil"
EVIL_TITLE = f"Qubes, with Xen 4.19.1 and Linux {EVIL_KV} (tboot)"
PLUGIN = REPO / "kernel-install" / "60-qubes-seal.install"
#: dom0's /etc/default/grub for the fake /boot: what DEFAULT_GRUB gives, with the root device
#: named (grub-mkconfig's GRUB_DEVICE is not in /etc/default/grub).
DOM0_GRUB = {k: v for k, v in DEFAULT_GRUB.items() if k != "GRUB_DEVICE"}
DOM0_GRUB["GRUB_QUBES_SEAL_ROOT"] = DEFAULT_GRUB["GRUB_DEVICE"]


@dataclass
class Dom0:
    m: dict[str, Path]  # setup_machine's: boot, cfg, state, log, bin, argv
    db: Path
    grub: Path
    tcti: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "QUBES_SEAL_RPM_DBPATH": str(self.db),
            "QUBES_SEAL_ETC_DEFAULT_GRUB": str(self.grub),
        }

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "TSS2_LOG": "all+NONE",
               "QUBES_SEAL_STATE_DIR": str(self.m["state"]), **self.env}  # fmt: skip
        return subprocess.run([sys.executable, "-m", "qubes_seal", "--tpm", self.tcti, *args],
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip

    def sealed(self) -> bytes:
        return (self.m["state"] / "sealed.json").read_bytes()


def packages(boot: Path) -> list[Package]:
    """Xen, dom0's kernel (Fedora's layout: the image in /lib/modules, a %ghost in /boot)
    and tboot, as dom0 installed them."""
    xen, kernel = (boot / "xen-4.19.1.gz").read_bytes(), (boot / f"vmlinuz-{KV}").read_bytes()
    return [
        Package("xen-hypervisor", "4.19.1", {f"{boot}/xen-4.19.1.gz": xen}),
        Package("kernel-core", "6.12.9", {f"/lib/modules/{KV}/vmlinuz": kernel},
                ghosts=[f"{boot}/vmlinuz-{KV}"]),
        Package("tboot", "1.11.9", {f"{boot}/tboot.gz": (boot / "tboot.gz").read_bytes()}),
    ]  # fmt: skip


def kernel_install(
    d: Dom0, command: str, version: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """The kernel-install plugin, run as kernel-install runs it, with the real CLI."""
    full = {"PATH": f"{d.m['bin']}:{os.environ['PATH']}", "QUBES_SEAL_BOOT_DIR": str(d.m["boot"]),
            "QUBES_SEAL_STATE_DIR": str(d.m["state"]), **d.env, **env}  # fmt: skip
    args = [command, version, "/boot/entry"]
    if command == "add":
        args.append(f"/lib/modules/{version}/vmlinuz")
    return subprocess.run(["sh", str(PLUGIN), *args], env=full, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def make_dom0(swtpm: Swtpm, tmp_path: Path) -> Dom0:
    """setup_machine's /boot and grub.cfg, with the RPM database, /etc/default/grub, the
    initramfs recorded by the kernel-install plugin; sealed to this boot; the real CLI."""
    m = setup_machine(tmp_path)
    boot = m["boot"].resolve()
    grub = default_grub(tmp_path / "etc" / "default" / "grub", DOM0_GRUB)
    d = Dom0(m, packaged(tmp_path / "rpm", packages(boot)), grub, swtpm.tcti)
    cli = m["bin"] / "qubes-seal"
    cli.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m qubes_seal '
                   f'--tpm {swtpm.tcti} "$@"\n')  # fmt: skip
    res = kernel_install(d, "add", KV)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    txt_launch(swtpm, sample_modules(), log_path=m["log"])
    assert run(swtpm.tcti, m["state"], "seal", "--force").code == 0
    return d


def wrapper(d: Dom0) -> subprocess.CompletedProcess[str]:
    return run_wrapper(d.m, **d.env)


def regenerate_grub_cfg(d: Dom0) -> None:
    """grub2-mkconfig at the next routine update: the snippet over whatever /boot holds."""
    res = run_snippet(d.m["boot"], DEFAULT_GRUB)
    assert res.returncode == 0, res.stderr
    d.m["cfg"].write_text(res.stdout)


def plant_kernel(d: Dom0) -> None:
    boot = d.m["boot"]
    (boot / f"vmlinuz-{EVIL_KV}").write_bytes(b"MZ evil kernel")
    (boot / f"initramfs-{EVIL_KV}.img").write_bytes(b"070701 evil initramfs")


# --- The attacks, through the path unit's script ------------------------------------------------


@needs_rpmbuild
def test_vouched_update_is_approved_unattended(swtpm: Swtpm, tmp_path: Path) -> None:
    d = make_dom0(swtpm, tmp_path)
    res = wrapper(d)
    assert res.returncode == 0, res.stderr
    assert "resealed for this boot and the next one" in res.stderr
    report = d.cli("predict", "--txt-log", str(d.m["log"]), "--grub-cfg", str(d.m["cfg"]),
                   "--entry", FIRST, "--boot-dir", str(d.m["boot"]), "--json")  # fmt: skip
    doc = json.loads(report.stdout)["vouch"]
    assert doc["vouched"], doc
    by = {f["role"]: f["vouched_by"] for f in doc["files"]}
    assert by["xen"].startswith("RPM xen-hypervisor-4.19.1-1.noarch")
    assert by["kernel"].startswith("RPM kernel-core-6.12.9-1.noarch")
    assert by["kernel"].endswith(f"(as /lib/modules/{KV}/vmlinuz)")
    assert by["tboot"].startswith("RPM tboot-1.11.9-1.noarch")
    assert "recorded" in by["initramfs"] and "kernel-install" in by["initramfs"]


@needs_rpmbuild
def test_planted_kernel_in_boot_is_refused_unattended(swtpm: Swtpm, tmp_path: Path) -> None:
    d = make_dom0(swtpm, tmp_path)
    before = d.sealed()
    plant_kernel(d)
    regenerate_grub_cfg(d)  # her kernel is now the newest entry
    assert EVIL_TITLE in d.m["cfg"].read_text()
    res = wrapper(d)
    assert res.returncode == 7, res.stderr
    assert "refusing to approve this boot and the predicted one unattended" in res.stderr
    assert f"vmlinuz-{EVIL_KV}" in res.stderr and "not owned by any installed RPM" in res.stderr
    assert f"initramfs-{EVIL_KV}.img" in res.stderr and "no digest recorded" in res.stderr
    assert "refused to approve" in res.stderr and "Nothing was resealed" in res.stderr
    assert d.sealed() == before


def _tamper_xen(d: Dom0) -> str:
    (d.m["boot"] / "xen-4.19.1.gz").write_bytes(gzip.compress(b"\x7fELF evil xen"))
    return "its content differs from"


def _tamper_initramfs(d: Dom0) -> str:
    (d.m["boot"] / f"initramfs-{KV}.img").write_bytes(b"070701 evil, same name")
    return "differs from the digest recorded"


def edit_first_entry(d: Dom0, old: str, new: str) -> None:
    """Her edit of grub.cfg: the first occurrence of ``old`` (in the newest entry)."""
    cfg = d.m["cfg"]
    text = cfg.read_text()
    assert old in text
    cfg.write_text(text.replace(old, new, 1))


def _kernel_cmdline(d: Dom0) -> str:
    edit_first_entry(d, "rhgb quiet", "rhgb quiet init=/bin/sh")
    return "kernel command line"


def _root_device(d: Dom0) -> str:
    edit_first_entry(d, "root=/dev/mapper/qubes_dom0-root", "root=/dev/sdz1")
    return "kernel command line"


def _xen_cmdline(d: Dom0) -> str:
    edit_first_entry(d, "smt=off", "smt=on")
    return "xen command line"


def _extra_module(d: Dom0) -> str:
    (d.m["boot"] / "evil.mod").write_bytes(b"an XSM policy of hers")
    first = f"--nounzip /initramfs-{KV}.img\n"
    edit_first_entry(d, first, first + "\tmodule2 /evil.mod\n")
    return "not exactly xen, kernel, initramfs"


ATTACKS = {"tampered-xen": _tamper_xen, "replaced-initramfs": _tamper_initramfs,
           "kernel-cmdline": _kernel_cmdline, "root-device": _root_device,
           "xen-cmdline": _xen_cmdline, "extra-module": _extra_module}  # fmt: skip


@needs_rpmbuild
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_evil_maid_edits_are_refused_unattended(swtpm: Swtpm, tmp_path: Path, attack: str) -> None:
    d = make_dom0(swtpm, tmp_path)
    before = d.sealed()
    reason = ATTACKS[attack](d)
    res = wrapper(d)
    assert res.returncode == 7, res.stderr
    assert reason in res.stderr
    assert d.sealed() == before


def on_pty(cmd: list[str], env: dict[str, str], answer: str) -> tuple[int, str]:
    """Run ``cmd`` on a pseudo-terminal; type ``answer`` when it asks for the confirmation."""
    master, slave = os.openpty()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)  # fmt: skip
    os.close(slave)
    out, answered = b"", False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                if not answered and b"Type 'approve'" in out:
                    os.write(master, answer.encode() + b"\n")
                    answered = True
            elif proc.poll() is not None:
                break
        return proc.wait(timeout=30), out.decode(errors="replace")
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()


@needs_rpmbuild
def test_a_human_at_a_terminal_approves_after_typing_the_confirmation(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    d = make_dom0(swtpm, tmp_path)
    before = d.sealed()
    plant_kernel(d)  # or a kernel the user built and installed by hand: only a human can tell
    regenerate_grub_cfg(d)
    m = d.m
    cmd = [sys.executable, "-m", "qubes_seal", "--tpm", d.tcti, "--state-dir", str(m["state"]),
           "reseal", "--predict", "--txt-log", str(m["log"]), "--grub-cfg", str(m["cfg"]),
           "--entry", EVIL_TITLE, "--boot-dir", str(m["boot"])]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "TSS2_LOG": "all+NONE", **d.env}
    evil_sha = hashlib.sha256((m["boot"] / f"vmlinuz-{EVIL_KV}").read_bytes()).hexdigest()
    code, out = on_pty(cmd, env, "yes")  # anything but the word refuses
    assert code == 7, out
    assert evil_sha in out and f"version {EVIL_KV}" in out and "NOT VOUCHED" in out
    assert "vouched by RPM xen-hypervisor-4.19.1-1" in out
    assert "not confirmed" in out
    assert d.sealed() == before

    code, out = on_pty(cmd, env, "approve")
    assert code == 0, out
    assert "resealed the master secret" in out
    assert d.sealed() != before


# --- The pieces -------------------------------------------------------------------------------


@needs_rpmbuild
def test_rpm_database_vouches_by_digest_and_path(tmp_path: Path) -> None:
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "xen-4.19.1.gz").write_bytes(b"xen")
    (boot / f"vmlinuz-{KV}").write_bytes(b"kernel")
    (boot / "vmlinuz-copied").write_bytes(b"kernel")  # the right bytes under another name
    (boot / "xen-4.18.0.gz").write_bytes(b"unpackaged")
    db = packaged(tmp_path, [
        Package("xen-hypervisor", "4.19.1", {f"{boot}/xen-4.19.1.gz": b"xen"}),
        Package("kernel-core", "6.12.9", {f"/usr/lib/modules/{KV}/vmlinuz": b"kernel"},
                ghosts=[f"{boot}/vmlinuz-{KV}"]),
    ])  # fmt: skip
    rpm, records = vouch.RpmDb(db), vouch.Records(tmp_path / "state")
    f = vouch.vouch_file("xen", boot / "xen-4.19.1.gz", rpm=rpm, records=records)
    assert f.vouched and f.version == "4.19.1-1" and "xen-hypervisor-4.19.1-1" in f.vouched_by
    f = vouch.vouch_file("kernel", boot / f"vmlinuz-{KV}", rpm=rpm, records=records)
    assert f.vouched and f.vouched_by.endswith(f"(as /usr/lib/modules/{KV}/vmlinuz)")
    for name in ("vmlinuz-copied", "xen-4.18.0.gz"):
        f = vouch.vouch_file("kernel", boot / name, rpm=rpm, records=records)
        assert not f.vouched and "not owned by any installed RPM package" in (f.reason or "")
    (boot / "xen-4.19.1.gz").write_bytes(b"evil")
    f = vouch.vouch_file("xen", boot / "xen-4.19.1.gz", rpm=rpm, records=records)
    assert not f.vouched and "content differs from" in (f.reason or "")


@needs_rpmbuild
def test_md5_file_digests_are_refused(tmp_path: Path) -> None:
    (tmp_path / "xen.gz").write_bytes(b"xen")
    db = packaged(tmp_path, [Package("old-xen", "4.1", {f"{tmp_path}/xen.gz": b"xen"})],
                  digest_algo=1)  # fmt: skip
    f = vouch.vouch_file("xen", tmp_path / "xen.gz", rpm=vouch.RpmDb(db),
                         records=vouch.Records(tmp_path / "state"))  # fmt: skip
    assert not f.vouched and "only MD5 file digests (refused)" in (f.reason or "")


def test_without_rpm_or_its_database_nothing_is_vouched_by_rpm(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    records = vouch.Records(tmp_path / "state")
    f = vouch.vouch_file("xen", tmp_path / "f", rpm=vouch.RpmDb(None, rpm=""), records=records)
    assert not f.vouched and "no rpm command" in (f.reason or "")
    missing = tmp_path / "no-db"
    f = vouch.vouch_file("xen", tmp_path / "f", rpm=vouch.RpmDb(missing), records=records)
    assert not f.vouched and "no RPM database" in (f.reason or "")
    assert not missing.exists()  # a query would have created an empty database


def test_vouch_record_check_list_forget(tmp_path: Path) -> None:
    state = tmp_path / "state"
    initramfs = tmp_path / "initramfs-6.12.9.img"
    initramfs.write_bytes(b"070701 built by dracut")
    tcti = "swtpm:host=127.0.0.1,port=1"  # no TPM needed
    nodb = ["--rpm-dbpath", str(tmp_path / "no-db")]
    assert run(tcti, state, "vouch", "check", str(initramfs), *nodb).code == 7
    res = run(tcti, state, "vouch", "record", str(initramfs), "--by", "test", *nodb)
    assert res.code == 0, res.err
    assert (state / "vouched.json").stat().st_mode & 0o777 == 0o600
    res = run(tcti, state, "vouch", "check", str(initramfs), *nodb, "--json")
    assert res.code == 0, res.err
    assert res.json()["files"][0]["version"] == "6.12.9"
    res = run(tcti, state, "vouch", "list", "--json")
    assert list(res.json()["records"]) == [str(initramfs.resolve())]
    initramfs.write_bytes(b"070701 rebuilt by someone else")
    res = run(tcti, state, "vouch", "check", str(initramfs), *nodb)
    assert res.code == 7 and "differs from the digest recorded" in res.out
    assert run(tcti, state, "vouch", "forget", str(initramfs)).code == 0
    assert run(tcti, state, "vouch", "list", "--json").json()["records"] == {}
    (state / "vouched.json").write_text('{"version": 1, "files": {"/x": {"sha256": "zz"}}}')
    assert run(tcti, state, "vouch", "list").code == 7


@needs_rpmbuild
def test_vouch_record_refuses_a_modified_packaged_file(tmp_path: Path) -> None:
    xen = tmp_path / "xen-4.19.1.gz"
    xen.write_bytes(b"evil")
    db = packaged(tmp_path, [Package("xen-hypervisor", "4.19.1", {str(xen): b"xen"})])
    res = run("swtpm:port=1", tmp_path / "state", "vouch", "record", str(xen), "--rpm-dbpath",
              str(db))  # fmt: skip
    assert res.code == 7 and "Reinstall its package" in res.err
    assert not (tmp_path / "state" / "vouched.json").exists()


@needs_rpmbuild
def test_kernel_install_plugin_records_and_forgets_the_initramfs(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    d = make_dom0(swtpm, tmp_path)  # ran 'add' for KV
    records = vouch.Records(d.m["state"])
    initramfs = str((d.m["boot"] / f"initramfs-{KV}.img").resolve())
    assert records.entries[initramfs].by == "kernel-install"
    assert records.entries[initramfs].version == KV
    res = kernel_install(d, "remove", KV)
    assert res.returncode == 0
    assert initramfs not in vouch.Records(d.m["state"]).entries
    # A failing qubes-seal never fails the kernel installation.
    res = kernel_install(d, "add", KV, QUBES_SEAL_VOUCH_COMMAND="false")
    assert res.returncode == 0 and "could not record" in res.stderr


def test_command_lines_follow_the_snippet_rules(tmp_path: Path) -> None:
    odd = {k: v for k, v in ODD_GRUB.items() if k != "GRUB_DEVICE"}
    odd["GRUB_QUBES_SEAL_ROOT"] = ODD_GRUB["GRUB_DEVICE"]
    dom0 = vouch.dom0_cmdlines(default_grub(tmp_path / "grub", odd))
    assert dom0.expected("kernel") == grub_module_string(ODD_LINUX_WORDS)
    assert dom0.expected("xen") == grub_module_string(XEN_WORDS)
    # A shell file, read by sh: command substitutions and variables as grub-mkconfig sees them.
    f = tmp_path / "grub2"
    f.write_text('X=quiet\nGRUB_CMDLINE_LINUX="rhgb $X"\nGRUB_QUBES_SEAL_ROOT=""\n'
                 'GRUB_DISTRIBUTOR="$(echo Qubes)"\n')  # fmt: skip
    f.chmod(0o644)
    assert vouch.dom0_cmdlines(f).expected("kernel") == b"rhgb quiet"
    for value in ["console=$console", "'unterminated", "a\\"]:
        with pytest.raises(UsageError):
            vouch.config_words("GRUB_CMDLINE_XEN", value)
    f.chmod(0o666)  # writable by others: not dom0's word
    with pytest.raises(UsageError, match="writable only by it"):
        vouch.dom0_cmdlines(f)


def test_root_device_without_grub_qubes_seal_root(tmp_path: Path) -> None:
    f = default_grub(tmp_path / "grub", {"GRUB_CMDLINE_LINUX": "rhgb quiet"})
    dom0 = vouch.dom0_cmdlines(f)
    assert dom0.root is None and dom0.expected("kernel") is None
    for found in (b"root=/dev/sdz9 ro rhgb quiet", b"root=UUID=0000-evil ro rhgb quiet",
                  b"ro rhgb quiet", b"root=/dev/sdz9 ro rhgb quiet init=/bin/sh"):  # fmt: skip
        finding = vouch.check_cmdline("kernel", found, dom0)
        assert not finding.vouched and "GRUB_QUBES_SEAL_ROOT" in (finding.reason or "")
    # The block device that holds / here, if this machine shows one, is accepted.
    dev = os.stat("/").st_dev
    for name in sorted(os.listdir("/dev")) if os.path.isdir("/dev") else []:
        try:
            st = os.stat(f"/dev/{name}")
        except OSError:
            continue
        if st.st_rdev == dev and (st.st_mode & 0o170000) == 0o060000:
            found = f"root=/dev/{name} ro rhgb quiet".encode()
            assert vouch.check_cmdline("kernel", found, dom0).vouched
            break
