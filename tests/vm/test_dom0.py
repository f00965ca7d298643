"""A dom0 with systemd as PID 1, in the VM: our units under a real systemd, after our unlock.

One boot (docs/VM-TEST.md, "A dom0 with systemd as PID 1").  The initramfs is test_vm.py's
(dracut, ``90qubes-seal``, the genuine unlock with the passphrase typed on the console) with
the test-only module ``tests/vm/dom0/99qubes-seal-dom0vm`` instead of the check that powers
off in the initrd: after the unlock the VM switches to a real root, the host's own root file
system shared read-only by QEMU over virtio-9p with a tmpfs overlay on top, and runs the
host's systemd as PID 1 with ``systemd.unit=dom0vm.target`` (our units and the test's: the
host's root is a container image whose other units make no sense in a VM).

Our units are installed where rpm/qubes-seal.spec installs them, unmodified; the only
stand-in is /usr/bin/qubes-seal, a wrapper that runs the test's interpreter on this
repository, where the RPM installs a console script.  The test's driver unit
(``tests/vm/dom0/driver.py``) proves, inside the VM: the key service under its full
hardening serves a key through the qrexec service executable run as dom0's qrexec service
user, and refuses the others; ``systemctl reload`` takes a new configuration; the reseal path
unit fires on a vouched /boot change (and what it can do without TXT); the storage pool's
check (``tests/vm/dom0/pool_check.py``) when the repository has it.  Then ``systemctl
poweroff``: ``dom0vm-stopcheck.service`` reports what the key service's stop left behind.

Every QEMU and swtpm process is stopped on every path (test_vm.Machine.vm); every wait has a
deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_vm import (
    PASSPHRASE,
    Machine,
    SerialConsole,
    _build_image,
    _kernel,
    _skip_reason,
    provision,
)

# One group for both VM modules (pytest-xdist, ./run-tests): one VM at a time, on one worker.
pytestmark = [pytest.mark.vm, pytest.mark.xdist_group("vm")]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DOM0 = HERE / "dom0"
MODULE = DOM0 / "99qubes-seal-dom0vm"
UNITS = DOM0 / "units"
POOL_CHECK = DOM0 / "pool_check.py"
#: a full systemd boot of a big root over 9p under TCG, the driver's work and the shutdown:
#: about 3 min alone, 4 to 5 beside the host tests on the other core (./run-tests)
DOM0_TIMEOUT = 600.0
#: hidden from the key service by its unit (PrivateTmp=yes, ProtectHome=yes)
HIDDEN = ("/tmp", "/var/tmp", "/home", "/root", "/run/user")
# The repository as the key service's unit sees it: bound there by the test module before
# the switch-root, because a CI clone under /tmp (or /root) is hidden from the unit
# (PrivateTmp=, ProtectHome=), which would then run nothing, or another copy.
SRC = Path("/opt/qubes-seal-src")
#: dom0's qrexec service user (group qubes: the key service's socket group)
PASSWD = "user:x:1001:1001:dom0 qrexec service user (TEST):/home/user:/bin/sh\n"
GROUP = "user:x:1001:\nqubes:x:1990:user\n"
DOM0_QUBES = ["vault-test", "vault-test1", "vault-test2", "vault-test3", "vault-test-clone"]
CONFIG = """\
# TEST ONLY (tests/vm/test_dom0.py)
[storage-domains]
sys-storage = ["work"]

[dom0-storage]
domains = [{dom0}]
"""
BOOT_TOML = """\
# TEST ONLY (tests/vm/test_dom0.py): QEMU's TIS has no locality-4 hash start, no TXT launch.
[boot]
container = "/dev/disk/by-partlabel/qubes-seal"
tpm = "device:/dev/tpmrm0"
ask = "systemd"
backend = "dm-crypt"
tries = 1
timeout = 60.0
unsafe_no_measured_launch = true
unsafe_test_mode = true
"""


def _in_a_partition(m: Machine) -> None:
    """The provisioned container moved into a GPT partition labelled ``qubes-seal`` (sfdisk),
    as on a real machine (docs/INSTALL.md): the VM's /dev/vda1, which the initramfs opens as
    /dev/disk/by-partlabel/qubes-seal and the key service reaches through its unit's
    ``BindPaths=``/``DeviceAllow=``."""
    raw = m.container.read_bytes()
    assert len(raw) % 512 == 0
    start, sectors = 2048, len(raw) // 512
    disk = m.dir / "disk.img"
    with open(disk, "wb") as f:
        f.truncate((start + sectors + 2048) * 512)  # room for the backup GPT at the end
    subprocess.run(["sfdisk", "--quiet", str(disk)], check=True, capture_output=True,
                   input=f"label: gpt\nstart={start}, size={sectors}, name=qubes-seal\n",
                   text=True, timeout=60)  # fmt: skip
    with open(disk, "r+b") as f:
        f.seek(start * 512)
        f.write(raw)
    os.replace(disk, m.container)  # the VM's first disk


def _install(src: Path, dest: Path, mode: int, text: str | None = None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if text is None:
        shutil.copyfile(src, dest)
    else:
        dest.write_text(text)
    dest.chmod(mode)


def _seed(seed: Path) -> None:
    """The files the VM's root gets on top of the host's: as the RPM installs ours."""
    root = seed / "root"
    fill = {"@REPO@": str(REPO), "@PYTHON@": sys.executable,
            "@SRC_REPO@": str(SRC), "@SRC_PYTHON@": str(_src_python())}  # fmt: skip

    def filled(path: Path) -> str:
        text = path.read_text()
        for k, v in fill.items():
            text = text.replace(k, v)
        return text

    unitdir = root / "usr/lib/systemd/system"  # %{_unitdir}
    for name in ("qubes-seal-keyd.service", "qubes-seal-reseal.path",
                 "qubes-seal-reseal.service"):  # fmt: skip
        _install(REPO / "systemd" / name, unitdir / name, 0o644)
    _install(REPO / "systemd/qubes-seal-reseal-on-update",
             root / "usr/libexec/qubes-seal/qubes-seal-reseal-on-update", 0o755)  # fmt: skip
    rpc = root / "etc/qubes-rpc"
    _install(REPO / "qrexec/qubes.SealGetDiskKey", rpc / "qubes.SealGetDiskKey", 0o755)
    (rpc / "qubes.SealGetPreviousDiskKey").symlink_to("qubes.SealGetDiskKey")
    _install(REPO / "qrexec/50-qubes-seal.policy",
             root / "etc/qubes/policy.d/50-qubes-seal.policy", 0o644)  # fmt: skip
    dom0 = ", ".join(f'"{q}"' for q in DOM0_QUBES)
    _install(REPO / "config/config.toml", root / "etc/qubes-seal/config.toml", 0o644,
             CONFIG.format(dom0=dom0))  # fmt: skip
    _install(REPO / "config/launch.toml", root / "etc/qubes-seal/launch.toml", 0o644)
    # The stand-in for the RPM's console script, and the test's units.
    _install(UNITS / "qubes-seal", root / "usr/bin/qubes-seal", 0o755,
             filled(UNITS / "qubes-seal"))  # fmt: skip
    etc_units = root / "etc/systemd/system"
    for unit in UNITS.glob("*.service"):
        _install(unit, etc_units / unit.name, 0o644, filled(unit))
    _install(UNITS / "dom0vm.target", etc_units / "dom0vm.target", 0o644)
    # Units of the host's root (a container image) that make no sense in the VM, or would
    # change it: masked.
    for unit in ("systemd-firstboot.service", "systemd-repart.service",
                 "plymouth-start.service", "plymouth-read-write.service",
                 "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
                 "systemd-pcrphase.service", "systemd-pcrphase-sysinit.service",
                 "dracut-shutdown.service", "systemd-timesyncd.service",
                 "systemd-pstore.service", "systemd-machine-id-commit.service",
                 # Debian's tmpfiles.d empties /tmp at boot: slow over 9p (a whiteout for
                 # each of the host's files), and nothing here needs it.
                 "systemd-tmpfiles-setup.service", "systemd-tmpfiles-clean.timer"):  # fmt: skip
        (etc_units / unit).symlink_to("/dev/null")
    (seed / "passwd").write_text(PASSWD)
    (seed / "group").write_text(GROUP)


def _follow(console: SerialConsole, path: Path, deadline: float) -> None:
    """Copy the console to ``path`` every second while the VM runs (to watch a long boot)."""

    def copy() -> None:
        while not console.closed and time.monotonic() < deadline:
            path.write_text(console.text)
            time.sleep(1.0)

    threading.Thread(target=copy, daemon=True).start()


def _src_python() -> Path:
    """The interpreter as the key service sees it: under SRC when it is the repository's
    virtual environment (bound there), else where it is."""
    exe = Path(sys.executable)
    return SRC / exe.relative_to(REPO) if exe.is_relative_to(REPO) else exe


@pytest.fixture(scope="module")
def dom0_machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    why = _skip_reason()
    if why:
        pytest.skip(why)
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk is not installed (Debian package fdisk): the dom0 VM's disk")
    for hidden in HIDDEN:
        if _src_python().is_relative_to(hidden):
            pytest.skip(f"the interpreter is under {hidden}, outside the repository, which "
                        "the key service's unit hides (PrivateTmp=, ProtectHome=): the daemon "
                        "would not run it")  # fmt: skip
    found = _kernel()
    assert found is not None
    kver, kernel = found
    work = tmp_path_factory.mktemp("dom0vm")
    boot_toml = work / "boot.toml"
    boot_toml.write_text(BOOT_TOML)
    image, seconds = _build_image(work, boot_toml, kver, (MODULE,), plymouth=False)
    m = Machine(work, image, kver, kernel, seconds)
    provision(m)
    _in_a_partition(m)
    _seed(work / "seed")
    # /dev/vdc: an ext4 for the pool check's work directory (loop devices on tmpfs).
    pool_disk = work / "pool.img"
    with open(pool_disk, "wb") as f:
        f.truncate(1 << 30)  # sparse; file-reflink copies whole volumes on ext4
    subprocess.run(["mkfs.ext4", "-q", "-F", str(pool_disk)], check=True, capture_output=True,
                   timeout=60)  # fmt: skip
    yield m
    print("\ndom0 VM summary:", json.dumps({"image_build_s": round(m.build_seconds, 1),
                                            **m.boots}, indent=1))  # fmt: skip


def test_dom0_systemd_units(dom0_machine: Machine) -> None:
    m = dom0_machine
    seed = m.dir / "seed"
    append = (f"root=tmpfs init=/lib/systemd/systemd systemd.unit=dom0vm.target "
              f"dom0vm.seed={seed} dom0vm.src={REPO} plymouth.enable=0")  # fmt: skip
    qemu_args = (
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
        "multidevs=remap",
        "-drive", f"file={m.dir / 'pool.img'},if=virtio,format=raw",
        "-vga", "none",
    )  # fmt: skip
    with m.vm("dom0", append=append, qemu_args=qemu_args, timeout=DOM0_TIMEOUT) as (
        console, deadline,
    ):  # fmt: skip
        powered_on = time.monotonic()
        _follow(console, m.dir / "dom0.live.log", deadline)
        prompt_at = console.prompt("qubes-seal passphrase:", deadline)
        typed_at = console.type(PASSPHRASE + "\n")
        console.expect(r"\[dom0vm\] root: host / over 9p", deadline, what="the switch to 9p")
        unlocked = console.expect(r"\[dom0vm\] UNLOCKED (\{.*\})\n", deadline,
                                  what="the key service unlocked")  # fmt: skip
        unlocked_host = console.arrival(unlocked.start())
        serving = console.expect(r"\[dom0vm\] SERVING (\{.*\})\n", deadline,
                                 what="the key service serving")  # fmt: skip
        serving_host = console.arrival(serving.start())
        got = console.expect(r"\[dom0vm\] RESULT (\{.*\})\n", deadline, what="the RESULT")
        result: dict[str, Any] = json.loads(got.group(1))
        stopped_m = console.expect(r"\[dom0vm\] STOPPED (\{.*\})\n", deadline,
                                   what="the stop check at poweroff")  # fmt: skip
        stopped: dict[str, Any] = json.loads(stopped_m.group(1))
    print("\ndom0 RESULT:", json.dumps(result, indent=1, sort_keys=True))
    print("dom0 STOPPED:", json.dumps(stopped, indent=1, sort_keys=True))
    assert "error" not in result, result["error"]
    assert result["pid1"] == "systemd"
    assert any(" overlay " in f" {line} " for line in result["root_fs"]), result["root_fs"]

    # -- the key service under its full hardening ----------------------------------------
    keyd = result["keyd"]
    assert keyd["ActiveState"] == "active" and keyd["SubState"] == "running", keyd
    assert keyd["NRestarts"] == "0", keyd
    expected = {
        "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateNetwork": "yes", "PrivateDevices": "yes", "PrivateIPC": "yes",
        "NoNewPrivileges": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
        "ProtectProc": "invisible", "ProcSubset": "pid", "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "RemoveIPC": "yes", "KeyringMode": "private",
        "CapabilityBoundingSet": "cap_chown", "RestrictAddressFamilies": "AF_UNIX",
        "DevicePolicy": "closed", "SystemCallArchitectures": "native",
        "SystemCallErrorNumber": "1",  # EPERM
        "UMask": "0077", "LimitCORE": "0",
        "LimitNOFILE": "2048",
    }  # fmt: skip
    wrong = {k: (keyd.get(k), v) for k, v in expected.items() if keyd.get(k) != v}
    assert not wrong, wrong
    # The syscall filter is the allow-list @system-service (add_key, keyctl, ...) plus @chown,
    # minus @privileged and @resources: keyctl allowed, setrlimit/mount not.
    calls = set(keyd["SystemCallFilter"].split())
    assert {"add_key", "keyctl", "request_key", "fchown"} <= calls, keyd["SystemCallFilter"]
    assert not {"setrlimit", "mount", "ptrace", "init_module"} & calls
    proc = result["keyd_proc"]
    assert proc["Seccomp"] == "2" and proc["NoNewPrivs"] == "1", proc
    assert int(proc["CapBnd"], 16) == 1 << 0, proc  # CAP_CHOWN only
    assert result["socket"]["mode"] == "0o660" and result["socket"]["uid"] == 0
    assert result["socket"]["gid"] == result["socket"]["group_qubes"], result["socket"]

    # -- a key through the qrexec service executable, as dom0's service user ----------------
    assert result["domain_add"][-1]["exit"] in (0, 6), result["domain_add"]
    assert len(result["work_key_sha256"]) == 64, result["work_key_sha256"]  # work has a key
    allowed = result["qrexec_allowed"]
    assert allowed["exit"] == 0 and allowed["bytes"] == 64, allowed
    assert allowed["sha256"] == result["work_key_sha256"]
    for refused, code in (("qrexec_other_caller", 4), ("qrexec_other_domain", 4),
                          ("qrexec_not_in_group", 6)):  # fmt: skip
        r = result[refused]
        assert r["exit"] == code and r["bytes"] == 0, (refused, r)

    # -- systemctl restart: resumes from the hand-over, the boot's TXT event log kept -------
    assert result["restart_exit"] == 0 and result["restart_new_pid"], result
    assert result["txt_log_survives_restart"]
    assert result["after_restart"]["sha256"] == result["work_key_sha256"]

    # -- systemctl reload: the new configuration, the same process -------------------------
    assert result["reload_exit"] == 0
    assert result["after_reload_new_server"]["sha256"] == result["work_key_sha256"]
    assert result["after_reload_old_server"]["exit"] == 4, result["after_reload_old_server"]
    assert result["reload_same_pid"]

    # -- the reseal path unit: fired by a vouched /boot change ------------------------------
    assert result["vouch_record"]["exit"] == 0, result["vouch_record"]
    reseal = result["reseal_service"]
    assert int(reseal["ExecMainStartTimestampMonotonic"]) > 0, reseal
    # The unit found our tboot entry and ran 'qubes-seal reseal --predict' under its
    # hardening.  QEMU has no TXT, so no TXT event log replays to the VM's PCR 17/18: the
    # boot's log is the restart step's stand-in, refused as corrupt (exit 7), and nothing is
    # resealed.  The signed prediction itself is proven on the host (docs/VM-TEST.md).
    log = "\n".join(result["reseal_log"])
    assert reseal["Result"] == "exit-code" and reseal["ExecMainStatus"] == "7", reseal
    assert "predicting 'Qubes, with tboot (qubes-seal)' from /boot/grub/grub.cfg" in log, log
    assert "event log corrupt" in log and "Nothing was resealed" in log, log
    assert result["container_unchanged_by_refusal"]

    # -- the storage pool's check on real dm-crypt (when the repository has it) ------------
    if POOL_CHECK.exists():
        assert result["pool"] is not None and result["pool"]["ok"] is True, result["pool"]
    else:
        assert result["pool"] is None

    # -- the orderly shutdown: the daemon stopped, nothing of the keys left ------------------
    assert stopped.get("error") is None, stopped["error"]
    assert stopped["keyd"]["ActiveState"] in ("inactive", "deactivating"), stopped["keyd"]
    assert stopped["keyd"]["Result"] == "success", stopped["keyd"]
    # /run/qubes-seal is kept (RuntimeDirectoryPreserve=yes: the boot's TXT event log, here
    # the driver's stand-in); the daemon's socket is gone.
    assert stopped["runtime_dir"] in (None, [], ["txt-event.log"]), stopped["runtime_dir"]
    assert stopped["proc_keys_qubes_seal"] == [], stopped["proc_keys_qubes_seal"]
    # dom0's root volume key file went at the switch-root (the unlock unit's ExecStop).
    assert stopped["cryptsetup_key_files"] == [], stopped["cryptsetup_key_files"]

    # -- timing: power-on to the key service serving ------------------------------------
    manager = result["manager"]
    typing = typed_at - prompt_at
    to_serving = serving_host - powered_on
    userspace = manager["UserspaceTimestampMonotonic"]
    keyd_start = int(keyd["ExecMainStartTimestampMonotonic"])
    m.boots["dom0"].update(
        power_on_to_keyd_unlocked_host_typing_excluded_s=round(
            unlocked_host - powered_on - typing, 2
        ),
        kernel_to_keyd_unlocked_vm_s=round(result["unlocked_monotonic_us"] / 1e6, 2),
        power_on_to_serving_host_s=round(to_serving, 2),
        power_on_to_serving_host_typing_excluded_s=round(to_serving - typing, 2),
        kernel_to_serving_vm_s=round(result["serving_monotonic_us"] / 1e6, 2),
        kernel_to_switch_root_vm_s=round(userspace / 1e6, 2),
        switch_root_to_serving_vm_s=round((result["serving_monotonic_us"] - userspace) / 1e6, 2),
        switch_root_to_keyd_start_vm_s=round((keyd_start - userspace) / 1e6, 2),
        keyd_start_to_unlocked_vm_s=round((result["unlocked_monotonic_us"] - keyd_start) / 1e6, 2),
        prompt_to_typed_s=round(typing, 2),
        pool_check_s=result.get("pool_seconds"),
    )
    print("dom0 timing:", json.dumps(m.boots["dom0"], indent=1))
