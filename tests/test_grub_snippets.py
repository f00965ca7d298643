"""grub-snippets/20_qubes_seal_tboot: the entries it writes, and that the predictor agrees.

The helpers at the top (a fake /boot, the snippet runner) are also used by
tests/test_reseal_units.py.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_util import run

from qubes_seal.errors import UsageError
from qubes_seal.measure.grub import (
    BootEntry,
    components_from_entry,
    entries,
    find_entry,
    split_words,
)
from qubes_seal.measure.tboot import grub_module_string
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import Module, blob, sample_modules, txt_launch
from qubes_seal.tpm.device import Tpm

REPO = Path(__file__).resolve().parent.parent
SNIPPET = REPO / "grub-snippets" / "20_qubes_seal_tboot"

XENS = ["4.17.5", "4.19.1", "4.18.0"]  # 4.18.0 is an uncompressed image (xen-4.18.0)
KERNELS = ["6.6.63-1.qubes.fc37.x86_64", "6.12.9-1.qubes.fc37.x86_64", "5.15.0"]
SINITS = ["GM45_GS45_PM45_SINIT_51.BIN", "i5_i7_DUAL_SINIT_51.bin"]


def fake_acm(tag: bytes, size: int = 1024) -> bytes:
    """An Intel TXT chipset ACM header as tboot checks it: type 2, vendor 0x8086, size."""
    header = struct.pack("<HHIIHHIII", 2, 0, 56, 0x20000, 0, 0, 0x8086, 0x20240101, size // 4)
    return (header + tag).ljust(size, b"\0")


@dataclass
class FakeBoot:
    path: Path
    loaded: dict[str, bytes]  # file name -> the bytes GRUB hands over to tboot


def make_boot(root: Path, *, tboot: bool = True, sinit: bool = True) -> FakeBoot:
    """/boot with three Xen and three dom0 kernels (one more without initramfs), two SINITs.

    xen-*.gz and the Fedora-style initramfs are gzip-compressed; the Debian-style
    initrd.img-5.15.0 is not.  Decoys: a symlink xen-4.19.gz, xen-4.19.1.config, a kernel
    with no initramfs, a .BIN that is not an ACM, and an ACM-typed file of another vendor.
    """
    boot = root / "boot"
    boot.mkdir(parents=True)
    loaded: dict[str, bytes] = {}
    if tboot:
        (boot / "tboot.gz").write_bytes(gzip.compress(b"tboot MLE"))
    for v in XENS:
        image = b"\x7fELF" + blob(f"xen-{v}", 4096)
        name = f"xen-{v}" if v == "4.18.0" else f"xen-{v}.gz"
        (boot / name).write_bytes(image if v == "4.18.0" else gzip.compress(image))
        loaded[name] = image  # GRUB decompresses Xen (no --nounzip)
    (boot / "xen-4.19.gz").symlink_to("xen-4.19.1.gz")
    (boot / "xen-4.19.1.config").write_text("CONFIG_XEN=y\n")
    for k in KERNELS:
        kernel = b"MZ" + blob(f"vmlinuz-{k}", 8192)
        (boot / f"vmlinuz-{k}").write_bytes(kernel)
        loaded[f"vmlinuz-{k}"] = kernel
        cpio = b"070701" + blob(f"initramfs-{k}", 16384)
        if k.startswith("5."):
            name, data = f"initrd.img-{k}", cpio
        else:
            name, data = f"initramfs-{k}.img", gzip.compress(cpio, mtime=0)
        (boot / name).write_bytes(data)
        loaded[name] = data  # --nounzip: the file as it is
    (boot / "vmlinuz-6.1.0-no-initramfs").write_bytes(b"MZ")
    if sinit:
        for i, name in enumerate(SINITS):
            (boot / name).write_bytes(fake_acm(name.encode(), 1024 * (i + 1)))
    (boot / "README.BIN").write_bytes(b"not an ACM at all")
    bad = bytearray(fake_acm(b"other vendor"))
    bad[16:20] = struct.pack("<I", 0x1234)
    (boot / "OTHER_VENDOR.BIN").write_bytes(bytes(bad))
    return FakeBoot(boot, loaded)


def run_snippet(
    boot: Path,
    env: dict[str, str] | None = None,
    *,
    prefix: str | None = "",
    lib: bool = True,
    shell: str = "sh",
) -> subprocess.CompletedProcess[str]:
    """Run the snippet as grub-mkconfig would, with ``env`` standing for /etc/default/grub."""
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "QUBES_SEAL_BOOT_DIR": str(boot)}
    if prefix is not None:
        full["QUBES_SEAL_GRUB_PREFIX"] = prefix
    if not lib:
        full["QUBES_SEAL_GRUB_MKCONFIG_LIB"] = "/nonexistent/grub-mkconfig_lib"
    full.update(env or {})
    cmd = [*shell.split(), str(SNIPPET)]
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=60)


def grub_script_check(text: str, folder: Path) -> subprocess.CompletedProcess[str]:
    cfg = folder / "check.cfg"
    cfg.write_text(text)
    return subprocess.run(["grub-script-check", str(cfg)], capture_output=True, text=True)


# --- /etc/default/grub for the tests, and the words GRUB must read back ----------------------

FIRST_TITLE = "Qubes, with Xen 4.19.1 and Linux 6.12.9-1.qubes.fc37.x86_64 (tboot)"

DEFAULT_GRUB = {
    "GRUB_DEVICE": "/dev/mapper/qubes_dom0-root",
    "GRUB_CMDLINE_XEN": "smt=off",
    "GRUB_CMDLINE_XEN_DEFAULT": "console=none dom0_mem=min:1024M dom0_mem=max:4096M ucode=scan",
    "GRUB_CMDLINE_LINUX": "rd.luks.uuid=luks-0123 rd.lvm.lv=qubes_dom0/root rhgb",
    "GRUB_CMDLINE_LINUX_DEFAULT": "quiet",
}
XEN_WORDS = ["smt=off", "console=none", "dom0_mem=min:1024M", "dom0_mem=max:4096M", "ucode=scan"]
LINUX_WORDS = ["root=/dev/mapper/qubes_dom0-root", "ro", "rd.luks.uuid=luks-0123",
               "rd.lvm.lv=qubes_dom0/root", "rhgb", "quiet"]  # fmt: skip

# Values as a user writes them in /etc/default/grub (after the shell has read that file).
ODD_GRUB = {
    **DEFAULT_GRUB,
    "GRUB_DISTRIBUTOR": "Qubes 'R4.2' \"dom0\" $HOME",
    "GRUB_CMDLINE_LINUX": 'rd.luks.uuid=luks-0123 "acpi_osi=Windows 2015"  plymouth.x\t',
    "GRUB_CMDLINE_LINUX_DEFAULT": (
        r"""quiet it\'s 'semi;colon|pipe&<>' "dq \"x\" \\ back" '$literal' hash#tag '#lead' """
        r"""a\ b 'x\x41' {brace} ''"""
    ),
}
ODD_LINUX_WORDS = [
    "root=/dev/mapper/qubes_dom0-root", "ro", "rd.luks.uuid=luks-0123", "acpi_osi=Windows 2015",
    "plymouth.x", "quiet", "it's", "semi;colon|pipe&<>", 'dq "x" \\ back', "$literal",
    "hash#tag", "#lead", "a b", "x\\x41", "{brace}", "",
]  # fmt: skip
ODD_TITLE = (
    "Qubes 'R4.2' \"dom0\" $HOME, with Xen 4.19.1 and Linux 6.12.9-1.qubes.fc37.x86_64 (tboot)"
)


def generate(tmp_path: Path, env: dict[str, str] | None = None, **kw: object) -> str:
    res = run_snippet(make_boot(tmp_path).path, env if env is not None else DEFAULT_GRUB, **kw)  # type: ignore[arg-type]
    assert res.returncode == 0, res.stderr
    return res.stdout


def module_lines(text: str, title: str) -> list[list[str]]:
    """The words of each module2 line of the entry ``title`` (as GRUB's lexer gives them)."""
    out: list[list[str]] = []
    inside = False
    for line in text.splitlines():
        words = split_words(line.strip())
        if words[:1] == ["menuentry"]:
            inside = words[1] == title
        elif inside and words[:1] == ["module2"]:
            out.append(words)
        elif inside and words == ["}"]:
            break
    return out


# --- What the snippet writes --------------------------------------------------------------------

SHELLS = [s for s in ("sh", "dash", "bash --posix") if shutil.which(s.split()[0])]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("lib", [True, False], ids=["grub-mkconfig_lib", "no-lib"])
def test_entries_for_every_xen_and_kernel_newest_first(
    tmp_path: Path, shell: str, lib: bool
) -> None:
    text = generate(tmp_path, lib=lib, shell=shell)
    check = grub_script_check(text, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr

    found = entries(text)
    xens = ["xen-4.19.1.gz", "xen-4.18.0", "xen-4.17.5.gz"]
    kernels = ["6.12.9-1.qubes.fc37.x86_64", "6.6.63-1.qubes.fc37.x86_64", "5.15.0"]
    assert [e.title for e in found] == [
        f"Qubes, with Xen {x.removeprefix('xen-').removesuffix('.gz')} and Linux {k} (tboot)"
        for x in xens
        for k in kernels
    ]
    for entry, (xen, kernel) in zip(found, [(x, k) for x in xens for k in kernels], strict=True):
        assert entry.kernel == "/tboot.gz"
        initrd = f"initrd.img-{kernel}" if kernel == "5.15.0" else f"initramfs-{kernel}.img"
        assert [(m.path, m.args, m.nounzip) for m in entry.modules] == [
            (f"/{xen}", XEN_WORDS, False),
            (f"/vmlinuz-{kernel}", LINUX_WORDS, False),
            (f"/{initrd}", [], True),
            ("/GM45_GS45_PM45_SINIT_51.BIN", [], False),
            ("/i5_i7_DUAL_SINIT_51.bin", [], False),
        ]
    assert "logging=serial,memory,vga" in text.splitlines()[5]
    ids = [line.split("$menuentry_id_option ")[1] for line in text.splitlines()
           if line.startswith("menuentry")]  # fmt: skip
    assert ids[0] == "'qubes-seal-tboot' {"
    assert len(set(ids)) == len(ids)
    assert (
        "no initramfs for vmlinuz-6.1.0-no-initramfs"
        in run_snippet(make_boot(tmp_path / "again").path, DEFAULT_GRUB).stderr
    )


@pytest.mark.parametrize(
    ("boot_kw", "env"),
    [
        (dict(tboot=False), {}),
        (dict(sinit=False), {}),
        ({}, {"GRUB_QUBES_SEAL_DISABLE": "true"}),
        ({}, {"GRUB_QUBES_SEAL_TBOOT": "tboot-1.11.gz"}),
        ({}, {"GRUB_QUBES_SEAL_SINIT": "README.BIN OTHER_VENDOR.BIN"}),
    ],
    ids=["no-tboot", "no-sinit", "disabled", "other-tboot-missing", "only-non-acms"],
)
def test_nothing_is_emitted_without_tboot_or_sinit(
    tmp_path: Path, boot_kw: dict[str, bool], env: dict[str, str]
) -> None:
    res = run_snippet(make_boot(tmp_path, **boot_kw).path, {**DEFAULT_GRUB, **env})
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""


def test_configuration_variables(tmp_path: Path) -> None:
    env = {
        **DEFAULT_GRUB,
        "GRUB_CMDLINE_TBOOT": "logging=memory min_ram=0x2000000",
        "GRUB_CMDLINE_LINUX_XEN_REPLACE_DEFAULT": "splash",
        "GRUB_QUBES_SEAL_CMDLINE_XEN_EXTRA": "sched-gran=core",
        "GRUB_QUBES_SEAL_CMDLINE_LINUX_EXTRA": "qubes.seal=1",
        "GRUB_QUBES_SEAL_ROOT": "UUID=1234",
        "GRUB_QUBES_SEAL_SINIT": "i5_i7_DUAL_SINIT_51.bin",
        "GRUB_QUBES_SEAL_NOUNZIP_INITRAMFS": "false",
        "GRUB_DISTRIBUTOR": "Qubes OS",
    }
    text = generate(tmp_path, env)
    first = entries(text)[0]
    assert first.title == "Qubes OS, with Xen 4.19.1 and Linux 6.12.9-1.qubes.fc37.x86_64 (tboot)"
    assert "multiboot2 /tboot.gz logging=memory min_ram=0x2000000" in text
    assert [(m.path, m.args, m.nounzip) for m in first.modules] == [
        ("/xen-4.19.1.gz", [*XEN_WORDS, "sched-gran=core"], False),
        ("/vmlinuz-6.12.9-1.qubes.fc37.x86_64",
         ["root=UUID=1234", "ro", "rd.luks.uuid=luks-0123", "rd.lvm.lv=qubes_dom0/root", "rhgb",
          "splash", "qubes.seal=1"], False),
        ("/initramfs-6.12.9-1.qubes.fc37.x86_64.img", [], False),
        ("/i5_i7_DUAL_SINIT_51.bin", [], False),
    ]  # fmt: skip
    # Without --nounzip GRUB gunzips the initramfs: the predictor reads the same line.
    comps = components_from_entry(first, boot_dir=tmp_path / "boot")
    assert comps[2].image == gzip.decompress(
        (tmp_path / "boot" / "initramfs-6.12.9-1.qubes.fc37.x86_64.img").read_bytes()
    )
    # No root device known: no root= at all.
    text = generate(tmp_path / "b", {"GRUB_CMDLINE_LINUX": "quiet"})
    assert entries(text)[0].modules[1].args == ["quiet"]


def test_odd_characters_are_quoted(tmp_path: Path) -> None:
    text = generate(tmp_path, ODD_GRUB)
    check = grub_script_check(text, tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    entry = find_entry(text, ODD_TITLE)
    assert entry.modules[1].args == ODD_LINUX_WORDS
    assert not entry.modules[1].uses_variables  # '$literal' is quoted: no GRUB variable
    assert module_lines(text, ODD_TITLE)[1][2:] == ODD_LINUX_WORDS
    comps = components_from_entry(entry, boot_dir=tmp_path / "boot")
    assert comps[1].cmdline == grub_module_string(ODD_LINUX_WORDS)
    assert b'"acpi_osi=Windows 2015"' in comps[1].cmdline
    assert b"x\\x41" in comps[1].cmdline and b"it\\'s" in comps[1].cmdline


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("GRUB_CMDLINE_XEN", "console=$console", "GRUB variable"),
        ("GRUB_CMDLINE_LINUX", 'quiet "root=${root}"', "GRUB variable"),
        ("GRUB_CMDLINE_LINUX_DEFAULT", "quiet 'unterminated", "unterminated single quote"),
        ("GRUB_CMDLINE_XEN_DEFAULT", 'a "b', "unterminated double quote"),
        ("GRUB_QUBES_SEAL_TBOOT_CMDLINE", "logging=vga\\", "backslash at the end"),
    ],
)
def test_unpredictable_values_stop_grub_mkconfig(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    res = run_snippet(make_boot(tmp_path).path, {**DEFAULT_GRUB, name: value})
    assert res.returncode != 0
    assert res.stdout == ""
    assert name in res.stderr and message in res.stderr


def test_grub_variables_in_a_hand_written_entry_are_refused(tmp_path: Path) -> None:
    boot = make_boot(tmp_path).path
    for line, refused in [
        ("module2 /xen-4.19.1.gz console=$console", True),
        ('module2 /xen-4.19.1.gz "console=${c}"', True),
        ("module2 /xen-4.19.1.gz 'console=$literal'", False),
        ("module2 /xen-4.19.1.gz console=\\$literal", False),
    ]:
        text = f"menuentry 'x' {{\n multiboot2 /tboot.gz\n {line}\n}}\n"
        entry = entries(text)[0]
        assert entry.modules[0].uses_variables is refused, line
        if refused:
            with pytest.raises(UsageError, match="GRUB variables"):
                components_from_entry(entry, boot_dir=boot)
        else:
            assert components_from_entry(entry, boot_dir=boot)[0].cmdline == b"console=$literal"


@pytest.mark.parametrize(
    ("prefix", "lib"),
    [("", True), ("/boot", True), (None, True), (None, False)],
    ids=["separate-boot", "boot-on-root", "grub-mkrelpath", "stat"],
)
def test_paths_relative_to_grub_root_resolve(tmp_path: Path, prefix: str | None, lib: bool) -> None:
    fb = make_boot(tmp_path)
    res = run_snippet(fb.path, DEFAULT_GRUB, prefix=prefix, lib=lib)
    assert res.returncode == 0, res.stderr
    entry: BootEntry = entries(res.stdout)[0]
    if prefix is not None:
        assert entry.kernel == f"{prefix}/tboot.gz"
    else:  # detected: the fake /boot is a directory of its file system, not a mount
        assert entry.kernel.endswith("/boot/tboot.gz") and entry.kernel != "/tboot.gz"
    comps = components_from_entry(entry, boot_dir=fb.path)
    assert [c.image for c in comps] == [
        fb.loaded["xen-4.19.1.gz"],
        fb.loaded["vmlinuz-6.12.9-1.qubes.fc37.x86_64"],
        fb.loaded["initramfs-6.12.9-1.qubes.fc37.x86_64.img"],
    ]


# --- The agreement: predictor == launch ------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "title", "linux_words"),
    [(DEFAULT_GRUB, FIRST_TITLE, LINUX_WORDS), (ODD_GRUB, ODD_TITLE, ODD_LINUX_WORDS)],
    ids=["plain", "odd-characters"],
)
def test_predictor_agrees_with_a_launch_of_the_generated_entry(
    swtpm: Swtpm, tmp_path: Path, env: dict[str, str], title: str, linux_words: list[str]
) -> None:
    fb = make_boot(tmp_path)
    res = run_snippet(fb.path, env)
    assert res.returncode == 0, res.stderr
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(res.stdout)

    # What GRUB hands over to tboot for this entry: Xen gunzipped, the kernel as is, the
    # initramfs as is (--nounzip); each module string re-quoted by GRUB from its words.
    kernel = "vmlinuz-6.12.9-1.qubes.fc37.x86_64"
    handed_over = [
        Module("xen", grub_module_string(XEN_WORDS), fb.loaded["xen-4.19.1.gz"]),
        Module("kernel", grub_module_string(linux_words), fb.loaded[kernel]),
        Module("initramfs", b"", fb.loaded["initramfs-6.12.9-1.qubes.fc37.x86_64.img"]),
    ]
    # The words the script emitted give the same module strings...
    lines = module_lines(res.stdout, title)
    emitted = [w[3:] if w[1] == "--nounzip" else w[2:] for w in lines]
    assert [grub_module_string(a) for a in emitted[:3]] == [m.cmdline for m in handed_over]
    # ...and the predictor reads them back, with the right images, SINITs dropped.
    comps = components_from_entry(find_entry(res.stdout, title), boot_dir=fb.path)
    assert [(c.name, c.cmdline, c.image) for c in comps] == [
        (m.name, m.cmdline, m.image) for m in handed_over
    ]

    log = tmp_path / "txt.log"
    txt_launch(swtpm, sample_modules(), log_path=log)  # this boot, before the update
    out = run(swtpm.tcti, tmp_path / "state", "predict", "--txt-log", str(log),
              "--grub-cfg", str(cfg), "--entry", title, "--boot-dir", str(fb.path),
              "--json")  # fmt: skip
    assert out.code == 0, out.err
    predicted = json.loads(out.out)["pcrs"]["sha256"]

    swtpm.reboot()  # the next boot, from the generated entry
    launch = txt_launch(swtpm, handed_over)
    with Tpm(swtpm.tcti) as tpm:
        actual = tpm.read_pcrs([17, 18])
    assert predicted == {"17": actual[17].hex(), "18": actual[18].hex()}
    assert launch.expected[17] == actual[17]

    # The test can fail: had GRUB gunzipped the initramfs, PCR 17 would differ.
    swtpm.reboot()
    gunzipped = gzip.decompress(handed_over[2].image)
    txt_launch(swtpm, [*handed_over[:2], Module("initramfs", b"", gunzipped)])
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.read_pcrs([17])[17].hex() != predicted["17"]
