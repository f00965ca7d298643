"""``qubes-seal doctor`` (issue 16, item 2): each failure it names, on a fake root tree, a
memory image and a swtpm; and the real machines of ../shared/testdata/real-drtm whose TXT
registers lie ("TXT measured launch: TRUE" without SMX, or with TXT off) or whose launch
failed with an error code."""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cli_util import run
from machine import Box

from qubes_seal import doctor
from qubes_seal.measure import txt_heap
from qubes_seal.sim.swtpm import configure_da
from qubes_seal.sim.txt_launch import (
    Platform,
    launch_events,
    machine_registers,
    write_image,
    write_memory_image,
)

REAL = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "real-drtm"
DIDVID = 0x00000001B0068086  # machine_registers' chipset: vendor 0x8086, device 0xb006, rev 1
CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme {flags} lm\n\n"
NO_TPM = "swtpm:host=127.0.0.1,port=1"


def acm(chipsets: list[tuple[int, int, int, int]], *, sinit: bool = True) -> bytes:
    """A minimal SINIT ACM: acm_hdr_t, the info table after header + scratch, the list."""
    header_len, scratch = 161, 143  # 4-byte units, as real ACMs (0xa1, 0x8f)
    info = (header_len + scratch) * 4
    list_off = info + 48
    data = bytearray(list_off + 4 + 16 * len(chipsets) + 64)
    struct.pack_into("<HHI", data, 0, 2, 0, header_len)
    struct.pack_into("<I", data, 16, 0x8086)
    struct.pack_into("<I", data, 124, scratch)
    data[info : info + 16] = doctor.ACM_UUID_V3
    data[info + 16] = 1 if sinit else 0
    struct.pack_into("<I", data, info + 20, list_off)
    struct.pack_into("<I", data, list_off, len(chipsets))
    for i, (flags, vid, did, rid) in enumerate(chipsets):
        struct.pack_into("<IHHHHI", data, list_off + 4 + 16 * i, flags, vid, did, rid, 0, 0)
    return bytes(data)


def cpio(names: list[str]) -> bytes:
    """A newc cpio archive of empty files (and the trailer), as dracut writes."""
    out = b""
    for i, name in enumerate([*names, "TRAILER!!!"]):
        raw = name.encode() + b"\0"
        fields = [i + 1, 0o100644, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(raw), 0]
        out += b"070701" + b"".join(f"{v:08x}".encode() for v in fields) + raw
        out += b"\0" * (-len(out) % 4)
    return out + b"\0" * (-len(out) % 512)


GRUB_CFG = """\
### BEGIN /etc/grub.d/10_linux ###
menuentry 'Qubes, with Xen 4.17.5 and Linux 6.6.63' --class qubes \
$menuentry_id_option 'xen-gnulinux-simple' {
\tmultiboot2 /xen-4.17.5.gz
}
### BEGIN /etc/grub.d/20_qubes_seal_tboot ###
menuentry 'Qubes, with Xen 4.17.5 and Linux 6.6.63 (tboot)' --class qubes --class xen \
--class os $menuentry_id_option 'qubes-seal-tboot' {
\tmultiboot2 /tboot.gz logging=serial,memory
\tmodule2 /xen-4.17.5.gz
}
"""
MARKERS = [
    "usr/lib/systemd/system/qubes-seal-unlock.service",
    "usr/lib/python3.11/qubes_seal/chain.py",
]


def healthy_root(root: Path) -> Path:
    """A dom0 tree where every file check passes."""
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(CPUINFO.format(flags="vmx smx est"))
    boot = root / "boot"
    (boot / "grub2").mkdir(parents=True)
    (boot / "tboot.gz").write_bytes(gzip.compress(b"tboot"))
    (boot / "8th_9th_gen_i5_i7-SINIT_81.bin").write_bytes(acm([(1, 0x8086, 0xB006, 1)]))
    (boot / "grub2/grub.cfg").write_text(GRUB_CFG)
    (boot / "initramfs-6.6.63-1.qubes.x86_64.img").write_bytes(
        cpio(["early_cpio", "kernel/x86/microcode/GenuineIntel.bin"])
        + gzip.compress(cpio(["usr", "init", *MARKERS]))
    )
    (root / "etc/default").mkdir(parents=True)
    (root / "etc/default/grub").write_text('GRUB_DEFAULT="qubes-seal-tboot"\n')
    for unit, wants in doctor.UNITS.items():
        d = root / "etc/systemd/system" / wants
        d.mkdir(parents=True, exist_ok=True)
        (d / unit).symlink_to(f"/usr/lib/systemd/system/{unit}")
    (root / "var/lib/qubes-seal").mkdir(parents=True)
    (root / "var/lib/qubes-seal/keys.luks").write_bytes(b"not read by the file checks")
    return root


def good_launch(path: Path) -> Path:
    write_memory_image(path, launch_events(Platform(), []))
    return path


def ctx_for(root: Path, mem: Path | str = "/nonexistent-mem") -> doctor.Context:
    return doctor.Context(root=root, mem=str(mem), tcti=NO_TPM)


def by_id(ctx: doctor.Context) -> dict[str, doctor.Check]:
    return {c.id: c for c in doctor.run(ctx)}


FILE_CHECKS = ["cpu-smx", "tboot", "grub-entry", "grub-default", "boot-mode", "aem",
               "initramfs", "container", "units"]  # fmt: skip


# --- a healthy tree ------------------------------------------------------------------------


def test_a_healthy_tree_and_launch_pass_every_check_but_the_tpm(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    checks = by_id(ctx_for(root, good_launch(tmp_path / "mem.img")))
    for cid in [*FILE_CHECKS, "txt-enabled", "txt-launch", "sinit"]:
        assert checks[cid].ok is True, checks[cid]
        assert checks[cid].fix is None, checks[cid]
    assert "launched" in checks["txt-launch"].summary
    assert "matches this chipset" in checks["sinit"].summary
    assert checks["tpm"].ok is False and checks["tpm"].fix
    assert checks["tpm-lockout"].ok is None and "no TPM" in checks["tpm-lockout"].summary
    assert checks["keyd"].ok is None  # not checked under --root
    assert list(checks) == [fn(ctx_for(root)).id for fn in doctor.CHECKS]


# --- each failure of the files --------------------------------------------------------------


def _no_smx(r: Path) -> None:
    (r / "proc/cpuinfo").write_text(CPUINFO.format(flags="vmx est"))


def _amd(r: Path) -> None:
    (r / "proc/cpuinfo").write_text(
        CPUINFO.format(flags="svm").replace("GenuineIntel", "AuthenticAMD")
    )


def _no_tboot(r: Path) -> None:
    (r / "boot/tboot.gz").unlink()


def _no_grub_cfg(r: Path) -> None:
    (r / "boot/grub2/grub.cfg").unlink()


def _no_entry(r: Path) -> None:
    (r / "boot/grub2/grub.cfg").write_text(GRUB_CFG.split("### BEGIN /etc/grub.d/20")[0])


def _default_first(r: Path) -> None:
    (r / "etc/default/grub").write_text("GRUB_DEFAULT=0\n")


def _saved_other(r: Path) -> None:
    (r / "etc/default/grub").write_text("GRUB_DEFAULT=saved\n")
    (r / "boot/grub2/grubenv").write_text(
        "# GRUB Environment Block\nsaved_entry=xen-gnulinux-simple\n"
    )


def _default_missing(r: Path) -> None:
    (r / "etc/default/grub").write_text("GRUB_DEFAULT=7\n")


def _uefi_xen_efi(r: Path) -> None:
    (r / "sys/firmware/efi").mkdir(parents=True)
    (r / "boot/efi/EFI/qubes").mkdir(parents=True)
    (r / "boot/efi/EFI/qubes/xen.cfg").write_text("[global]\n")
    _no_grub_cfg(r)


def _aem(r: Path) -> None:
    (r / "usr/sbin").mkdir(parents=True)
    (r / "usr/sbin/anti-evil-maid-seal").write_text("#!/bin/sh\n")


def _initramfs_without_module(r: Path) -> None:
    img = next((r / "boot").glob("initramfs-*.img"))
    img.write_bytes(gzip.compress(cpio(["usr", "init", "usr/bin/cryptsetup"])))


def _no_container(r: Path) -> None:
    (r / "var/lib/qubes-seal/keys.luks").unlink()


def _units_disabled(r: Path) -> None:
    (r / "etc/systemd/system/multi-user.target.wants/qubes-seal-keyd.service").unlink()


FAILURES = {
    "no SMX": (_no_smx, "cpu-smx", "does not report SMX"),
    "AMD": (_amd, "cpu-smx", "AMD"),
    "no tboot": (_no_tboot, "tboot", "no tboot in /boot"),
    "no grub.cfg": (_no_grub_cfg, "grub-entry", "no grub.cfg"),
    "no entry": (_no_entry, "grub-entry", "no qubes-seal (tboot) entry"),
    "default is entry 0": (_default_first, "grub-default", "not ours"),
    "saved default is another": (_saved_other, "grub-default", "saved_entry=xen-gnulinux-simple"),
    "default names nothing": (_default_missing, "grub-default", "names no entry"),
    "UEFI, xen.efi directly": (_uefi_xen_efi, "boot-mode", "tboot is never started"),
    "AEM installed": (_aem, "aem", "PCR 13"),
    "initramfs without the module": (_initramfs_without_module, "initramfs", "lacks our dracut"),
    "no container": (_no_container, "container", "no container"),
    "units not enabled": (_units_disabled, "units", "qubes-seal-keyd.service"),
}


@pytest.mark.parametrize("name", list(FAILURES))
def test_each_failure_is_named_with_its_fix(tmp_path: Path, name: str) -> None:
    breaks, cid, words = FAILURES[name]
    root = healthy_root(tmp_path / "root")
    breaks(root)
    checks = by_id(ctx_for(root, good_launch(tmp_path / "mem.img")))
    assert checks[cid].ok is False, checks[cid]
    assert words in checks[cid].summary, checks[cid]
    assert checks[cid].fix, checks[cid]
    others = [c for c in checks.values() if c.ok is False and c.id not in (cid, "tpm")]
    # Only what follows from the break fails with it.
    assert {c.id for c in others} <= {
        "txt-enabled",
        "txt-launch",
        "grub-entry",
        "grub-default",
        "sinit",
    }


PARTLABEL = "/dev/disk/by-partlabel/qubes-seal"


def _boot_toml(root: Path, container: str) -> None:
    (root / "etc/qubes-seal").mkdir(parents=True, exist_ok=True)
    (root / "etc/qubes-seal/boot.toml").write_text(f'[boot]\ncontainer = "{container}"\n')


def test_the_container_is_where_the_initramfs_can_open_it(tmp_path: Path) -> None:
    """With a boot.toml (the initramfs's unlock), dom0's container must be the one the
    initramfs opens, and not a file on dom0's root, which is not open yet at that point
    (docs/INSTALL.md, step 4: a partition, dom0's path a symbolic link to it)."""
    root = healthy_root(tmp_path / "root")
    keys = root / "var/lib/qubes-seal/keys.luks"
    _boot_toml(root, PARTLABEL)
    check = doctor.check_container(ctx_for(root))  # the healthy tree's container: a file
    assert check.ok is False and "is a file on dom0's root" in check.summary, check
    assert f"the initramfs opens {PARTLABEL}" in check.summary
    assert check.fix and "docs/INSTALL.md, step 4" in check.fix
    keys.unlink()
    keys.symlink_to(PARTLABEL)  # dangling here: /dev of another machine
    check = doctor.check_container(ctx_for(root))
    assert check.ok is True and f"-> {PARTLABEL}, the one the initramfs opens" in check.summary
    _boot_toml(root, "/dev/disk/by-uuid/0123")
    check = doctor.check_container(ctx_for(root))
    assert check.ok is False and "but the initramfs opens /dev/disk/by-uuid/0123" in check.summary
    assert check.fix and f"ln -sfn /dev/disk/by-uuid/0123 {keys}" in check.fix
    # an MBR disk's container (docs/INSTALL.md, step 4): the units reach only the partition
    # labelled qubes-seal by themselves; another node needs the drop-ins naming it
    uuid_node = "/dev/disk/by-uuid/0123"
    keys.unlink()
    keys.symlink_to(uuid_node)
    check = doctor.check_container(ctx_for(root))
    assert check.ok is False, check
    assert "which qubes-seal-keyd.service and qubes-seal-reseal.service cannot reach" in (
        check.summary
    )
    assert check.fix and f"BindPaths={uuid_node}" in check.fix
    keyd_d = root / "etc/systemd/system/qubes-seal-keyd.service.d"
    keyd_d.mkdir(parents=True)
    (keyd_d / "override.conf").write_text(
        f"[Service]\nBindPaths={uuid_node}\nDeviceAllow={uuid_node}  rw\n"
    )
    check = doctor.check_container(ctx_for(root))
    assert check.ok is False and "which qubes-seal-reseal.service cannot" in check.summary
    reseal_d = root / "etc/systemd/system/qubes-seal-reseal.service.d"
    reseal_d.mkdir(parents=True)
    (reseal_d / "override.conf").write_text(f"[Service]\nDeviceAllow={uuid_node} rw\n")
    assert doctor.check_container(ctx_for(root)).ok is True
    (root / "etc/qubes-seal/boot.toml").write_text("[boot]\nnonsense = 1\n")
    check = doctor.check_container(ctx_for(root))
    assert check.ok is None and "not compared with" in check.summary


def test_uefi_through_grub_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    (root / "sys/firmware/efi").mkdir(parents=True)
    check = doctor.check_boot_mode(ctx_for(root))
    assert check.ok is True and "UEFI" in check.summary and check.fix


def test_grub_default_by_index_and_by_title(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    (root / "etc/default/grub").write_text("GRUB_DEFAULT=1\n")
    assert doctor.check_grub_default(ctx_for(root)).ok is True
    title = "Qubes, with Xen 4.17.5 and Linux 6.6.63 (tboot)"
    (root / "etc/default/grub").write_text(f"GRUB_DEFAULT='{title}'\n")
    assert doctor.check_grub_default(ctx_for(root)).ok is True


# --- the initramfs, every compression -------------------------------------------------------


@pytest.mark.parametrize("compression", ["gzip", "xz", "zstd", "none"])
@pytest.mark.parametrize("lsinitrd", [False, True])
def test_initramfs_names_with_early_cpio(tmp_path: Path, compression: str, lsinitrd: bool) -> None:
    if lsinitrd and shutil.which("lsinitrd") is None:
        pytest.skip("no lsinitrd")
    main = cpio(["usr", *MARKERS])
    if compression == "gzip":
        body = gzip.compress(main)
    elif compression == "xz":
        body = lzma.compress(main, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    elif compression == "zstd":
        if shutil.which("zstd") is None:
            pytest.skip("no zstd")
        body = subprocess.run(["zstd", "-c"], input=main, capture_output=True, check=True).stdout
    else:
        body = main
    img = tmp_path / "initramfs-6.6.img"
    img.write_bytes(cpio(["early_cpio", "kernel/x86/microcode/GenuineIntel.bin"]) + body)
    names = doctor.initramfs_names(img, use_lsinitrd=lsinitrd)
    assert any(n.endswith("qubes-seal-unlock.service") for n in names), names
    assert any("qubes_seal/" in n for n in names)


def test_the_newest_initramfs_is_the_one_checked(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    newer = root / "boot/initramfs-6.7.0.img"
    newer.write_bytes(gzip.compress(cpio(["usr", "init"])))
    os.utime(newer, (2_000_000_000, 2_000_000_000))
    check = doctor.check_initramfs(ctx_for(root))
    assert check.ok is False and "initramfs-6.7.0.img" in check.summary


def test_a_garbage_initramfs_is_not_checked_rather_than_a_crash(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    next((root / "boot").glob("initramfs-*.img")).write_bytes(b"\x1f\x8b" + os.urandom(4000))
    check = doctor.check_initramfs(ctx_for(root))
    assert check.ok in (None, False)


# --- SINIT ----------------------------------------------------------------------------------


def test_sinit_not_matching_this_chipset(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    (root / "boot/8th_9th_gen_i5_i7-SINIT_81.bin").write_bytes(acm([(0, 0x8086, 0xB00C, 1)]))
    check = doctor.check_sinit(ctx_for(root, good_launch(tmp_path / "mem.img")))
    assert check.ok is False and "do not list this chipset" in check.summary and check.fix


def test_sinit_revision_mask_and_exact_revision() -> None:
    masked = doctor.AcmInfo(Path("x"), True, ((1, 0x8086, 0xB006, 0x3),))
    exact = doctor.AcmInfo(Path("x"), True, ((0, 0x8086, 0xB006, 0x2),))
    assert doctor.acm_matches(masked, DIDVID)  # rev 1 & 3
    assert not doctor.acm_matches(exact, DIDVID)  # rev 1 != 2
    assert doctor.parse_acm(acm([(1, 0x8086, 0xB006, 1)], sinit=False), Path("bios")) is not None
    assert doctor.parse_acm(b"\x02\x00" + bytes(300), Path("junk")) is None
    # A chipset list offset past the file: no entries, no crash.
    bad = bytearray(acm([(1, 0x8086, 0xB006, 1)]))
    struct.pack_into("<I", bad, (161 + 143) * 4 + 20, 0xFFFFFFF0)
    info = doctor.parse_acm(bytes(bad), Path("bad"))
    assert info is not None and info.chipsets == ()


def test_sinit_without_didvid_is_present_not_matched(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    check = doctor.check_sinit(ctx_for(root))  # no memory to read DIDVID from
    assert check.ok is None and "present" in check.summary and "not matched" in check.summary


def test_a_sinit_in_the_bios_is_enough(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    (root / "boot/8th_9th_gen_i5_i7-SINIT_81.bin").unlink()
    mem = good_launch(tmp_path / "mem.img")
    regs = machine_registers()
    with open(mem, "r+b") as f:  # BiosData's bios_sinit_size
        f.seek(regs.heap_base + 12)
        f.write(struct.pack("<I", 0x40000))
    check = doctor.check_sinit(ctx_for(root, mem))
    assert check.ok is True and "BIOS carries" in check.summary
    struct_zero = tmp_path / "mem0.img"
    check = doctor.check_sinit(ctx_for(root, good_launch(struct_zero)))
    assert check.ok is False and "none in the BIOS" in check.summary


# --- TXT from memory images -----------------------------------------------------------------


def test_senter_not_done_without_an_error_code(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    mem = tmp_path / "mem.img"
    write_image(mem, machine_registers(senter_done=False))
    check = doctor.check_txt_launch(ctx_for(root, mem))
    assert check.ok is False and "SENTER not done" in check.summary
    assert check.fix and "grub-entry" in check.fix


def test_a_failed_senter_is_explained_with_its_decoded_error(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    mem = tmp_path / "mem.img"
    write_image(mem, machine_registers(senter_done=False, errorcode=0xC0003C11))
    check = doctor.check_txt_launch(ctx_for(root, mem))
    assert check.ok is False
    assert "0xc0003c11" in check.summary
    assert txt_heap.decode_errorcode(0xC0003C11) in check.summary
    assert check.fix and "SINIT" in check.fix


def test_senter_done_over_a_corrupt_heap_is_not_launched(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    mem = tmp_path / "mem.img"
    write_image(mem, machine_registers(), b"\xff" * 64)
    checks = by_id(ctx_for(root, mem))
    assert checks["txt-launch"].ok is False and "not a launch's" in checks["txt-launch"].summary
    assert checks["txt-enabled"].ok is True  # the registers still say TXT is on
    assert checks["sinit"].ok is True  # and DIDVID still matches the ACM


def test_no_dev_mem_is_not_checked(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    checks = by_id(ctx_for(root, tmp_path / "absent"))
    assert checks["txt-enabled"].ok is None and "absent" in checks["txt-enabled"].summary
    assert checks["txt-launch"].ok is None


def _dom0(r: Path) -> None:
    (r / "proc/xen").mkdir(parents=True)
    _no_smx(r)


def test_dom0_under_xen_hides_smx_and_the_hardware_answers(tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    _dom0(root)
    checks = by_id(ctx_for(root, good_launch(tmp_path / "mem.img")))
    assert checks["cpu-smx"].ok is None and "Xen" in checks["cpu-smx"].summary
    assert checks["txt-enabled"].ok is True
    assert checks["txt-launch"].ok is True and "launched" in checks["txt-launch"].summary
    mem = tmp_path / "failed.img"
    write_image(mem, machine_registers(senter_done=False, errorcode=0xC0003C11))
    launch = doctor.check_txt_launch(ctx_for(root, mem))
    assert launch.ok is False and "0xc0003c11" in launch.summary


def test_garbage_registers_claiming_a_launch_without_smx(tmp_path: Path) -> None:
    """A good launch's memory, but the CPU has no SMX: never "launched"."""
    root = healthy_root(tmp_path / "root")
    _no_smx(root)
    checks = by_id(ctx_for(root, good_launch(tmp_path / "mem.img")))
    for cid in ("txt-enabled", "txt-launch"):
        assert checks[cid].ok is False and "TXT not available" in checks[cid].summary
        assert "launched" not in checks[cid].summary


# --- real machines (../shared/testdata/real-drtm) -------------------------------------------

TXT_STAT_REGS = {
    "STS": "sts", "ESTS": "ests", "E2STS": "e2sts", "ERRORCODE": "errorcode",
    "DIDVID": "didvid", "FSBIF": "ver_fsbif", "QPIIF": "ver_qpiif", "SINIT.BASE": "sinit_base",
    "SINIT.SIZE": "sinit_size", "HEAP.BASE": "heap_base", "HEAP.SIZE": "heap_size", "DPR": "dpr",
}  # fmt: skip


def real_registers(name: str) -> txt_heap.TxtRegisters:
    """The registers of a real machine: txt-stat's register block (its first), or tboot's
    serial log (TXT.ERRORCODE, TXT.HEAP.*, "chipset ids")."""
    text = (REAL / name).read_text(errors="replace")
    values: dict[str, int] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(?:TBOOT: TXT\.)?([A-Z0-9.]+):\s+(?:\d+B \()?(0x[0-9a-fA-F]+)", line)
        if m and m.group(1) in TXT_STAT_REGS and TXT_STAT_REGS[m.group(1)] not in values:
            values[TXT_STAT_REGS[m.group(1)]] = int(m.group(2), 16)
        m = re.search(r"chipset ids: vendor: (0x\w+), device: (0x\w+), revision: (0x\w+)", line)
        if m and "didvid" not in values:
            vid, did, rid = (int(g, 16) for g in m.groups())
            values["didvid"] = vid | did << 16 | rid << 32
    return txt_heap.TxtRegisters(**values)


REAL_NO_LAUNCH = {
    # name: (SMX flag in the fake cpuinfo, what txt-stat claimed)
    "tbootdevel_2021-03-18_nuc8i7hvk_no-SMX_txt-stat-false-TRUE.txt": False,
    "tbootdevel_2020-01-23_icelake-495-pch_txt-disabled_txt-stat-false-TRUE.txt": True,
    "tbootdevel_2025-01-08_protectli-vp6670_tboot-1.11.9_launch-failed_txt-info.txt": True,
}


@pytest.mark.parametrize("xen", [False, True])
@pytest.mark.parametrize("name", list(REAL_NO_LAUNCH))
def test_real_garbage_registers_never_read_as_launched(
    tmp_path: Path, name: str, xen: bool
) -> None:
    if not REAL.is_dir():
        pytest.skip("../shared/testdata/real-drtm is not here")
    regs = real_registers(name)
    assert regs.heap_base == 0 and regs.didvid & 0xFFFF == 0x8086
    root = healthy_root(tmp_path / "root")
    if not REAL_NO_LAUNCH[name]:
        _no_smx(root)
    if xen:  # dom0: SMX unknowable from cpuinfo, the registers alone must not convince
        _dom0(root)
    mem = tmp_path / "mem.img"
    write_image(mem, regs)
    checks = by_id(ctx_for(root, mem))
    for cid in ("txt-enabled", "txt-launch"):
        assert checks[cid].ok is False, checks[cid]
        assert "TXT not available" in checks[cid].summary
        assert "launched" not in checks[cid].summary
    assert checks["sinit"].ok is None  # DIDVID is garbage too: not matched against it


REAL_FAILED = {
    "tbootdevel_2020-04-08_dell-latitude-e5470_SENTER-failed_txt-stat.txt": 0xC0003C11,
    "tbootdevel_2020-01-15_dell-poweredge-r730_tpm2_SENTER-failed-0xc0033451_tboot-log.txt":
        0xC0033451,
    "tbootdevel_2019-09-10_cpu-0x806ea_tboot-1.9.10_tpm2_SENTER-failed-0xc0007051_tboot-log.txt":
        0xC0007051,
}  # fmt: skip


@pytest.mark.parametrize("name", list(REAL_FAILED))
def test_real_failed_senter_explained(tmp_path: Path, name: str) -> None:
    if not REAL.is_dir():
        pytest.skip("../shared/testdata/real-drtm is not here")
    regs = real_registers(name)
    assert regs.errorcode == REAL_FAILED[name] and regs.heap_base and not regs.senter_done
    root = healthy_root(tmp_path / "root")
    mem = tmp_path / "mem.img"
    write_image(mem, regs)
    checks = by_id(ctx_for(root, mem))
    assert checks["txt-enabled"].ok is True
    launch = checks["txt-launch"]
    assert launch.ok is False and "the last launch failed" in launch.summary
    assert f"{REAL_FAILED[name]:#010x}" in launch.summary
    assert txt_heap.decode_errorcode(regs.errorcode) in launch.summary
    assert "AC module error" in launch.summary and launch.fix


def test_the_e5470_error_decodes_as_tboot_prints_it() -> None:
    assert txt_heap.decode_errorcode(0xC0003C11) == (
        "AC module error : acm_type=0x1, progress=0x01, error=0xf"
    )


# --- the command, with a swtpm ---------------------------------------------------------------


def doctor_cli(box: Box, root: Path, mem: Path, *extra: str) -> tuple[int, dict[str, object]]:
    res = box.cli("doctor", "--root", str(root), "--mem", str(mem), "--json", *extra)
    doc = res.json()
    assert set(doc) == {"ok", "checks"} and isinstance(doc["ok"], bool)
    for c in doc["checks"]:
        assert set(c) == {"id", "ok", "summary", "fix"}
        assert c["ok"] in (True, False, None) and isinstance(c["summary"], str)
        assert c["fix"] is None or isinstance(c["fix"], str)
    return res.code, doc


def test_a_healthy_swtpm_machine_exits_0(box: Box, tmp_path: Path) -> None:
    root = healthy_root(tmp_path / "root")
    code, doc = doctor_cli(box, root, good_launch(tmp_path / "mem.img"))
    checks = {c["id"]: c for c in doc["checks"]}  # type: ignore[attr-defined]
    assert code == 0 and doc["ok"] is True, checks
    for cid in ("tpm", "tpm-lockout", "srk"):
        assert checks[cid]["ok"] is True and checks[cid]["fix"] is None, checks[cid]
    assert "as pinned by the token" in checks["srk"]["summary"]
    # An empty lockoutAuth is a warning: ok, with the fix.
    assert checks["tpm-lockout-auth"]["ok"] is True
    assert "set-lockout-auth" in checks["tpm-lockout-auth"]["fix"]
    text = box.cli("doctor", "--root", str(root), "--mem", str(tmp_path / "mem.img"))
    assert text.code == 0 and "WARN tpm-lockout-auth" in text.out and "ready" in text.out


def test_a_locked_out_tpm_fails_with_the_fix(box: Box, tmp_path: Path) -> None:
    configure_da(box.swtpm.tcti, max_tries=2, recovery_time=1000, lockout_recovery=1000)
    wrong = box.dir / "wrong"
    wrong.write_text("not the passphrase\n")
    for _ in range(2):
        assert box.unlock(pw=wrong).code == 4
    root = healthy_root(tmp_path / "root")
    code, doc = doctor_cli(box, root, good_launch(tmp_path / "mem.img"))
    checks = {c["id"]: c for c in doc["checks"]}  # type: ignore[attr-defined]
    assert code == 1 and doc["ok"] is False
    lock = checks["tpm-lockout"]
    assert lock["ok"] is False and "lockout" in lock["summary"] and "reset-lockout" in lock["fix"]
    assert checks["tpm"]["ok"] is True


def test_usage_errors_exit_2_and_no_tpm_exits_1(tmp_path: Path) -> None:
    assert run(NO_TPM, tmp_path, "doctor", "--bogus").code == 2
    assert run(NO_TPM, tmp_path, "doctor", "--root", str(tmp_path / "nowhere")).code == 2
    root = healthy_root(tmp_path / "root")
    res = run(NO_TPM, tmp_path, "doctor", "--root", str(root), "--json",
              "--mem", str(good_launch(tmp_path / "mem.img")))  # fmt: skip
    assert res.code == 1
    doc = res.json()
    failed = [c["id"] for c in doc["checks"] if c["ok"] is False]
    assert failed == ["tpm"]
    help_ = run(NO_TPM, tmp_path, "doctor", "--help")
    assert help_.code == 0 and "txt-launch" in help_.out and "garbage" in help_.out


def test_help_lists_every_check() -> None:
    from qubes_seal.cli.doctor_cmd import DOCTOR_HELP

    ids = [
        fn(ctx_for(Path("/nonexistent"))).id for fn in doctor.CHECKS if fn is not doctor.check_keyd
    ]
    for cid in [*ids, "keyd"]:
        assert f"  {cid} " in DOCTOR_HELP, cid


def test_an_srk_that_is_not_the_pinned_one_fails(box: Box, tmp_path: Path) -> None:
    """The TPM cleared (the SRK evicted), then another key at 0x81000001: both named."""
    from tpm2_pytss import ESAPI, ESYS_TR

    from qubes_seal.tpm.device import SRK_HANDLE, Tpm

    with ESAPI(box.swtpm.tcti) as esys:
        tr = esys.tr_from_tpmpublic(SRK_HANDLE)
        esys.evict_control(ESYS_TR.OWNER, tr, SRK_HANDLE)
    root = healthy_root(tmp_path / "root")
    mem = good_launch(tmp_path / "mem.img")
    code, doc = doctor_cli(box, root, mem)
    srk = {c["id"]: c for c in doc["checks"]}["srk"]  # type: ignore[attr-defined]
    assert code == 1 and srk["ok"] is False and "0x81000001 is empty" in srk["summary"]
    assert "recovery key" in srk["fix"]
    with ESAPI(box.swtpm.tcti) as esys:  # another key there: a different name
        template = Tpm.srk_template()
        template.publicArea.unique.ecc.x.buffer = b"\x01" * 32  # type: ignore[attr-defined]
        transient, *_ = esys.create_primary(None, template, ESYS_TR.OWNER)
        try:
            esys.tr_close(esys.evict_control(ESYS_TR.OWNER, transient, SRK_HANDLE))
        finally:
            esys.flush_context(transient)
    code, doc = doctor_cli(box, root, mem)
    srk = {c["id"]: c for c in doc["checks"]}["srk"]  # type: ignore[attr-defined]
    assert code == 1 and srk["ok"] is False and "is not the one the token pins" in srk["summary"]
