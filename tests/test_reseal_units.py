"""systemd/qubes-seal-reseal.{path,service} and the wrapper they run.

``systemd-analyze verify`` checks that ExecStart= names an executable file: the unit names
the installed path (/usr/libexec/qubes-seal/...), absent on a build machine, so the test
verifies a copy whose ExecStart= points at the wrapper in this repository, and shows that
this path is the only complaint about the original.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_util import run
from rpm_util import default_grub
from test_grub_snippets import (
    DEFAULT_GRUB,
    LINUX_WORDS,
    ODD_GRUB,
    ODD_TITLE,
    XEN_WORDS,
    make_boot,
    run_snippet,
)

from qubes_seal import state
from qubes_seal.measure.grub import find_entry
from qubes_seal.measure.tboot import grub_module_string, load_module_image
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import Module, sample_modules, txt_launch

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
WRAPPER = UNITS / "qubes-seal-reseal-on-update"
INSTALLED = "/usr/libexec/qubes-seal/qubes-seal-reseal-on-update"
FIRST = "Qubes, with Xen 4.19.1 and Linux 6.12.9-1.qubes.fc37.x86_64 (tboot)"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def unit_copies(folder: Path) -> list[Path]:
    folder.mkdir()
    out = []
    for name in ("qubes-seal-reseal.path", "qubes-seal-reseal.service"):
        text = (UNITS / name).read_text().replace(INSTALLED, str(WRAPPER))
        (folder / name).write_text(text)
        out.append(folder / name)
    return out


@needs_analyze
def test_units_verify_clean(tmp_path: Path) -> None:
    units = unit_copies(tmp_path / "units")
    res = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout + res.stderr == ""
    # The original differs only by ExecStart=, which verify requires to exist.
    orig = subprocess.run(["systemd-analyze", "verify", str(UNITS / "qubes-seal-reseal.service")],
                          capture_output=True, text=True)  # fmt: skip
    complaints = [line for line in orig.stderr.splitlines() if line.strip()]
    assert complaints and all(INSTALLED in line for line in complaints), orig.stderr


@needs_analyze
def test_service_is_hardened(tmp_path: Path) -> None:
    units = unit_copies(tmp_path / "units")
    res = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(units[1])],
                         capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", res.stdout)
    assert found, res.stdout + res.stderr
    assert float(found.group(1)) <= 2.0 and found.group(2) == "OK"


def test_path_unit_watches_boot_and_grub_cfg() -> None:
    text = (UNITS / "qubes-seal-reseal.path").read_text()
    watched = re.findall(r"^PathChanged=(.+)$", text, re.M)
    assert watched[0] == "/boot"
    assert {"/boot/grub2/grub.cfg", "/boot/grub/grub.cfg"} <= set(watched)
    # A record of the initramfs kernel-install just built starts a refused reseal again.
    assert "/var/lib/qubes-seal/vouched.json" in watched
    assert "PathExists" not in text.split("[Path]")[1]  # level triggers would loop
    service = (UNITS / "qubes-seal-reseal.service").read_text()
    assert f"ExecStart={INSTALLED}" in service
    assert "DeviceAllow=/dev/tpmrm0 rw" in service
    assert "ReadWritePaths=/var/lib/qubes-seal" in service


# --- The wrapper ------------------------------------------------------------------------------


def setup_machine(tmp_path: Path, grub_env: dict[str, str] | None = None,
                  cfg_dir: str = "grub2") -> dict[str, Path]:  # fmt: skip
    """A fake /boot with grub.cfg from our snippet, a state dir, a TXT log, a fake CLI."""
    fb = make_boot(tmp_path)
    res = run_snippet(fb.path, grub_env or DEFAULT_GRUB)
    assert res.returncode == 0, res.stderr
    (fb.path / cfg_dir).mkdir()
    cfg = fb.path / cfg_dir / "grub.cfg"
    # Entries of other scripts (20_linux_xen) come first in a real grub.cfg.
    cfg.write_text(
        "### BEGIN /etc/grub.d/20_linux_xen ###\n"
        "menuentry 'Qubes, with Xen hypervisor' --class qubes $menuentry_id_option "
        "'xen-gnulinux-simple-1234' {\n\tmultiboot2 /xen.gz placeholder\n}\n"
        "### END /etc/grub.d/20_linux_xen ###\n"
        "### BEGIN /etc/grub.d/20_qubes_seal_tboot ###\n" + res.stdout + "### END ###\n"
    )
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "sealed.json").write_text("{}")
    log = tmp_path / "txt-event.log"
    log.write_bytes(b"log")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "qubes-seal"
    fake.write_text('#!/bin/sh\nfor a; do printf "%s\\n" "$a"; done > "$ARGV_FILE"\n'
                    'exit "${FAKE_RC:-0}"\n')  # fmt: skip
    fake.chmod(0o755)
    return {"boot": fb.path, "cfg": cfg, "state": state_dir, "log": log, "bin": bin_dir,
            "argv": tmp_path / "argv"}  # fmt: skip


def run_wrapper(m: dict[str, Path], **env: str) -> subprocess.CompletedProcess[str]:
    full = {
        "PATH": f"{m['bin']}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "QUBES_SEAL_TXT_LOG": str(m["log"]),
        "QUBES_SEAL_BOOT_DIR": str(m["boot"]),
        "QUBES_SEAL_STATE_DIR": str(m["state"]),
        "QUBES_SEAL_RESEAL_SETTLE": "0",
        "ARGV_FILE": str(m["argv"]),
        **env,
    }
    return subprocess.run(["sh", str(WRAPPER)], env=full, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def argv(m: dict[str, Path]) -> list[str]:
    return m["argv"].read_text().splitlines()


def test_wrapper_reseals_for_the_newest_entry(tmp_path: Path) -> None:
    m = setup_machine(tmp_path)
    res = run_wrapper(m)
    assert res.returncode == 0, res.stderr
    assert argv(m) == ["reseal", "--predict", "--txt-log", str(m["log"]),
                       "--grub-cfg", str(m["cfg"]), "--entry", FIRST,
                       "--boot-dir", str(m["boot"])]  # fmt: skip
    assert "resealed" in res.stderr


def test_wrapper_reads_titles_as_grub_does(tmp_path: Path) -> None:
    m = setup_machine(tmp_path, ODD_GRUB, cfg_dir="grub")  # Debian's /boot/grub
    res = run_wrapper(m)
    assert res.returncode == 0, res.stderr
    title = argv(m)[7]
    assert title == ODD_TITLE
    assert find_entry(m["cfg"].read_text(), title).title == ODD_TITLE
    # An explicit title wins.
    res = run_wrapper(m, QUBES_SEAL_ENTRY="Qubes, with Xen hypervisor")
    assert argv(m)[7] == "Qubes, with Xen hypervisor"


def test_wrapper_fails_loudly(tmp_path: Path) -> None:
    m = setup_machine(tmp_path)
    res = run_wrapper(m, FAKE_RC="3", JOURNAL_STREAM="8:1234")
    assert res.returncode == 3
    assert res.stderr.startswith("<6>predicting")
    assert "<3>qubes-seal reseal --predict failed (exit 3)" in res.stderr

    m["argv"].unlink()
    m["log"].unlink()
    res = run_wrapper(m)
    assert res.returncode == 1
    assert "TXT event log" in res.stderr and "Nothing was resealed" in res.stderr
    assert not m["argv"].exists()

    m["log"].write_bytes(b"log")
    m["cfg"].write_text("menuentry 'Qubes' {\n}\n")
    res = run_wrapper(m)
    assert res.returncode == 1
    assert "no qubes-seal tboot entry" in res.stderr
    assert not m["argv"].exists()


def test_wrapper_never_predicts_from_an_unverified_log(tmp_path: Path) -> None:
    """A log the boot found in memory but the TPM contradicted (an evil maid's heap) is kept
    only as .unverified: the unit says so and predicts nothing from it."""
    m = setup_machine(tmp_path)
    m["log"].rename(f"{m['log']}.unverified")
    res = run_wrapper(m)
    assert res.returncode == 1
    assert "did not replay to the TPM's PCR 17/18" in res.stderr
    assert ".unverified" in res.stderr and "Nothing was resealed" in res.stderr
    assert not m["argv"].exists()


def test_wrapper_does_nothing_when_nothing_is_sealed(tmp_path: Path) -> None:
    m = setup_machine(tmp_path)
    (m["state"] / "sealed.json").unlink()
    res = run_wrapper(m)
    assert res.returncode == 0
    assert "nothing is sealed" in res.stderr
    assert not m["argv"].exists()


def test_update_then_wrapper_then_reboot_unlocks(swtpm: Swtpm, tmp_path: Path) -> None:
    """The whole flow with the real CLI: seal, update /boot, the path unit's job, reboot.

    dom0 vouches for the new files by the digests it recorded (``vouch record``; the RPM
    database's word is tested in tests/test_vouch.py) and for the command lines by its
    /etc/default/grub: without them the unattended reseal refuses (exit 7)."""
    m = setup_machine(tmp_path)
    txt_launch(swtpm, sample_modules(), log_path=m["log"])  # today's boot
    assert run(swtpm.tcti, m["state"], "seal", "--force").code == 0
    cli = m["bin"] / "qubes-seal"
    cli.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m qubes_seal '
                   f'--tpm {swtpm.tcti} "$@"\n')  # fmt: skip
    boot = m["boot"]
    grub = {k: v for k, v in DEFAULT_GRUB.items() if k != "GRUB_DEVICE"}
    grub["GRUB_QUBES_SEAL_ROOT"] = DEFAULT_GRUB["GRUB_DEVICE"]
    dom0 = {"QUBES_SEAL_ETC_DEFAULT_GRUB": str(default_grub(tmp_path / "default-grub", grub)),
            "QUBES_SEAL_RPM_DBPATH": str(tmp_path / "no-rpm-database")}  # fmt: skip
    before = (m["state"] / "sealed.json").read_bytes()
    res = run_wrapper(m, **dom0)
    assert res.returncode == 7 and "nothing is vouched by RPM" in res.stderr
    assert (m["state"] / "sealed.json").read_bytes() == before
    files = [boot / "tboot.gz", boot / "xen-4.19.1.gz", boot / "vmlinuz-6.12.9-1.qubes.fc37.x86_64",
             boot / "initramfs-6.12.9-1.qubes.fc37.x86_64.img"]  # fmt: skip
    assert run(swtpm.tcti, m["state"], "vouch", "record", *map(str, files)).code == 0
    res = run_wrapper(m, **dom0)
    assert res.returncode == 0, res.stderr
    assert [s.label for s in state.load(m["state"]).pcr_states] == ["current", "predicted"]

    # Reboot into the new entry: what GRUB hands over for it (see test_grub_snippets).
    boot = m["boot"]
    swtpm.reboot()
    txt_launch(swtpm, [
        Module("xen", grub_module_string(XEN_WORDS), load_module_image(boot / "xen-4.19.1.gz")),
        Module("kernel", grub_module_string(LINUX_WORDS),
               (boot / "vmlinuz-6.12.9-1.qubes.fc37.x86_64").read_bytes()),
        Module("initramfs", b"", (boot / "initramfs-6.12.9-1.qubes.fc37.x86_64.img").read_bytes()),
    ])  # fmt: skip
    res2 = run(swtpm.tcti, m["state"], "unseal", "--check")
    assert res2.code == 0, res2.err
